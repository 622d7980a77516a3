"""``RunLogger``: where learner rank 0 sends each step's metrics.

One call fans a flat ``{slash/key: number}`` dict out to ``metrics.jsonl``,
TensorBoard (event files in the run folder), Ray dashboard gauges (when Ray is
initialized in this process) and the console; ``close`` draws the PNG summaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import ray
from torch.utils.tensorboard import SummaryWriter

from mapo_ray.telemetry.progress import Progress, eval_line
from mapo_ray.telemetry.ray_metrics import RayMetricsExporter
from mapo_ray.telemetry.records import EVAL_PREFIX, METRICS_FILE, JsonlWriter, Metrics, clean_metrics


class RunLogger:
    """Telemetry of one run, written under ``run_dir``.

    Args:
        run_dir: the run folder; ``metrics.jsonl`` there keeps its lines up to
            ``start_step`` and is appended to.
        total_steps: the step count the run ends at, for the progress ETA.
        run_name: the ``run`` tag of the Ray gauges; default the folder's name.
        start_step: the step a resumed run restarts after (0 for a fresh run). The
            TensorBoard events and ``metrics.jsonl`` lines of later steps in this folder
            (all of them for a fresh run), logged before an interruption, are hidden
            and removed: the run logs those steps again.
        stream: console output; default stdout.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        run_name: str | None = None,
        start_step: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_name = run_name if run_name is not None else self.run_dir.resolve().name
        self._jsonl = JsonlWriter(self.run_dir / METRICS_FILE, start_step)
        # purge_step hides events at or after it from an earlier session in this folder.
        self._tensorboard = SummaryWriter(
            log_dir=str(self.run_dir), purge_step=start_step + 1 if start_step > 0 else 0
        )
        self._ray = RayMetricsExporter(self.run_name) if ray.is_initialized() else None
        self._progress = Progress(total_steps, start_step=start_step, stream=stream)
        self._last_step = start_step
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record training step ``step`` (greater than the previous one).

        Raises:
            ValueError, TypeError: as ``clean_metrics``, or a step that does not advance.
        """
        clean = clean_metrics(step, metrics)
        if step <= self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}; steps must increase")
        self._last_step = step
        self._write(step, clean)
        if self._ray is not None:
            self._ray.record({"step": step, **clean})
        self._progress.update(step, clean)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record an evaluation made at training step ``step``; keys gain an ``eval/`` prefix."""
        clean = clean_metrics(step, metrics, prefix=EVAL_PREFIX)
        self._write(step, clean)
        if self._ray is not None:
            self._ray.record(clean)
        self._progress.note(eval_line(step, clean))

    def note(self, text: str) -> None:
        """A line for the console only, between the progress lines (e.g. where the weight sync formed)."""
        self._progress.note(text)

    def _write(self, step: int, metrics: Metrics) -> None:
        self._jsonl.write(step, metrics)
        for key, value in metrics.items():
            self._tensorboard.add_scalar(key, value, global_step=step)
        # Steps are seconds apart, so flushing each one costs little and loses nothing on a crash.
        self._tensorboard.flush()

    def close(self) -> list[Path]:
        """Flush and close every output, then draw the PNGs; returns their paths."""
        if self._closed:
            return []
        self._closed = True
        self._progress.close()
        self._jsonl.close()
        self._tensorboard.close()
        if self._jsonl.path.stat().st_size == 0:
            return []
        # Imported here: matplotlib loads only when drawing, and the package stays free of
        # the plots module, which `python -m mapo_ray.telemetry.plots` must run fresh.
        from mapo_ray.telemetry.plots import plot_run

        return plot_run(self.run_dir)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
