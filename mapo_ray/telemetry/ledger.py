"""The prompt ledger: which prompts each training step scored, in ``ledger.jsonl`` (no Ray here).

One line per step, ``{"step": 3, "time": ..., "prompts": [{"uid": "a#7", "epoch": 0}, ...]}``,
the prompts in the order the step scored them, each with the data epoch it was drawn
in. It is how a run shows that recovering from a failure lost no prompt and scored
none twice: within an epoch every uid should appear exactly once. Like
``metrics.jsonl``, a resumed run keeps the lines up to the step it resumes from and
drops the later ones, which it does again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from mapo_ray.telemetry.records import open_step_log

LEDGER_FILE = "ledger.jsonl"


class PromptLedger:
    """Appends one flushed line per step to ``run_dir/ledger.jsonl``, after the lines of
    steps up to ``start_step`` (the step a resumed run restarts after; 0: a fresh run)."""

    def __init__(self, run_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(run_dir) / LEDGER_FILE
        self._file = open_step_log(self.path, start_step)

    def record(self, step: int, prompts: Iterable[tuple[str, int]]) -> None:
        """Step ``step`` scored ``prompts``: ``(uid, epoch)`` pairs in scoring order."""
        line = {"step": step, "time": time.time(), "prompts": [{"uid": u, "epoch": e} for u, e in prompts]}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_ledger(path: str | Path) -> dict[int, list[tuple[str, int]]]:
    """Step -> its ``(uid, epoch)`` pairs; of two lines for one step, the later wins.

    Raises:
        ValueError: naming ``path`` and the line number of a malformed line.
    """
    path = Path(path)
    steps: dict[int, list[tuple[str, int]]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                steps[int(record["step"])] = [(str(p["uid"]), int(p["epoch"])) for p in record["prompts"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: not a ledger line ({type(err).__name__}: {err})") from err
    return steps
