"""MAPO against GRPO, Dr. GRPO and APD: the same warm-start, seeds and budget on the cpu-tiny task.

    python benchmarks/estimators.py [--estimators mapo,grpo,dr_grpo,apd] [--seeds 0,1,2]
        [--steps N] [--target 0.8] [--control] [--out DIR] [--set key=value ...]

Each (estimator, seed) is one full ``cpu-tiny`` training run on a local Ray cluster
(the job's own pieces: rollout actors, reward pool, DeepSpeed learner, weight sync),
with ``algo.estimator`` and ``seed`` set and everything else equal. A seed fixes the
data order, the warm-start and every sampling seed, so for one seed all estimators
start from the same warm-started policy (its step-0 evaluation is the same number).
``--control`` adds, per seed, a MAPO run with ``sync.enabled=false``: the rollout
actors keep the warm-start weights, so its accuracy must not rise.

Prints, per estimator: test accuracy of the warm-start and at the end (mean and
population spread over seeds), the gain in points, the first evaluated step that
reached ``--target`` accuracy (per seed; "-" if never), and the certainty
diagnostics over training (mean success rate p, mean TCR weight lambda, share of
groups with p in {0, 1}). Writes ``estimators.png`` (eval accuracy curves side by
side, one panel per estimator, one line per seed) and each run's folder under
``--out``. A finished run leaves ``result.json`` in its folder and is read back, not
trained again, by a later call on the same ``--out``: a cut-short benchmark resumes,
and calls for different seeds can run side by side and be tabled together by one more
call with all the seeds. Ends with one JSON line holding ``<estimator>_gain_points`` (mean test
accuracy gain over the warm-start, in percentage points) for each estimator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from matplotlib.figure import Figure

# A module beside this script (python benchmarks/<name>.py puts benchmarks/ on sys.path).
from cpu_tiny import mean_spread, run_all, save_run, saved_run, train_cpu_tiny

CONTROL = "mapo_nosync"
DIAGNOSTICS = ("certainty/p_mean", "certainty/lambda_mean", "certainty/p_extreme_frac")


@dataclasses.dataclass
class Run:
    estimator: str
    seed: int
    evals: dict[int, float]  # step -> eval accuracy; step 0 is the warm-start
    diagnostics: dict[str, float]  # means over the training steps
    wall_s: float
    overrides: list[str]

    @property
    def warm(self) -> float:
        return self.evals[0]

    @property
    def final(self) -> float:
        return self.evals[max(self.evals)]

    def steps_to(self, target: float) -> int | None:
        return next((s for s, acc in sorted(self.evals.items()) if s > 0 and acc >= target), None)


def run_one(estimator: str, seed: int, args: argparse.Namespace) -> Run:
    """Train one run into ``--out``, or read it back when a finished run with the same overrides is there."""
    overrides = [f"seed={seed}", *args.set]
    if estimator == CONTROL:
        overrides += ["algo.estimator=mapo", "sync.enabled=false"]
    else:
        overrides.append(f"algo.estimator={estimator}")
    if args.steps:
        overrides.append(f"trainer.total_steps={args.steps}")
    run_dir = args.out / f"{estimator}-s{seed}"
    if (saved := saved_run(run_dir, overrides)) is not None:
        return Run(**saved)
    history, evals, wall = train_cpu_tiny(run_dir, overrides, f"{estimator} seed {seed}")
    diagnostics = {key: statistics.fmean(history.series(key)[1]) for key in DIAGNOSTICS}
    run = Run(estimator, seed, evals, diagnostics, wall, overrides)
    save_run(run_dir, run)
    return run


def plot(runs: dict[str, list[Run]], out: Path, target: float) -> None:
    fig = Figure(figsize=(max(5.0, 3.2 * len(runs)), 3.4), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (estimator, group) in zip(axes, runs.items()):
        for run in group:
            steps = sorted(run.evals)
            ax.plot(steps, [run.evals[s] for s in steps], "o-", ms=3, lw=1, label=f"seed {run.seed}")
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_title(estimator)
        ax.set_xlabel("RL step (0: warm-start)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle("cpu-tiny test accuracy per estimator")
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", default="mapo,grpo,dr_grpo,apd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="RL steps per run (0: the preset's)")
    parser.add_argument("--target", type=float, default=0.8, help="accuracy for the steps-to-target column")
    parser.add_argument("--control", action="store_true", help="add a MAPO run per seed with sync.enabled=false")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"estimators-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = parser.parse_args()
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    if args.control:
        estimators.append(CONTROL)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out = args.out.resolve()

    runs = run_all(
        estimators,
        seeds,
        lambda estimator, seed: run_one(estimator, seed, args),
        lambda run: f"accuracy {run.warm:.3f} -> {run.final:.3f} in {run.wall_s:.0f} s",
    )

    print()
    print(f"cpu-tiny task, seeds {seeds}; test accuracy in %, mean ± spread (population std) over seeds")
    header = f"{'estimator':<12} {'warm-start':>12} {'final':>12} {'gain':>7} {'steps to ' + str(args.target):>16}"
    print(header + f" {'p mean':>7} {'lambda':>7} {'p in{0,1}':>9} {'run (s)':>8}")
    summary: dict[str, float | str] = {"benchmark": "estimators", "seeds": len(seeds)}
    for estimator, group in runs.items():
        gain = 100 * statistics.fmean(r.final - r.warm for r in group)
        reached = ",".join(str(r.steps_to(args.target) or "-") for r in group)
        diag = [statistics.fmean(r.diagnostics[k] for r in group) for k in DIAGNOSTICS]
        print(
            f"{estimator:<12} {mean_spread([r.warm for r in group]):>12} {mean_spread([r.final for r in group]):>12} "
            f"{gain:>+7.1f} {reached:>16} {diag[0]:>7.3f} {diag[1]:>7.3f} {diag[2]:>9.3f} "
            f"{statistics.fmean(r.wall_s for r in group):>8.0f}"
        )
        summary[f"{estimator}_gain_points"] = round(gain, 2)
        summary[f"{estimator}_final_accuracy"] = round(statistics.fmean(r.final for r in group), 4)
    plot(runs, args.out / "estimators.png", args.target)
    print(f"\ncurves: {args.out / 'estimators.png'}; runs under {args.out}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
