"""The prompt ledger: which prompts each training step scored, in ``ledger.jsonl`` (no Ray here).

One line per step, ``{"step": 3, "time": ..., "prompts": [{"uid": "a#7", "epoch": 0}, ...]}``,
the prompts in the order the step scored them, each with the data epoch it was drawn
in. It is how a run shows that recovering from a failure lost no prompt and scored
none twice: within an epoch every uid should appear exactly once. Like
``metrics.jsonl``, a resumed run appends, and a later line for a step replaces the
earlier one (the steps after the restored checkpoint are done again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from mapo_ray.telemetry.records import _drop_torn_tail

LEDGER_FILE = "ledger.jsonl"


class PromptLedger:
    """Appends one flushed line per step to ``run_dir/ledger.jsonl``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LEDGER_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = self.path.open("a", encoding="utf-8")

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
