"""The rollout coordinator's pure parts: how a batch is cut into actor shares and dealt to
learner ranks, and that each rank's advantages of its own groups are the whole batch's.

``tests/integration/test_coordinator.py`` runs the coordinator itself with scripted actors.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from mapo_ray.config import load_config
from mapo_ray.coordinator import Generated, deal, even_sizes
from mapo_ray.learner import Experience, batch_advantages
from mapo_ray.reward import GroupResult
from mapo_ray.types import Group, GroupSummary, Sample


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
