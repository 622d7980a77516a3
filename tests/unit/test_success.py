"""What counts as a success (``algo.success``) for MAPO's certainty, the estimators and DAPO's filter."""

from __future__ import annotations

import pytest
import torch

from mapo_ray.algo import compute_advantages, group_stats
from mapo_ray.config import AlgoConfig, ConfigError, load_config
from mapo_ray.coordinator import Generated, accuracy, deal, experiences_of, keep_informative, succeeded
from mapo_ray.reward import GroupResult
from mapo_ray.reward.label import score_label
from mapo_ray.types import Group, GroupPayload, GroupSummary, Sample

LABELS = ("red", "blue")
# Right answer, broken format (0.9) three times, then right answer in the format (1.0).
RESPONSES = ["red", "red", "red", "<think>hm</think> \\boxed{red}"]


def graded(responses: list[str], uid: str = "q0", answer: str = "red") -> GroupResult:
    scores = [score_label(r, answer, labels=LABELS) for r in responses]
    return GroupResult(uid, scores, [None] * len(scores))


def group_of(result: GroupResult) -> Group:
    samples = [Sample(result.uid, [1], [2], [-0.5], "x", "stop", 0) for _ in result.scores]
    return Group(result.uid, "red", samples)


def test_the_grader_gives_the_rewards_the_example_needs():
    assert graded(RESPONSES).rewards == pytest.approx([0.9, 0.9, 0.9, 1.0])


def test_full_marks_by_default_gives_the_papers_certainty_and_lambda():
    result = graded(RESPONSES)
    algo = AlgoConfig()
    assert algo.success == "full_marks"
    ok = succeeded(result, algo.success, algo.success_threshold)
    assert ok == [False, False, False, True]

    scores = torch.tensor(result.rewards, dtype=torch.float64)
    ids = torch.zeros(4, dtype=torch.long)
    stats = group_stats(scores, ids, success=torch.tensor(ok))
    assert stats.success_rate.item() == 0.25
    assert stats.tcr_weight.item() == pytest.approx(0.25)  # 1 - 4 * 0.25 * 0.75

    # MAPO = lambda * APD + (1 - lambda) * GRPO, against an independent computation.
    x = [0.9, 0.9, 0.9, 1.0]
    mean = sum(x) / 4
    sigma = (sum((v - mean) ** 2 for v in x) / 4) ** 0.5
    eps = 1e-6
    expected = [0.25 * (v - mean) / (mean + eps) + 0.75 * (v - mean) / (sigma + eps) for v in x]
    got = compute_advantages(scores, ids, "mapo", success=torch.tensor(ok), eps=eps)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_the_accuracy_reading_counts_a_right_answer_in_any_format():
    result = graded(RESPONSES)
    assert succeeded(result, "accuracy", 1.0) == [True, True, True, True]
    scores = torch.tensor(result.rewards, dtype=torch.float64)
    stats = group_stats(scores, torch.zeros(4, dtype=torch.long), success=torch.ones(4, dtype=torch.bool))
    assert stats.success_rate.item() == 1.0 and stats.tcr_weight.item() == 1.0


def test_a_grader_without_an_accuracy_component_uses_the_threshold_either_way():
    result = GroupResult("q", [{"overall": 0.8}, {"overall": 1.0}, {"overall": 0.0}], [None, None, "timeout"])
    for definition in ("full_marks", "accuracy"):
        assert succeeded(result, definition, 1.0) == [False, True, False]
        assert succeeded(result, definition, 0.75) == [True, True, False]


def test_the_accuracy_metric_is_the_answers_whatever_the_success_definition():
    assert accuracy([graded(RESPONSES), graded(["blue", "blue"], uid="q1")], 1.0) == pytest.approx(4 / 6)


@pytest.mark.parametrize("definition, kept", [("full_marks", ["q0"]), ("accuracy", [])])
def test_dapo_filter_follows_the_definition(definition, kept):
    results = [graded(RESPONSES), graded(["blue", "<think>a</think> \\boxed{blue}"], uid="q1")]
    kept_indices = keep_informative(results, AlgoConfig(success=definition))
    assert [results[i].uid for i in kept_indices] == kept


def test_experiences_carry_the_configured_success():
    result = graded(RESPONSES)
    group = group_of(result)
    # The coordinator only passes the object references on; strings stand in for them here.
    generated = [Generated(GroupSummary.of(group), request="request-ref", payload="payload-ref")]
    for definition, expected in (("full_marks", [False, False, False, True]), ("accuracy", [True] * 4)):
        (shard,) = deal(3, generated, [result], AlgoConfig(success=definition), world_size=1)
        assert shard.payloads == ["payload-ref"] and shard.group_ids == [0] and shard.successes == [expected]
        batch = experiences_of([GroupPayload(group, ())], shard.group_ids, shard.rewards, shard.successes)
        assert [e.success for e in batch] == expected
        assert [e.reward for e in batch] == pytest.approx([0.9, 0.9, 0.9, 1.0])


def test_a_wrong_definition_is_named():
    with pytest.raises(ConfigError, match="'algo.success': value 'score'.*'full_marks', 'accuracy'"):
        load_config(preset="cpu-tiny", overrides=["algo.success=score"])
