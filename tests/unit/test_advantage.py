"""Advantage estimators against their definitions (the paper's worked example included)
and a naive per-group reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapo_ray.algo import (
    ADVANTAGE_ESTIMATORS,
    advantage_diagnostics,
    compute_advantages,
    expand_to_tokens,
)

EPS = 1e-6


def reference(scores, group_ids, estimator, success=None, threshold=1.0, std="population", lambdas=None):
    """Naive per-group advantages in plain Python floats, straight from the definitions."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    out = [0.0] * len(scores)
    for gid, members in groups.items():
        r = [scores[i] for i in members]
        n = len(r)
        mu = sum(r) / n
        if max(r) == min(r):
            continue
        dof = n if std == "population" else n - 1
        sigma = math.sqrt(sum((x - mu) ** 2 for x in r) / dof)
        ok = [success[i] for i in members] if success is not None else [x >= threshold for x in r]
        p = sum(ok) / n
        lam = 1 - 4 * p * (1 - p) if lambdas is None else lambdas[gid]
        for i in members:
            z = (scores[i] - mu) / (sigma + EPS)
            a = (scores[i] - mu) / (abs(mu) + EPS)
            out[i] = {
                "grpo": z,
                "apd": a,
                "mapo": (1 - lam) * z + lam * a,
                "mapo_random": (1 - lam) * z + lam * a,
                "dr_grpo": scores[i] - mu,
                "rloo": scores[i] - (sum(r) - scores[i]) / (n - 1),
            }[estimator]
    return out


def adv(scores, groups, estimator="mapo", **kw):
    return compute_advantages(
        torch.tensor(scores, dtype=torch.float32), torch.tensor(groups, dtype=torch.int64), estimator, **kw
    )


def test_paper_worked_example_grpo_and_its_mirror():
    high = adv([0.9, 1, 1, 1], [0, 0, 0, 0], "grpo")
    low = adv([0, 0.1, 0.1, 0.1], [0, 0, 0, 0], "grpo")
    expected = torch.tensor([-1.732, 0.577, 0.577, 0.577])
    torch.testing.assert_close(high, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(low, expected, atol=1e-3, rtol=0)


def test_mapo_separates_the_mirror():
    high = adv([0.9, 1, 1, 1], [0, 0, 0, 0], "mapo")
    low = adv([0, 0.1, 0.1, 0.1], [0, 0, 0, 0], "mapo")
    # [0.9, 1, 1, 1]: p = 3/4, lambda = 1/4; [0, .1, .1, .1]: p = 0, lambda = 1 (pure APD).
    torch.testing.assert_close(high[0], torch.tensor(0.75 * -math.sqrt(3) + 0.25 * (-0.075 / 0.975)), atol=1e-4, rtol=0)
    torch.testing.assert_close(low, torch.tensor([-1.0, 1 / 3, 1 / 3, 1 / 3]), atol=1e-4, rtol=0)
    assert not torch.allclose(high, low)


def test_mapo_is_grpo_at_half_and_apd_at_certainty():
    half = [0.0, 1.0, 0.0, 1.0, 0.3, 1.0]  # p = 1/2
    torch.testing.assert_close(adv(half, [5] * 6, "mapo"), adv(half, [5] * 6, "grpo"))
    for certain in ([0.0, 0.5, 0.2, 0.7], [1.0, 1.0, 1.0, 1.0, 1.0]):  # p = 0 (and p = 1 is constant)
        g = [1] * len(certain)
        torch.testing.assert_close(adv(certain, g, "mapo"), adv(certain, g, "apd"))
    succ = torch.tensor([True, True, True])  # explicit success: p = 1 though rewards differ
    torch.testing.assert_close(
        adv([0.2, 0.6, 0.9], [0, 0, 0], "mapo", success=succ), adv([0.2, 0.6, 0.9], [0, 0, 0], "apd")
    )


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_equal_rewards_and_singletons_give_exact_zero(estimator):
    scores = [0.1, 0.1, 0.1, 0.7, 1e-30, 1e-30, 0.3]
    groups = [4, 4, 4, 9, 2, 2, 6]  # 4 and 2: all equal; 9 and 6: groups of one
    out = adv(scores, groups, estimator, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros(7))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_shuffling_permutes_and_relabelling_changes_nothing(estimator):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(60, generator=g).round(decimals=1)
    # mapo_random gives group g the g-th draw: it needs ids >= 0, and a relabelling changes its draws.
    shift = 3 if estimator == "mapo_random" else -3
    groups = torch.randint(0, 7, (60,), generator=g) * 1000 + shift
    base = compute_advantages(scores, groups, estimator, generator=torch.Generator().manual_seed(5))
    perm = torch.randperm(60, generator=g)
    shuffled = compute_advantages(scores[perm], groups[perm], estimator, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(shuffled, base[perm])
    if estimator != "mapo_random":
        relabelled = compute_advantages(scores, groups * 7 + 11, estimator, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(relabelled, base)


def test_variable_group_sizes_and_noncontiguous_ids_match_reference():
    scores = [1.0, 0.0, 0.5, 1.0, 0.1, 1.0, 0.9, 0.0, 0.0]
    groups = [10, 3, 10, 7, 3, 10, 7, 3, 99]
    for estimator in ("grpo", "apd", "mapo", "dr_grpo", "rloo"):
        torch.testing.assert_close(
            adv(scores, groups, estimator),
            torch.tensor(reference(scores, groups, estimator)),
            atol=1e-5,
            rtol=1e-5,
        )


def test_unbiased_std():
    scores, groups = [0.9, 1.0, 1.0, 1.0], [0, 0, 0, 0]
    out = adv(scores, groups, "grpo", std="unbiased")
    torch.testing.assert_close(out, torch.tensor(reference(scores, groups, "grpo", std="unbiased")))
    torch.testing.assert_close(out[0], torch.tensor(-1.5), atol=1e-4, rtol=0)


def test_mapo_random_gives_group_g_the_gth_draw_so_any_subset_of_groups_gets_the_same_weights():
    scores = torch.tensor([0.0, 1.0, 0.2, 0.4, 0.9, 0.1])
    groups = torch.tensor([8, 8, 8, 2, 2, 2])
    draws = torch.rand(9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = reference(scores.tolist(), groups.tolist(), "mapo_random", lambdas={2: draws[2].item(), 8: draws[8].item()})
    out = compute_advantages(scores, groups, "mapo_random", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
    # A learner rank's shard: groups 0..511 of a batch split in two, each half computed alone.
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(512 * 4, generator=g).round(decimals=1)
    groups = torch.arange(512).repeat_interleave(4)
    whole = compute_advantages(scores, groups, "mapo_random", generator=torch.Generator().manual_seed(7))
    for part in (groups % 2 == 0, groups % 2 == 1, groups >= 300):
        alone = compute_advantages(scores[part], groups[part], "mapo_random", generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(alone, whole[part], rtol=0, atol=0)
    with pytest.raises(ValueError, match="group ids >= 0"):
        compute_advantages(scores[:4], torch.tensor([-1, -1, 0, 0]), "mapo_random")


def test_threshold_and_huge_values_stay_finite():
    out = adv([3e38, -3e38, 1.0, 0.0], [0, 0, 1, 1], "apd")
    assert torch.isfinite(out).all()
    out = adv([0.95, 0.95, 0.5], [0, 0, 0], "mapo", success_threshold=0.9)
    p = 2 / 3
    lam = 1 - 4 * p * (1 - p)
    expected = reference([0.95, 0.95, 0.5], [0, 0, 0], "mapo", threshold=0.9)
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert 0 < lam < 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="finite"):
        adv([0.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="group_ids"):
        adv([0.0, 1.0], [0])
    with pytest.raises(ValueError, match="unknown advantage estimator 'mapp'.*mapo"):
        adv([0.0, 1.0], [0, 0], "mapp")
    with pytest.raises(ValueError, match="std"):
        adv([0.0, 1.0], [0, 0], std="sample")


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0, 1, width=32), st.integers(-5, 5)),
        min_size=1,
        max_size=40,
    ),
    estimator=st.sampled_from(["grpo", "apd", "mapo", "dr_grpo", "rloo"]),
    std=st.sampled_from(["population", "unbiased"]),
)
def test_matches_naive_reference_on_random_batches(data, estimator, std):
    scores = [s for s, _ in data]
    groups = [g for _, g in data]
    out = adv(scores, groups, estimator, std=std)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = torch.tensor(reference(torch.tensor(scores).tolist(), groups, estimator, std=std))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=20), st.integers(1, 4))
