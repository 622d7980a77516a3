"""Async training with and without the rollout correction, against on-policy, on the cpu-tiny task.

    python benchmarks/async_correction.py [--seeds 0,1,2] [--steps N]
        [--configs on_policy,async1_none,async1_tis,async2_none,async2_tis] [--out DIR] [--set key=value ...]

Each (configuration, seed) is one full ``cpu-tiny`` training run on a local Ray cluster
(the job's own pieces, as ``benchmarks/estimators.py``), everything else equal:

- ``on_policy``: ``trainer.mode=on_policy``, ``algo.rollout_correction=none``. On-policy
  HF rollouts on CPU are sampled by the learner's own weights with the learner's own
  numerics (``actor/rollout_logprob_abs_diff`` is ~1e-6), so every TIS weight is 1 and
  an on-policy TIS run would only repeat this one at twice the cost.
- ``async<k>_none`` / ``async<k>_tis``: ``trainer.mode=async``, ``trainer.max_staleness=k``
  (k = 1, 2): the next k batches are sampled while the learner trains, from weights up to
  k versions old, without correction and with truncated importance sampling.

A seed fixes the data order, the warm-start and every sampling seed, so for one seed all
configurations start from the same warm-started policy. Prints, per configuration: test
accuracy of the warm-start and at the end (mean and population spread over seeds), the
gain in points, the mean staleness and correction statistics over training, the RL
seconds (the sum of ``time/step_s``: the steps only, without the warm-start and the
evaluations, which every configuration shares) and the whole run's wall seconds. A
finished run leaves ``result.json`` in its folder under ``--out`` and is read back, not
trained again, by a later call on the same ``--out``: seeds can run as separate
processes and be tabled together by one more call with all of them. Ends with one JSON
line: ``async_corrected_gain_points`` (async1_tis), ``async_uncorrected_gain_points``
(async1_none), ``on_policy_gain_points``, ``async_speedup`` (on-policy RL seconds over
async1_tis RL seconds), ``async_speedup_wall`` (the same with whole-run wall seconds),
and per configuration its gain and final accuracy; a key whose runs were filtered out
by ``--configs`` is null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

# A module beside this script (python benchmarks/<name>.py puts benchmarks/ on sys.path).
from cpu_tiny import mean_spread, run_all, save_run, saved_run, train_cpu_tiny

CONFIGS: dict[str, list[str]] = {
    "on_policy": ["trainer.mode=on_policy", "algo.rollout_correction=none"],
    "async1_none": ["trainer.mode=async", "trainer.max_staleness=1", "algo.rollout_correction=none"],
    "async1_tis": ["trainer.mode=async", "trainer.max_staleness=1", "algo.rollout_correction=tis"],
    "async2_none": ["trainer.mode=async", "trainer.max_staleness=2", "algo.rollout_correction=none"],
    "async2_tis": ["trainer.mode=async", "trainer.max_staleness=2", "algo.rollout_correction=tis"],
}
# Means over the training steps; a key a run never logs (no correction) is left out.
STATS = (
    "rollout/staleness_mean",
    "rollout/staleness",
    "actor/rollout_logprob_abs_diff",
    "actor/rollout_is_weight_mean",
    "actor/rollout_is_truncated_frac",
)


@dataclasses.dataclass
class Run:
    config: str
    seed: int
    evals: dict[int, float]  # step -> eval accuracy; step 0 is the warm-start
    stats: dict[str, float]  # means over the training steps
    rl_s: float  # sum of time/step_s
    wall_s: float
    overrides: list[str]

    @property
    def warm(self) -> float:
        return self.evals[0]

    @property
    def final(self) -> float:
        return self.evals[max(self.evals)]


def run_one(name: str, seed: int, args: argparse.Namespace) -> Run:
    """Train one run into ``--out``, or read it back when a finished run with the same overrides is there."""
    overrides = [f"seed={seed}", *CONFIGS[name], *args.set]
    if args.steps:
        overrides.append(f"trainer.total_steps={args.steps}")
    run_dir = args.out / f"{name}-s{seed}"
    if (saved := saved_run(run_dir, overrides)) is not None:
        return Run(**saved)
    history, evals, wall = train_cpu_tiny(run_dir, overrides, f"{name} seed {seed}")
    stats = {key: statistics.fmean(values) for key in STATS if (values := history.series(key)[1])}
    rl_s = sum(history.series("time/step_s")[1])
    run = Run(name, seed, evals, stats, rl_s, wall, overrides)
    save_run(run_dir, run)
    return run


def _stat(group: list[Run], key: str) -> str:
    values = [r.stats[key] for r in group if key in r.stats]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def summarize(runs: dict[str, list[Run]], seeds: list[int]) -> dict[str, float | int | str | None]:
    """Print the table; return the benchmark's JSON summary."""
    print(f"cpu-tiny task, seeds {seeds}; test accuracy in %, mean ± spread (population std) over seeds")
    print(
        f"{'config':<12} {'warm-start':>12} {'final':>12} {'gain':>7} {'stale':>6} {'IS w':>6} {'at cap':>7} "
        f"{'|dlogp|':>8} {'RL (s)':>8} {'run (s)':>8}"
    )
    summary: dict[str, float | int | str | None] = {"benchmark": "async_correction", "seeds": len(seeds)}
    gains: dict[str, float] = {}
    rl: dict[str, float] = {}
    wall: dict[str, float] = {}
    for name, group in runs.items():
        if not group:
            continue
        gains[name] = 100 * statistics.fmean(r.final - r.warm for r in group)
        rl[name] = statistics.fmean(r.rl_s for r in group)
        wall[name] = statistics.fmean(r.wall_s for r in group)
        print(
            f"{name:<12} {mean_spread([r.warm for r in group]):>12} {mean_spread([r.final for r in group]):>12} "
            f"{gains[name]:>+7.1f} {_stat(group, 'rollout/staleness_mean'):>6} "
            f"{_stat(group, 'actor/rollout_is_weight_mean'):>6} {_stat(group, 'actor/rollout_is_truncated_frac'):>7} "
            f"{_stat(group, 'actor/rollout_logprob_abs_diff'):>8} {rl[name]:>8.0f} {wall[name]:>8.0f}"
        )

    def rounded(value: float | None, digits: int = 2) -> float | None:
        return None if value is None else round(value, digits)

    def ratio(table: dict[str, float]) -> float | None:
        if "on_policy" in table and "async1_tis" in table and table["async1_tis"] > 0:
            return table["on_policy"] / table["async1_tis"]
        return None

    summary["async_corrected_gain_points"] = rounded(gains.get("async1_tis"))
    summary["async_uncorrected_gain_points"] = rounded(gains.get("async1_none"))
    summary["on_policy_gain_points"] = rounded(gains.get("on_policy"))
    summary["async_speedup"] = rounded(ratio(rl), 3)
    summary["async_speedup_wall"] = rounded(ratio(wall), 3)
    for name in CONFIGS:
        group = runs.get(name) or []
        summary[f"{name}_gain_points"] = rounded(gains.get(name))
        summary[f"{name}_final_accuracy"] = rounded(statistics.fmean(r.final for r in group), 4) if group else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {','.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="RL steps per run (0: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"async-correction-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = parser.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out = args.out.resolve()

    runs = run_all(
        names,
        seeds,
        lambda name, seed: run_one(name, seed, args),
        lambda run: (
            f"accuracy {run.warm:.3f} -> {run.final:.3f} in {run.rl_s:.0f} s of RL steps ({run.wall_s:.0f} s in all)"
        ),
    )

    print()
    summary = summarize(runs, seeds)
    print(f"\nruns under {args.out}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
