"""Policy losses, KL estimators and DAPO shaping against straightforward references."""

from __future__ import annotations

import math

import pytest
import torch

from mapo_ray.algo import (
    KL_ESTIMATORS,
    aggregate_loss,
    compute_policy_loss,
    dapo_group_filter,
    entropy_from_logits,
    overlong_penalty,
)
from mapo_ray.algo.losses import gspo_loss, ppo_loss
from mapo_ray.config import AlgoConfig


def ppo_reference(logp, old, adv, mask, low, high, c):
    """Per-token loop over the PPO / dual-clip definitions, then a token mean."""
    total, count, clipped = 0.0, 0, 0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            l1, l2 = -a * r, -a * min(max(r, 1 - low), 1 + high)
            loss = max(l1, l2)
            clipped += l2 > l1
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            total += loss
            count += 1
    return total / count, clipped / count


def random_batch(seed, n=6, length=9, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, length, generator=g) * 3
    logp = old + (torch.rand(n, length, generator=g) - 0.5) * 2 * spread
    adv = (torch.randn(n, generator=g) * 2).unsqueeze(-1).expand(n, length).clone()
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return logp, old, adv, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dual", [None, 3.0, 1.2])
def test_ppo_matches_reference(seed, dual):
    logp, old, adv, mask = random_batch(seed, spread=1.5)
    loss, metrics = ppo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip_c=dual)
    ref_loss, ref_clip = ppo_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.3, dual)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(ref_clip, abs=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx(((old - logp) * mask).sum().item() / mask.sum().item(), rel=1e-5)


def single_token(ratio, advantage, **kw):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, _ = ppo_loss(logp, old, torch.full((1, 1), advantage), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item()


def test_clip_boundaries_and_gradient_signs():
    kw = dict(clip_low=0.2, clip_high=0.3, dual_clip_c=3.0)
    # Positive advantage: gradient pushes log-prob up until the ratio passes 1 + high.
    loss, grad = single_token(1.1, 2.0, **kw)
    assert loss == pytest.approx(-2.2) and grad < 0
    loss, grad = single_token(1.31, 2.0, **kw)
    assert loss == pytest.approx(-2.6) and grad == 0.0
    # Negative advantage: pushes down until the ratio falls under 1 - low.
    loss, grad = single_token(0.9, -1.0, **kw)
    assert loss == pytest.approx(0.9) and grad > 0
    loss, grad = single_token(0.79, -1.0, **kw)
    assert loss == pytest.approx(0.8) and grad == 0.0
    # Dual clip: a huge ratio with A < 0 is capped at -A c and stops pushing.
    loss, grad = single_token(5.0, -1.0, **kw)
    assert loss == pytest.approx(3.0) and grad == 0.0
    loss, grad = single_token(5.0, -1.0, clip_low=0.2, clip_high=0.3, dual_clip_c=None)
    assert loss == pytest.approx(5.0) and grad > 0


def test_masked_tokens_have_no_effect():
    logp, old, adv, mask = random_batch(0)
    noisy = logp.clone()
    noisy[~mask] = 50.0
    noisy.requires_grad_(True)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        a, _ = ppo_loss(logp, old, adv, mask, agg_mode=mode)
        b, _ = ppo_loss(noisy, old, adv, mask, agg_mode=mode)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        noisy.grad = None
        b.backward()
        assert torch.all(noisy.grad[~mask] == 0)


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(36 / 5)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 15) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 30 + 0) / 3)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 4 + 30 / 4 + 0) / 3)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(36 / 30)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_loss(loss, mask, "token-sum")


