"""``Learner.advantages``: DAPO's overlong shaping of the rewards, success on the graded reward (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mapo_ray.algo import compute_advantages, overlong_penalty
from mapo_ray.config import load_config
from mapo_ray.learner import Experience
from mapo_ray.learner.learner import Learner


def _experience(group: int, reward: float, length: int) -> Experience:
    return Experience([1, 2], list(range(length)), [0.0] * length, group, reward, None, 0)


def _advantages(batch, *overrides):
    config = load_config(overrides=["rollout.max_new_tokens=20", "algo.estimator=grpo", *overrides])
    learner = SimpleNamespace(config=config, device=torch.device("cpu"), step=0)
    return Learner.advantages(learner, batch)


# Group 0: equal rewards, lengths 4 (no penalty), 18 (in the buffer), 20 and 25 (full penalty).
# Group 1: one success of the right length and one at the limit.
BATCH = [
    _experience(0, 1.0, 4),
    _experience(0, 1.0, 18),
    _experience(0, 1.0, 20),
    _experience(0, 1.0, 25),
    _experience(1, 1.0, 10),
    _experience(1, 0.0, 20),
]


def test_without_a_buffer_the_rewards_are_used_as_graded():
    assert torch.equal(_advantages(BATCH)[:4], torch.zeros(4))


def test_overlong_penalty_shapes_the_rewards_before_the_estimator():
    shaped = _advantages(BATCH, "algo.overlong_buffer_len=8", "algo.overlong_penalty_factor=0.5")
    lengths = torch.tensor([len(e.response_ids) for e in BATCH])
    # An independent computation: 0 up to 20 - 8 = 12 tokens, then linear to -0.5 at 20.
    penalty = torch.tensor([-0.5 * min(max(n - 12, 0) / 8, 1.0) for n in lengths.tolist()], dtype=torch.float64)
    assert torch.allclose(penalty, overlong_penalty(lengths, 20, 8, 0.5).double())
    scores = torch.tensor([e.reward for e in BATCH], dtype=torch.float64) + penalty
    success = torch.tensor([e.reward >= 1.0 for e in BATCH])
    expected = compute_advantages(
        scores, torch.tensor([e.group_id for e in BATCH]), "grpo", success=success, std="population", eps=1e-6
    )
    torch.testing.assert_close(shaped, expected)
    # Equal graded rewards now differ by length: the longest responses get the lowest advantage.
    assert shaped[0] > shaped[1] > shaped[2] == shaped[3]


def test_success_stays_defined_on_the_graded_reward():
    """MAPO's certainty p counts successes on the unshaped reward: a correct response at the
    length limit (shaped reward 1 - 1 = 0) still counts as a success."""
    lengths, rewards = [20, 20, 5, 5, 5], [1.0, 1.0, 1.0, 0.0, 1.0]
    batch = [_experience(0, r, n) for r, n in zip(rewards, lengths)]
    shaped = _advantages(batch, "algo.overlong_buffer_len=10", "algo.estimator=mapo")
    scores = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    group = torch.zeros(5, dtype=torch.long)
    success = torch.tensor([True, True, True, False, True])
    expected = compute_advantages(scores, group, "mapo", success=success, std="population", eps=1e-6)
    torch.testing.assert_close(shaped, expected)
    # Success measured on the shaped reward would be p = 2/5, not 4/5: a different mix.
    other = compute_advantages(scores, group, "mapo", std="population", eps=1e-6)
    assert not torch.allclose(shaped, other)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_token_sum_modes_divide_by_responses(mode):
    from mapo_ray.learner.learner import _loss_denominator

    assert _loss_denominator([3, 0, 5], mode) == 3.0
