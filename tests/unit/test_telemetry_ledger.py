"""The prompt ledger: one line per step; a resumed run drops the lines it does again."""

from __future__ import annotations

import pytest

from mapo_ray.telemetry.ledger import LEDGER_FILE, PromptLedger, read_ledger


def test_a_resumed_run_keeps_the_steps_it_resumes_after_and_redoes_the_rest(tmp_path):
    first = PromptLedger(tmp_path)
    first.record(1, [("a", 0), ("b", 0)])
    first.record(2, [("c", 0), ("a", 1)])  # the step crosses into epoch 1
    first.close()
    with (tmp_path / LEDGER_FILE).open("a") as f:
        f.write('{"step": 3, "prompts": [{"ui')  # torn by a crash mid-line
    again = PromptLedger(tmp_path, start_step=1)  # resumed from the step-1 checkpoint
    again.record(2, [("c", 0), ("a", 1)])
    again.record(3, [("b", 1)])
    again.close()
    assert read_ledger(tmp_path / LEDGER_FILE) == {1: [("a", 0), ("b", 0)], 2: [("c", 0), ("a", 1)], 3: [("b", 1)]}
    # One line per step: no prompt is listed twice for one scoring.
    assert [line[:11] for line in (tmp_path / LEDGER_FILE).read_text().splitlines()] == [
        '{"step": 1,', '{"step": 2,', '{"step": 3,'
    ]


def test_a_fresh_run_in_the_folder_of_an_attempt_without_checkpoint_starts_empty(tmp_path):
    attempt = PromptLedger(tmp_path)
    attempt.record(1, [("a", 0)])
    attempt.close()
    again = PromptLedger(tmp_path, start_step=0)
    again.record(1, [("b", 0)])
    again.close()
    assert read_ledger(tmp_path / LEDGER_FILE) == {1: [("b", 0)]}
    assert len((tmp_path / LEDGER_FILE).read_text().splitlines()) == 1


def test_a_malformed_line_is_named(tmp_path):
    (tmp_path / LEDGER_FILE).write_text('{"step": 1, "prompts": []}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{LEDGER_FILE}:2: not a ledger line \(KeyError"):
        read_ledger(tmp_path / LEDGER_FILE)