def test_gspo_uses_one_ratio_per_sequence():
    logp, old, adv, mask = random_batch(3, n=12, spread=0.6)
    logp.requires_grad_(True)
    loss, metrics = gspo_loss(logp, old, adv, mask, clip_low=0.05, clip_high=0.05)
    m = mask.float()
    seq_ratio = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1)).detach()
    clipped = seq_ratio.clamp(0.95, 1.05)
    a = adv[:, 0]
    per_seq = torch.maximum(-a * seq_ratio, -a * clipped)
    assert loss.item() == pytest.approx(per_seq.mean().item(), rel=1e-5)
    loss.backward()
    # A sequence outside the clip band (on the side the clip binds) gets no gradient.
    binding = (-a * clipped) > (-a * seq_ratio)
    assert binding.any() and (~binding).any()
    assert torch.all(logp.grad[binding] == 0)
    assert torch.all(logp.grad[~binding][mask[~binding]] != 0)


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 5, generator=g) * 2
    ref = -torch.rand(4, 5, generator=g) * 2
    torch.testing.assert_close(KL_ESTIMATORS.get("k1")(logp, ref), logp - ref)
    torch.testing.assert_close(KL_ESTIMATORS.get("k2")(logp, ref), 0.5 * (logp - ref) ** 2)
    k3 = KL_ESTIMATORS.get("low_var_kl")(logp, ref)
    torch.testing.assert_close(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert torch.all(k3 >= 0)
    assert KL_ESTIMATORS.get("k3") is KL_ESTIMATORS.get("low_var_kl")
    extreme = KL_ESTIMATORS.get("k3")(torch.tensor([0.0]), torch.tensor([100.0]))
    assert extreme.item() == 10.0
    # Monte-Carlo: k1 and k3 both estimate KL(p || q) for samples drawn from p.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.4, 0.4])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    for name in ("k1", "k3"):
        est = KL_ESTIMATORS.get(name)(p.log()[x], q.log()[x]).mean().item()
        assert est == pytest.approx(exact, abs=5e-3), name


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    ent = entropy_from_logits(logits)
    assert ent[0].item() == pytest.approx(math.log(4))
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_compute_policy_loss_adds_kl_term():
    logp, old, adv, mask = random_batch(1)
    ref = old - 0.1
    cfg = AlgoConfig(kl_coef=0.5, kl_estimator="k1")
    total, metrics = compute_policy_loss(cfg, logp, old, adv, mask, ref_log_prob=ref)
    pg, _ = ppo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip_c=3.0)
    kl = ((logp - ref) * mask).sum() / mask.sum()
    assert total.item() == pytest.approx((pg + 0.5 * kl).item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match="kl_coef"):
        compute_policy_loss(cfg, logp, old, adv, mask)
    no_kl, metrics = compute_policy_loss(AlgoConfig(kl_coef=0.0), logp, old, adv, mask)
    assert no_kl.item() == pytest.approx(pg.item()) and "kl" not in metrics


def test_dapo_group_filter_and_overlong_penalty():
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    gid = torch.tensor([3, 3, 5, 5, 8, 8, 9])
    assert dapo_group_filter(acc, gid).tolist() == [False, False, True, True, False, False, False]
    lengths = torch.tensor([10, 80, 90, 100, 150])
    penalty = overlong_penalty(lengths, max_length=100, buffer_length=20, penalty_factor=1.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, max_length=10, buffer_length=20)


@pytest.mark.parametrize("seed", range(4))
def test_token_sum_aggregations_match_an_independent_loop(seed):
    """seq-mean-token-sum: mean over responses of each response's token sum (verl's mode).
    seq-mean-token-sum-norm, Dr. GRPO: the same sums over a constant, the max response
    length (oat's masked_sum with constant_normalizer=generate_max_length, then the mean)."""
    gen = torch.Generator().manual_seed(seed)
    n, width, max_new_tokens = 5, 7, 16
    loss = torch.randn(n, width, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, width + 1, (n,), generator=gen).tolist()
    mask = torch.tensor([[t < length for t in range(width)] for length in lengths])
    sums = [sum(float(loss[i, t]) for t in range(lengths[i])) for i in range(n)]
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(sum(sums) / n, abs=1e-12)
    dr_grpo = sum(s / max_new_tokens for s in sums) / n
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_length=max_new_tokens).item()
    assert got == pytest.approx(dr_grpo, abs=1e-12)


def test_compute_policy_loss_runs_gspo_with_its_own_clip_and_aggregation():
    """algo.clip_ratio_* / dual_clip_c / loss_agg_mode left null: GSPO's own 3e-4 / 4e-4,
    no dual clip, seq-mean-token-mean; not PPO's 0.2 / 0.3."""
    logp, old, adv, mask = random_batch(1)
    config = AlgoConfig(policy_loss="gspo", kl_coef=0.0)
    loss, _ = compute_policy_loss(config, logp, old, adv, mask)
    expected, _ = gspo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    ppo_clips, _ = gspo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip_c=3.0, agg_mode="token-mean")
    assert loss.item() != pytest.approx(ppo_clips.item(), rel=1e-3)
    # A key the user sets wins over the loss's default.
    wide, _ = compute_policy_loss(AlgoConfig(policy_loss="gspo", kl_coef=0.0, clip_ratio_high=0.3), logp, old, adv, mask)
    assert wide.item() == pytest.approx(gspo_loss(logp, old, adv, mask, clip_high=0.3)[0].item(), rel=1e-6)
