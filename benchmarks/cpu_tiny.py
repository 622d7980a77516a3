"""Training runs of the ``cpu-tiny`` task for the benchmarks that compare configurations over seeds.

``benchmarks/estimators.py`` and ``benchmarks/async_correction.py`` each train one run per
(configuration, seed) into a folder of their ``--out`` and read a finished run back
instead of training it again, so that a cut-short benchmark resumes and seeds can run
as separate processes, to be tabled together by one more call.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray

from mapo_ray.config import load_config
from mapo_ray.job import resolve_inputs, start_local_ray
from mapo_ray.loop import train
from mapo_ray.rollout.actor import create_rollout_actors
from mapo_ray.telemetry.records import MetricsHistory, read_metrics

RESULT_FILE = "result.json"  # a finished run's numbers; a rerun on the same --out reads them back
RunT = TypeVar("RunT")


def run_all(
    names: Sequence[str], seeds: Sequence[int], run_one: Callable[[str, int], RunT], describe: Callable[[RunT], str]
) -> dict[str, list[RunT]]:
    """``run_one(name, seed)`` for every name and seed on a throw-away local Ray cluster,
    seed-major (a cut-short benchmark still compares like with like), printing
    ``describe(run)`` as each finishes. Returns the runs by name, in seed order."""
    # log_to_driver shows each run's progress lines (step, reward, eval) from its training worker.
    start_local_ray(include_dashboard=False, configure_logging=False, log_to_driver=True)
    runs: dict[str, list[RunT]] = {name: [] for name in names}
    try:
        for seed in seeds:
            for name in names:
                run = run_one(name, seed)
                runs[name].append(run)
                print(f"  done: {name} seed {seed}: {describe(run)}", flush=True)
    finally:
        ray.shutdown()
    return runs


def saved_run(run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """The fields ``save_run`` wrote for a finished run in ``run_dir``, or None when there is none.

    Raises SystemExit when the saved run had other overrides, or ``run_dir`` holds an
    unfinished run: both need another ``--out``.
    """
    done = run_dir / RESULT_FILE
    if not done.exists():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} holds an unfinished run (no {RESULT_FILE}): remove it, or pick another --out")
        return None
    saved = json.loads(done.read_text())
    if saved["overrides"] != overrides:
        raise SystemExit(f"{done} was run with {saved['overrides']}, not {overrides}: pick another --out")
    saved["evals"] = {int(step): accuracy for step, accuracy in saved["evals"].items()}
    return saved


def save_run(run_dir: Path, run: Any) -> None:
    """Write a finished run's dataclass (with an ``overrides`` field) for ``saved_run``."""
    (run_dir / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(run)))


def train_cpu_tiny(run_dir: Path, overrides: list[str], label: str) -> tuple[MetricsHistory, dict[int, float], float]:
    """Train ``cpu-tiny`` with ``overrides`` into ``run_dir`` on the running Ray cluster.

    Returns the run's metrics, its test accuracy by step (step 0: the warm-start) and its
    wall seconds (actors, warm-start, RL steps and evaluations). ``label`` names the run
    in errors.
    """
    config, model_path = resolve_inputs(load_config(preset="cpu-tiny", overrides=overrides))
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    actors = create_rollout_actors(config.rollout, model_path, seed=config.seed)
    try:
        result = train(config, run_dir=run_dir, model_path=model_path, rollout_actors=actors)
    finally:
        for actor in actors.values():
            ray.kill(actor)
    if result.error is not None:
        raise RuntimeError(f"{label}: training failed") from result.error
    wall = time.perf_counter() - started
    history = read_metrics(run_dir / "metrics.jsonl")
    steps, accuracy = history.series("eval/accuracy")
    if not steps or steps[0] != 0:
        raise RuntimeError(f"{label}: no warm-start evaluation in {run_dir}; is sft.steps > 0?")
    return history, dict(zip(steps, accuracy)), wall


def mean_spread(values: list[float]) -> str:
    """Accuracies (fractions) as "mean ± population std" in percent."""
    return f"{100 * statistics.fmean(values):5.1f} ± {100 * statistics.pstdev(values):4.1f}"
