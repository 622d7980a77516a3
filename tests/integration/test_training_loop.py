"""The whole loop on a local Ray cluster: two learner workers under DeepSpeed ZeRO-2, a
rollout actor, a reward pool, weight sync and checkpoints; then a resume from the
step-2 checkpoint that must reproduce step 3 of the uninterrupted run exactly, a
resume of the same run folder whose newest checkpoint is truncated, and a resume of
the same run folder from its older step-1 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from mapo_ray.config import load_config
from mapo_ray.job import resolve_inputs
from mapo_ray.loop import train
from mapo_ray.rollout.actor import create_rollout_actors

pytestmark = pytest.mark.integration


def spread_reward(response: str, answer: str) -> dict[str, float]:
    """A reward that differs between responses (the untrained policy never earns the math
    reward), so advantages, losses and gradients are not all zero."""
    return {"overall": (sum(map(ord, response)) % 11) / 10}


def config(tmp_path: Path, steps: int, *extra: str):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"trainer.total_steps={steps}",
            "trainer.num_learners=2",
            "trainer.prompts_per_step=4",
            "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=0",
            "trainer.eval_every=0",
            "learner.zero_stage=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=12",
            # Imported by name in the reward workers, which start in this working directory.
            "reward.function=tests.integration.test_training_loop:spread_reward",
            "sft.steps=2",  # the warm-start path, briefly
            "sft.batch_size=4",
            "data.synthetic_train=32",
            "data.synthetic_test=8",
            *extra,
        ],
    )


def run(cfg, run_dir: Path, resume_from: Path | None = None):
    cfg, model_path = resolve_inputs(cfg)
    actors = create_rollout_actors(cfg.rollout, model_path, seed=cfg.seed)
    try:
        result = train(
            cfg, run_dir=run_dir, model_path=model_path, rollout_actors=actors, resume_from=resume_from
        )
        versions = ray.get([a.weight_version.remote() for a in actors.values()])
    finally:
        for actor in actors.values():
            ray.kill(actor)
    return result, versions


def steps(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


def test_three_steps_then_an_exact_resume_from_step_two(ray_cluster, tmp_path):
    first = tmp_path / "first"
    result, versions = run(config(tmp_path, 3), first)
    assert result.error is None
    assert versions == [3]  # the actor holds the weights of the last step

    logged = steps(first)
    assert sorted(logged) == [1, 2, 3]
    assert [logged[s]["weight_version"] for s in (1, 2, 3)] == [1, 2, 3]
    for s in (1, 2, 3):
        assert logged[s]["reward/std"] > 0 and logged[s]["actor/grad_norm"] > 0
        assert logged[s]["certainty/num_groups"] == 4
    for name in ("curves.png", "certainty.png", "policy/model.safetensors"):
        assert (first / name).stat().st_size > 0
    assert list(first.glob("events.out.tfevents.*"))

    checkpoints = sorted(p for p in (first / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 3
    second = tmp_path / "second"
    result, versions = run(config(tmp_path, 3), second, resume_from=checkpoints[1])
    assert result.error is None and versions == [3]

    resumed = steps(second)
    assert sorted(resumed) == [3]
    same = ("reward/mean", "reward/std", "response/length_mean", "actor/pg_loss", "actor/entropy", "actor/grad_norm")
    for key in same:
        assert resumed[3][key] == logged[3][key], key
    # Same batch and same update: the final policies are identical, bit for bit.
    a, b = load_file(first / "policy/model.safetensors"), load_file(second / "policy/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # The same run folder again (--resume auto) after a crash cut its newest checkpoint
    # short: Ray Train offers the step-3 checkpoint, which does not load, so the learner
    # falls back to step 2 and does step 3 again, logged once.
    states = checkpoints[2] / "learner" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    assert not any((first / ".staging").iterdir())  # each report cleans up after itself
    (first / ".staging" / "rank1").mkdir()
    (first / ".staging" / "rank1" / "left-by-a-kill").write_bytes(b"x")
    result, versions = run(config(tmp_path, 3), first)
    assert result.error is None and versions == [3]
    assert not any((first / ".staging").iterdir())
    assert [json.loads(line)["step"] for line in (first / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (first / "ledger.jsonl").read_text().splitlines()] == [1, 2, 3]
    again = steps(first)
    for key in same:
        assert again[3][key] == logged[3][key], key
    c = load_file(first / "policy/model.safetensors")
    for name in a:
        assert torch.equal(a[name], c[name]), name

    # Back to the step-1 checkpoint, in the same run folder: Ray Train would offer its
    # newest (step 3); the loop restores step 1 and does steps 2 and 3 again, whose lines
    # replace the earlier ones.
    before = (first / "metrics.jsonl").read_text().splitlines()
    result, versions = run(config(tmp_path, 3), first, resume_from=checkpoints[0])
    assert result.error is None and versions == [3]
    lines = (first / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert lines[0] == before[0] and lines[1] != before[1]
    assert [json.loads(line)["step"] for line in (first / "ledger.jsonl").read_text().splitlines()] == [1, 2, 3]
    again = steps(first)
    for step in (2, 3):
        for key in same:
            assert again[step][key] == logged[step][key], (step, key)
    d = load_file(first / "policy/model.safetensors")
    for name in a:
        assert torch.equal(a[name], d[name]), name


def test_the_loop_syncs_actors_that_hold_two_weight_sync_ranks_each(ray_cluster, tmp_path):
    """Tensor parallelism's side of the loop: each actor's engine holds two sync ranks
    (``tests.integration.two_rank_engine``, a double of vLLM with tensor_parallel_size=2),
    so the coordinator forms a group of 1 + 2 x 2 ranks and both ranks of each actor load
    every update."""
    from tests.integration.two_rank_engine import two_rank_engine

    extra = ("trainer.num_learners=1", "rollout.num_actors=2", "rollout.num_cpus_per_actor=0.5", "sft.steps=0")
    cfg, model_path = resolve_inputs(config(tmp_path, 2, *extra))
    actors = create_rollout_actors(cfg.rollout, model_path, seed=cfg.seed, engine_factory=two_rank_engine)
    try:
        assert ray.get([a.sync_ranks.remote() for a in actors.values()]) == [2, 2]
        result = train(cfg, run_dir=tmp_path / "run", model_path=model_path, rollout_actors=actors)
        assert result.error is None
        assert ray.get([a.weight_version.remote() for a in actors.values()]) == [2, 2]
        # The second rank's copy equals what the first rank loaded into the model, for every tensor.
        shadows = [a.__ray_call__.remote(lambda actor: actor._engine.shadow_matches()) for a in actors.values()]
        assert ray.get(shadows) == [True, True]
    finally:
        for actor in actors.values():
            ray.kill(actor)
    assert [steps(tmp_path / "run")[s]["weight_version"] for s in (1, 2)] == [1, 2]
