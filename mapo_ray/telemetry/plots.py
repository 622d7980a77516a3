"""PNG summaries of a run, drawn from its ``metrics.jsonl`` alone.

    python -m mapo_ray.telemetry.plots RUN_DIR

writes ``RUN_DIR/curves.png`` (reward and accuracy per step, evaluation accuracy
as points) and ``RUN_DIR/certainty.png`` (the distribution of the trajectory
certainty p over steps as a heatmap, with mean lambda below). Figures are drawn
on matplotlib's Agg canvas without pyplot, so nothing global changes and no
display is needed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mapo_ray.telemetry.records import METRICS_FILE, MetricsHistory, read_metrics

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
CERTAINTY_FILE = "certainty.png"
P_HIST_PREFIX = "certainty/p_hist/"


def plot_curves(history: MetricsHistory, out: Path) -> bool:
    """Reward mean (with a +-1 std band), train accuracy and eval accuracy; ``False``
    (nothing written) when the history has none of them."""
    reward_steps, reward = history.series("reward/mean")
    acc_steps, acc = history.series("reward/accuracy")
    eval_steps, eval_acc = history.series("eval/accuracy")
    if not (reward_steps or acc_steps or eval_steps):
        return False
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if reward_steps:
        ax.plot(reward_steps, reward, color="tab:blue", lw=1.2, label="reward mean")
        std_steps, std = history.series("reward/std")
        if std_steps == reward_steps:
            mean, spread = np.asarray(reward), np.asarray(std)
            ax.fill_between(
                reward_steps, mean - spread, mean + spread, color="tab:blue", alpha=0.15, lw=0, label="reward ± 1 std"
            )
    if acc_steps:
        ax.plot(acc_steps, acc, color="tab:orange", lw=1.2, label="train accuracy")
    if eval_steps:
        ax.plot(eval_steps, eval_acc, "o--", color="tab:green", ms=6, lw=1, label="eval accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.suptitle("Reward and accuracy")
    fig.savefig(out, dpi=110)
    return True


def _bin_edges(keys: list[str]) -> list[tuple[float, float, str]]:
    """(low, high, key) of each histogram key ``certainty/p_hist/LOW-HIGH``, low first."""
    bins = []
    for key in keys:
        low, _, high = key.removeprefix(P_HIST_PREFIX).partition("-")
        try:
            bins.append((float(low), float(high), key))
        except ValueError as err:  # float("") included: no "-" in the key
            raise ValueError(f"histogram key {key!r} is not of the form {P_HIST_PREFIX}LOW-HIGH") from err
    return sorted(bins)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """(S + 1,) boundaries around S sorted steps, halfway between neighbours."""
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middle[0]], middle, [2 * steps[-1] - middle[-1]]])


def plot_certainty(history: MetricsHistory, out: Path) -> bool:
    """Heatmap of the fraction of groups per p bin (step on x, p on y) above the
    mean lambda and the p in {0, 1} and zero-variance fractions; ``False`` (nothing
    written) when the history has no certainty histogram."""
    keys = sorted({k for m in history.train.values() for k in m if k.startswith(P_HIST_PREFIX)})
    steps = [s for s, m in sorted(history.train.items()) if any(m.get(k) is not None for k in keys)]
    if not steps:
        return False
    bins = _bin_edges(keys)
    counts = np.array(
        [[history.train[s].get(key) or 0.0 for s in steps] for _, _, key in bins], dtype=float
    )  # (B, S)
    totals = counts.sum(axis=0, keepdims=True)
    fraction = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    x_edges = _cell_edges(np.asarray(steps, dtype=float))
    y_edges = np.array([bins[0][0]] + [high for _, high, _ in bins])

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    mesh = top.pcolormesh(x_edges, y_edges, fraction, cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(mesh, ax=top, location="top", shrink=0.6, label="fraction of groups in the bin")
    top.set_ylabel("certainty p (fraction of a group that succeeded)")
    top.set_ylim(y_edges[0], y_edges[-1])

    for key, label, style in (
        ("certainty/lambda_mean", "mean lambda(p)", "-"),
        ("certainty/p_extreme_frac", "p in {0, 1}", "--"),
        ("certainty/zero_variance_frac", "zero-variance groups", ":"),
    ):
        xs, ys = history.series(key)
        if xs:
            bottom.plot(xs, ys, style, lw=1.3, label=label)
    bottom.set_ylim(-0.03, 1.03)
    bottom.set_xlabel("step")
    bottom.set_ylabel("lambda / fraction")
    bottom.grid(alpha=0.3)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", fontsize="small", ncols=3)
    fig.suptitle("Trajectory certainty over training")
    fig.savefig(out, dpi=110)
    return True


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs next to its ``metrics.jsonl`` and return their paths.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
        ValueError: the file has no records, or a malformed line (named by number).
    """
    run_dir = Path(run_dir)
    source = run_dir / METRICS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    history = read_metrics(source)
    if not history.train and not history.evals:
        raise ValueError(f"{source} has no records to plot")
    written = []
    for draw, name in ((plot_curves, CURVES_FILE), (plot_certainty, CERTAINTY_FILE)):
        out = run_dir / name
        if draw(history, out):
            written.append(out)
        else:
            logger.warning("%s: nothing to draw for %s (its metrics were never logged)", source, name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw a run's curves and certainty PNGs from its metrics.jsonl.")
    parser.add_argument("run_dir", type=Path, help=f"folder holding {METRICS_FILE}")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
