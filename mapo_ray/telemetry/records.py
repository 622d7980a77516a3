"""Metric records: validation, the ``metrics.jsonl`` writer and its reader (no Ray here).

``metrics.jsonl`` holds one JSON object per line: ``step``, ``time`` (Unix seconds)
and the metrics, slash-separated keys as the training loop names them. An
evaluation is its own line whose metric keys all start with ``eval/``. A resumed
run keeps the lines up to the step it resumes from and drops the later ones (logged
before the interruption, and done again now), so each step has one train line and at
most one evaluation line.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"

Metrics = dict[str, int | float]


def clean_metrics(step: int, metrics: Mapping[str, Any], prefix: str = "") -> Metrics:
    """Check ``metrics`` and return them as plain ints and floats, keys prefixed.

    ``prefix`` is added to each key that does not start with it already. A ``step``
    key must equal ``step`` and is dropped (the record carries it); ``time`` is
    reserved. Values may be any real number, including numpy scalars and
    one-element tensors; NaN and inf pass through.

    Raises:
        ValueError: bad ``step``, an empty or reserved key, or a mismatched ``step``.
        TypeError: a key that is not a string or a value that is not a number.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    out: Metrics = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"step {step}: metric keys must be non-empty strings, got {key!r}")
        if key == "step":
            if value != step:
                raise ValueError(f"step {step}: metrics carry a different 'step' value {value!r}")
            continue
        if key == "time":
            raise ValueError(f"step {step}: metric key 'time' is reserved for the record's wall-clock time")
        out[key if key.startswith(prefix) else prefix + key] = _number(step, key, value)
    return out


def _number(step: int, key: str, value: Any) -> int | float:
    if isinstance(value, (bool, numbers.Integral)):
        return int(value)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"step {step}: metric {key!r} is not a number: {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"step {step}: metric {key!r} is not a number: {value!r}") from err


class JsonlWriter:
    """Appends records to ``path``, one flushed line each, after the lines of steps up to
    ``start_step`` that are there already (``open_step_log``)."""

    def __init__(self, path: str | Path, start_step: int = 0) -> None:
        self.path = Path(path)
        self._file = open_step_log(self.path, start_step)

    def write(self, step: int, metrics: Metrics) -> None:
        """One line ``{"step", "time", **metrics}``; NaN and inf become ``null`` (with a
        warning naming them), since JSON has no such numbers."""
        non_finite = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
        if non_finite:
            logger.warning("step %d: non-finite %s written as null to %s", step, non_finite, self.path)
        record = {"step": step, "time": time.time()}
        record.update({k: (None if k in non_finite else v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_step_log(path: Path, start_step: int) -> TextIO:
    """``path``, a file of JSON lines each with a ``step``, open for appending from a run
    that starts after ``start_step``: the lines of later steps are removed (a resumed run
    does those steps again), and all lines for a fresh run (``start_step`` 0), since the
    steps of an earlier attempt that left no checkpoint are done again too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    if path.exists():
        with path.open(encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if start_step > 0 and _step_of(line) <= start_step]
        if len(kept) < len(lines):
            logger.warning("%s: dropping %d line(s) after step %d, done again now", path, len(lines) - len(kept), start_step)
            partial = path.with_name(path.name + ".partial")
            partial.write_text("".join(kept), encoding="utf-8")
            partial.replace(path)  # atomic: a crash leaves the old file or the new one
    return path.open("a", encoding="utf-8")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a step line ({type(err).__name__}: {err}): {line[:200]!r}") from err


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a crash, so appended lines stay parseable."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back in chunks to the last newline; the torn line starts after it.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            end = start
        else:
            cut = 0
        logger.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted run", path, size - cut)
        f.truncate(cut)


@dataclass
class MetricsHistory:
    """The records of one ``metrics.jsonl``: step -> metrics, train and eval apart.

    Values are floats, or ``None`` where a non-finite value was logged.
    """

    train: dict[int, dict[str, float | None]] = field(default_factory=dict)
    evals: dict[int, dict[str, float | None]] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` (an ``eval/`` key reads the evaluations), in
        step order, leaving out steps where it is missing or ``None``."""
        table = self.evals if key.startswith(EVAL_PREFIX) else self.train
        points = [(s, m[key]) for s, m in sorted(table.items()) if m.get(key) is not None]
        return [s for s, _ in points], [float(v) for _, v in points]  # type: ignore[arg-type]


def read_metrics(path: str | Path) -> MetricsHistory:
    """Parse ``metrics.jsonl``; a later line for the same step overrides earlier keys.

    Raises:
        ValueError: naming ``path`` and the line number of a line that is not a JSON
            object with an integer ``step`` and numeric (or null) values.
    """
    path = Path(path)
    history = MetricsHistory()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            step = record.pop("step", None)
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{where}: missing or non-integer 'step' ({step!r})")
            record.pop("time", None)
            for key, value in record.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"{where}: metric {key!r} is not a number: {value!r}")
                table = history.evals if key.startswith(EVAL_PREFIX) else history.train
                table.setdefault(step, {})[key] = None if value is None else float(value)
    return history