def test_finite_for_any_finite_input(scores, num_groups):
    groups = [i % num_groups for i in range(len(scores))]
    for estimator in ADVANTAGE_ESTIMATORS.names():
        out = adv(scores, groups, estimator, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all(), estimator


def test_diagnostics():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    advantages = compute_advantages(scores, groups, "mapo")
    d = advantage_diagnostics(scores, groups, advantages)
    torch.testing.assert_close(d.success_rate, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(d.tcr_weight, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(d.mean, torch.tensor([1.0, 0.5, 1 / 6], dtype=torch.float64))
    assert d.zero_variance.tolist() == [True, False, False]
    m = d.metrics()
    assert m["certainty/lambda_mean"] == pytest.approx(2 / 3)
    assert m["certainty/zero_variance_frac"] == pytest.approx(1 / 3)
    assert m["certainty/p_extreme_frac"] == pytest.approx(2 / 3)
    assert m["certainty/max_abs_advantage"] == pytest.approx(advantages.abs().max().item())
    assert d.p_histogram() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert sum(v for k, v in m.items() if "/p_hist/" in k) == 3


def test_expand_to_tokens():
    a = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(expand_to_tokens(a, mask), torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]))
    torch.testing.assert_close(expand_to_tokens(a, mask.long()), expand_to_tokens(a, mask))
    with pytest.raises(ValueError, match="response_mask"):
        expand_to_tokens(a, mask[0])


def test_registry_extends_with_one_function_and_one_line():
    @ADVANTAGE_ESTIMATORS.register("test_sign")
    def sign(stats, generator=None):
        return stats.centered.sign()

    try:
        assert adv([0.0, 1.0, 0.5], [0, 0, 0], "test_sign").tolist() == [-1.0, 1.0, 0.0]
    finally:
        ADVANTAGE_ESTIMATORS._table.pop("test_sign")
