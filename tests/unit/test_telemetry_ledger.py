"""The prompt ledger: one line per step, a later line for a step replacing the earlier one."""

from __future__ import annotations

import pytest

from mapo_ray.telemetry.ledger import LEDGER_FILE, PromptLedger, read_ledger


def test_a_resumed_run_appends_and_its_lines_win(tmp_path):
    first = PromptLedger(tmp_path)
    first.record(1, [("a", 0), ("b", 0)])
    first.record(2, [("c", 0), ("a", 1)])  # the step crosses into epoch 1
    first.close()
    with (tmp_path / LEDGER_FILE).open("a") as f:
        f.write('{"step": 3, "prompts": [{"ui')  # torn by a crash mid-line
    again = PromptLedger(tmp_path)  # resumed from the step-1 checkpoint
    again.record(2, [("c", 0), ("a", 1)])
    again.record(3, [("b", 1)])
    again.close()
    assert read_ledger(tmp_path / LEDGER_FILE) == {1: [("a", 0), ("b", 0)], 2: [("c", 0), ("a", 1)], 3: [("b", 1)]}
    assert len((tmp_path / LEDGER_FILE).read_text().splitlines()) == 4


def test_a_malformed_line_is_named(tmp_path):
    (tmp_path / LEDGER_FILE).write_text('{"step": 1, "prompts": []}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{LEDGER_FILE}:2: not a ledger line \(KeyError"):
        read_ledger(tmp_path / LEDGER_FILE)
