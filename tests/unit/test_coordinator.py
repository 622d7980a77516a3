"""The rollout coordinator: dealing groups to ranks (pure), and ``RolloutCoordinator`` on a
local Ray cluster with scripted rollout engines (a test double, ``tests.unit.scripted_engine``) in the real
``RolloutActor``, the real prompt reader, reward pool and weight sync.

The real engines in the whole loop are covered by ``tests/integration/test_training_loop.py``,
``test_fault_tolerance.py`` and ``test_learning.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import ray
import torch

from mapo_ray.config import load_config
from mapo_ray.coordinator import Generated, RankChannel, RolloutCoordinator, deal, even_sizes
from mapo_ray.data.stream import DataPosition
from mapo_ray.job import resolve_inputs
from mapo_ray.learner import Experience, batch_advantages
from mapo_ray.models.tiny import tiny_vl_path
from mapo_ray.reward import GroupResult
from mapo_ray.rollout.actor import create_rollout_actors
from mapo_ray.telemetry.ledger import LEDGER_FILE, read_ledger
from mapo_ray.types import Group, GroupSummary, Sample
from tests.unit.scripted_engine import scripted_engine

TIMEOUT_S = 120.0


# ------------------------------------------------------------------------- dealing (pure)


def test_even_sizes_fill_the_actors_in_order():
    assert even_sizes(7, ["a", "b", "c"]) == {"a": 3, "b": 3, "c": 1}
    assert even_sizes(2, ["a", "b", "c"]) == {"a": 1, "b": 1}
    assert even_sizes(6, ["a", "b"]) == {"a": 3, "b": 3}


def scripted_batch(groups: int, seed: int = 0) -> tuple[list[Generated], list[GroupResult]]:
    """``groups`` generated groups of 4 samples with varied lengths and rewards."""
    g = torch.Generator().manual_seed(seed)
    generated, results = [], []
    for i in range(groups):
        lengths = torch.randint(1, 300, (4,), generator=g).tolist()
        samples = [Sample(f"u{i}", [1] * (10 + i), [2] * n, [-0.5] * n, "x", "stop", 0) for n in lengths]
        # "ref" strings stand in for the object references the coordinator passes on.
        generated.append(Generated(GroupSummary.of(Group(f"u{i}", "a", samples)), f"req{i}", f"pay{i}"))
        rewards = torch.randint(0, 3, (4,), generator=g).div(2).tolist()
        results.append(GroupResult(f"u{i}", [{"overall": r} for r in rewards], [None] * 4))
    return generated, results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_deal_gives_each_rank_whole_groups_once_balanced_by_tokens(world_size):
    generated, results = scripted_batch(24)
    config = load_config(preset="cpu-tiny")
    shards = deal(5, generated, results, config.algo, world_size)
    assert len(shards) == world_size
    dealt = sorted(i for s in shards for i in s.group_ids)
    assert dealt == list(range(24))
    for shard in shards:
        assert shard.step == 5 and shard.group_ids == sorted(shard.group_ids)
        assert shard.payloads == [f"pay{i}" for i in shard.group_ids]
        assert shard.rewards == [results[i].rewards for i in shard.group_ids]
    loads = [sum(generated[i].summary.tokens for i in s.group_ids) for s in shards]
    biggest = max(g.summary.tokens for g in generated)
    assert max(loads) - min(loads) <= biggest  # greedy largest-first keeps them within one group


@pytest.mark.parametrize(
    "overrides",
    [["algo.estimator=mapo"], ["algo.estimator=grpo"], ["algo.estimator=mapo_random"], ["algo.estimator=rloo"],
     ["algo.estimator=mapo", "rollout.max_new_tokens=300", "algo.overlong_buffer_len=100"]],
)
def test_each_rank_computes_its_groups_advantages_exactly_as_the_whole_batch_would(overrides):
    config = load_config(preset="cpu-tiny", overrides=overrides)
    generated, results = scripted_batch(40, seed=1)

    def experiences(group_ids: Iterable[int]) -> list[Experience]:
        out = []
        for i in group_ids:
            summary = generated[i].summary
            for n, r in zip(summary.response_lengths, results[i].rewards):
                out.append(Experience([1] * summary.prompt_length, [2] * n, [-0.5] * n, i, r, None, 0))
        return out

    whole = batch_advantages(experiences(range(40)), config, 3, torch.device("cpu"))
    offsets = [4 * i for i in range(41)]
    for shard in deal(3, generated, results, config.algo, 3):
        mine = batch_advantages(experiences(shard.group_ids), config, 3, torch.device("cpu"))
        expected = torch.cat([whole[offsets[i] : offsets[i + 1]] for i in shard.group_ids])
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------- the coordinator


@pytest.fixture(scope="module")
def policy():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vl_path())


def start(tmp_path, *overrides: str) -> tuple[RolloutCoordinator, dict]:
    config, model_path = resolve_inputs(
        load_config(
            preset="cpu-tiny",
            overrides=[
                "trainer.prompts_per_step=6",
                "trainer.total_steps=4",
                "trainer.eval_every=2",
                "trainer.eval_prompts=8",
                "rollout.group_size=4",
                "rollout.num_actors=2",
                "rollout.num_cpus_per_actor=0.25",
                "sft.steps=0",
                "data.synthetic_train=24",
                "data.synthetic_test=8",
                *overrides,
            ],
        )
    )
    actors = create_rollout_actors(config.rollout, model_path, engine_factory=scripted_engine, prefix="scripted")
    channel = RankChannel(0, 1, on_sync=lambda: None)
    coordinator = RolloutCoordinator(
        config, actors=actors, model_path=str(model_path), run_dir=tmp_path, channel=channel, policy=lambda: None
    )
    return coordinator, actors


def stop(coordinator: RolloutCoordinator, actors: dict) -> None:
    coordinator.close()
    for actor in actors.values():
        ray.kill(actor)


def test_a_batch_is_rolled_out_scored_and_dealt_and_the_samples_carry_the_synced_version(
    ray_cluster, tmp_path, policy
):
    coordinator, actors = start(tmp_path)
    try:
        shard, metrics = coordinator.next_batch(1)
        assert shard.group_ids == list(range(6)) and len(shard.payloads) == 6
        batch = shard.experiences(TIMEOUT_S)
        assert len(batch) == 24 and {e.weight_version for e in batch} == {0}
        assert [e.group_id for e in batch] == [i for i in range(6) for _ in range(4)]
        assert [len(e.response_ids) for e in batch[:4]] == [3, 4, 5, 6]
        assert [e.reward for e in batch] == [r for rewards in shard.rewards for r in rewards]
        assert [e.success for e in batch] == [ok for oks in shard.successes for ok in oks]
        assert metrics["rollout/staleness"] == 0 and metrics["data/prompts"] >= 6
        assert metrics["response/length_mean"] == pytest.approx(4.5)
        assert 0 < metrics["reward/success"] < 1
        assert coordinator.data_position() == DataPosition(0, 6)

        assert coordinator.sync_weights(policy) == 1
        shard, metrics = coordinator.next_batch(2)
        assert {e.weight_version for e in shard.experiences(TIMEOUT_S)} == {1}
        assert metrics["rollout/staleness"] == 0
        evaluation = coordinator.evaluate(2)
        assert evaluation["eval/prompts"] == 8 and 0 <= evaluation["eval/accuracy"] <= 1
        # The certainty metrics of the last batch, with the largest advantage the ranks report.
        certainty = coordinator.certainty_metrics(1.5)
        assert certainty["certainty/num_groups"] == 6 and certainty["certainty/max_abs_advantage"] == 1.5
    finally:
        stop(coordinator, actors)
    ledger = read_ledger(tmp_path / LEDGER_FILE)
    assert sorted(ledger) == [1, 2] and [len(ledger[s]) for s in (1, 2)] == [6, 6]
    assert len({uid for pairs in ledger.values() for uid, _ in pairs}) == 12  # 12 different prompts of 24


def test_async_launches_ahead_and_the_checkpoint_position_is_the_oldest_batch_in_flight(ray_cluster, tmp_path):
    coordinator, actors = start(tmp_path, "trainer.mode=async", "trainer.max_staleness=1")
    try:
        coordinator.next_batch(1)
        assert len(coordinator.pending) == 1  # step 2's batch, sampled with version 0 meanwhile
        assert coordinator.data_position() == DataPosition(0, 6)
        shard, metrics = coordinator.next_batch(2)
        assert metrics["rollout/staleness"] == 0  # no update was sent in between
    finally:
        stop(coordinator, actors)


def test_dynamic_sampling_keeps_only_informative_groups_and_records_every_scored_prompt(ray_cluster, tmp_path):
    coordinator, actors = start(tmp_path, "trainer.dynamic_sampling=true", "trainer.max_extra_rounds=3")
    try:
        shard, metrics = coordinator.next_batch(1)
        # Only the mixed groups (a third of the prompts) are kept, from up to four rounds.
        assert all(0 < sum(oks) < len(oks) for oks in shard.successes)
        assert metrics["dynamic_sampling/kept_groups"] == len(shard.group_ids) > 0
        rounds = int(metrics["dynamic_sampling/extra_rounds"])
        assert rounds >= 1
    finally:
        stop(coordinator, actors)
    (scored,) = read_ledger(tmp_path / LEDGER_FILE).values()
    assert len(scored) == 6 * (rounds + 1)
