"""Console progress: a tqdm bar on a terminal, one plain line per step elsewhere.

``ray job submit`` and cluster log files are not terminals; a bar's carriage
returns would pile up there, so those get self-contained lines instead.
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm import tqdm

REWARD_KEY = "reward/mean"
ACCURACY_KEY = "reward/accuracy"
STEP_SECONDS_KEY = "time/step_s"
# Shown after an evaluation, in this order, when present.
EVAL_SUMMARY_KEYS = ("eval/accuracy", "eval/format", "eval/reward_mean")


def _value(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.3f}"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (with days past 24 h); ``-`` when unknown."""
    if not math.isfinite(seconds):
        return "-"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def progress_line(step: int, total: int, metrics: Mapping[str, float], seconds_per_step: float) -> str:
    """One self-contained status line for step ``step`` of ``total``."""
    eta = seconds_per_step * max(total - step, 0)
    rate = f"{seconds_per_step:.2f}" if math.isfinite(seconds_per_step) else "-"
    return (
        f"step {step}/{total} | reward {_value(metrics, REWARD_KEY)} | acc {_value(metrics, ACCURACY_KEY)}"
        f" | {rate} s/step | ETA {format_duration(eta)}"
    )


def eval_line(step: int, metrics: Mapping[str, float]) -> str:
    """A summary of an evaluation's headline metrics (keys already ``eval/``-prefixed)."""
    parts = [f"{key.removeprefix('eval/')} {metrics[key]:.3f}" for key in EVAL_SUMMARY_KEYS if key in metrics]
    return f"eval at step {step} | " + (" | ".join(parts) if parts else "no headline metrics")


class Progress:
    """Step, reward, accuracy, seconds per step and ETA, written to ``stream``.

    Steps count completed steps: after a resume from step ``start_step`` the next
    update is ``start_step + 1``; the rate is measured over this session only, from
    the start of its first step (its ``time/step_s`` back from the first update),
    so a warm-start or an evaluation before it does not inflate the ETA.

    Lines are written to the stream itself, not through ``print``: inside a Ray Train
    worker ``print`` is patched to go both to the stream and to Train's logger, and
    the driver would show every line twice.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self._start_step = start_step
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._started = clock()
        self._first_step_started: float | None = None
        is_tty = getattr(self._stream, "isatty", lambda: False)()
        self._bar = (
            tqdm(total=total_steps, initial=start_step, file=self._stream, unit="step", dynamic_ncols=True)
            if is_tty
            else None
        )

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(reward=_value(metrics, REWARD_KEY), acc=_value(metrics, ACCURACY_KEY))
            return
        now = self._clock()
        if self._first_step_started is None:
            first_step_s = metrics.get(STEP_SECONDS_KEY)
            self._first_step_started = now - first_step_s if first_step_s is not None else self._started
        done = step - self._start_step
        seconds_per_step = (now - self._first_step_started) / done if done > 0 else math.nan
        self._write(progress_line(step, self.total_steps, metrics, seconds_per_step))

    def note(self, text: str) -> None:
        """A line that does not disturb the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            self._write(text)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
