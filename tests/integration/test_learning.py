"""It learns: on a local Ray cluster, RL raises the tiny policy's test accuracy on the
synthetic ``fill`` task well past its supervised warm-start, and a control run that
never sends the RL weights to the rollout actors (``sync.enabled=false``) does not.

Both runs start from the same seeded warm-start (the same weights, so the same step-0
evaluation), train with the real math reward, and are evaluated by the rollout actors
themselves, so the control isolates the one thing it switches off: the actors receiving
the learned weights. The full-length version of this measurement is
``benchmarks/estimators.py`` (the cpu-tiny preset, 3 seeds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from mapo_ray.config import load_config
from mapo_ray.job import resolve_inputs
from mapo_ray.loop import train
from mapo_ray.rollout.actor import create_rollout_actors
from mapo_ray.telemetry.records import read_metrics

pytestmark = pytest.mark.integration

# cpu-tiny's run is 40 steps; by step 20 seed 0 has gained about 50 points (benchmarks/estimators.py).
STEPS = 20
# 20 points: well under that gain, and far above the ~3-point spread of one evaluation (see below).
MARGIN = 0.2


def config(*overrides: str):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"trainer.total_steps={STEPS}",
            f"trainer.eval_every={STEPS}",  # the warm-start (step 0) and the end
            f"trainer.checkpoint_every={STEPS}",
            "trainer.keep_checkpoints=1",
            *overrides,
        ],
    )


def eval_accuracy(cfg, run_dir: Path) -> dict[int, float]:
    """Train ``cfg`` into ``run_dir``; the eval accuracy at each evaluated step (0: the warm-start)."""
    cfg, model_path = resolve_inputs(cfg)
    actors = create_rollout_actors(cfg.rollout, model_path, seed=cfg.seed)
    try:
        result = train(cfg, run_dir=run_dir, model_path=model_path, rollout_actors=actors)
        versions = ray.get([a.weight_version.remote() for a in actors.values()])
    finally:
        for actor in actors.values():
            ray.kill(actor)
    assert result.error is None
    # With sync on, the actors hold the last step's weights; off, the warm-start's (version 0).
    assert versions == [STEPS if cfg.sync.enabled else 0]
    steps, accuracy = read_metrics(run_dir / "metrics.jsonl").series("eval/accuracy")
    return dict(zip(steps, accuracy))


def test_rl_raises_test_accuracy_and_does_not_without_weight_sync(ray_cluster, tmp_path):
    learned = eval_accuracy(config(), tmp_path / "learn")
    control = eval_accuracy(config("sync.enabled=false"), tmp_path / "control")
    print(f"eval accuracy by step: learning {learned}, control {control}")
    assert sorted(learned) == sorted(control) == [0, STEPS]
    # The same seeds give the same warm-start in both runs.
    assert learned[0] == control[0]
    assert learned[STEPS] >= learned[0] + MARGIN
    # Without the learned weights the actors sample the warm-start policy throughout; only
    # the evaluation's sampling seed differs from step to step, which moves 256 answers by
    # about 3 points (one standard deviation), so "does not rise" is "not by the margin".
    assert control[STEPS] < control[0] + MARGIN
    assert learned[STEPS] >= control[STEPS] + MARGIN
