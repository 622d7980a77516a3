"""Rollout corrections (TIS, sequence TIS, masking, decoupled PPO): reduction to plain PPO,
gradients against an independent float64 computation, config resolution and checks."""

from __future__ import annotations

import math

import pytest
import torch

from mapo_ray.algo import ROLLOUT_CORRECTIONS, compute_policy_loss
from mapo_ray.config import ConfigError, load_config, resolve_rollout_correction

VARIANTS = ["tis", "seq_tis", "mask", "decoupled"]
CAP = 2.0


def _algo(*overrides: str):
    return load_config(overrides=["algo.kl_coef=0", *overrides]).algo


def _batch(seed: int = 0, dtype=torch.float32):
    """(N=3, L=5) log-probs with right padding: lengths 5, 3, 1."""
    g = torch.Generator().manual_seed(seed)
    n, length = 3, 5
    mask = torch.arange(length) < torch.tensor([5, 3, 1]).unsqueeze(-1)
    old = -torch.rand(n, length, generator=g, dtype=dtype) * 2 - 0.1
    log_prob = old + (torch.rand(n, length, generator=g, dtype=dtype) - 0.5) * 0.6
    adv = torch.tensor([1.0, -1.5, 0.7], dtype=dtype).unsqueeze(-1).expand(n, length).clone()
    # Padding holds junk, as a bug upstream might leave there: it must not leak in.
    log_prob = torch.where(mask, log_prob, torch.full_like(log_prob, -50.0))
    return log_prob, old, adv, mask


@pytest.mark.parametrize("policy_loss", ["ppo", "gspo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_behaviour_equal_to_old_is_plain_ppo_exactly(variant, agg, policy_loss):
    algo = _algo(f"algo.policy_loss={policy_loss}", f"algo.loss_agg_mode={agg}", f"algo.rollout_correction={variant}")
    log_prob, old, adv, mask = _batch()
    a = log_prob.clone().requires_grad_(True)
    b = log_prob.clone().requires_grad_(True)
    plain, plain_metrics = compute_policy_loss(algo, a, old, adv, mask, norm_length=7)
    corrected, metrics = compute_policy_loss(
        algo, b, old, adv, mask, norm_length=7, behaviour_log_prob=old.clone(), rollout_correction=variant
    )
    plain.backward()
    corrected.backward()
    assert torch.equal(corrected, plain)
    assert torch.equal(b.grad, a.grad)
    assert metrics["rollout_is_weight_mean"] == 1.0
    frac = "rollout_is_masked_frac" if variant == "mask" else "rollout_is_truncated_frac"
    assert metrics[frac] == 0.0
    for name, value in plain_metrics.items():
        assert torch.equal(metrics[name], value), name


def test_none_and_no_behaviour_are_plain_ppo():
    algo = _algo()
    log_prob, old, adv, mask = _batch()
    plain, _ = compute_policy_loss(algo, log_prob, old, adv, mask)
    behaviour = old - 1.0
    none, metrics = compute_policy_loss(algo, log_prob, old, adv, mask, behaviour_log_prob=behaviour, rollout_correction="none")
    assert torch.equal(none, plain) and "rollout_is_weight_mean" not in metrics
    with pytest.raises(ValueError, match="'auto' must be resolved first"):
        compute_policy_loss(algo, log_prob, old, adv, mask, behaviour_log_prob=behaviour)


# ----------------------------------------------------------------- an independent float64 reference


def _reference_grad(variant, log_prob, old, behaviour, adv, mask, low, high, dual_c, cap):
    """d loss / d log_prob, token by token in Python floats, from the definitions:
    loss = (1/T) sum_t w_t max(-A r_t, -A clip(r_t)), dual-clipped at -A c for A < 0,
    r_t = exp(lp_t - old_t), token-mean over the T real tokens; returns (grad, loss, weights)."""
    n, length = len(log_prob), len(log_prob[0])
    tokens = sum(1 for i in range(n) for t in range(length) if mask[i][t])
    grad = [[0.0] * length for _ in range(n)]
    weights = [[0.0] * length for _ in range(n)]
    total = 0.0
    for i in range(n):
        seq_ratio = math.exp(sum(old[i][t] - behaviour[i][t] for t in range(length) if mask[i][t]))
        for t in range(length):
            if not mask[i][t]:
                continue
            rho = math.exp(old[i][t] - behaviour[i][t])  # pi_old / mu
            if variant in ("tis", "decoupled"):
                w = min(rho, cap)
            elif variant == "seq_tis":
                w = min(seq_ratio, cap)
            elif variant == "mask":
                w = 1.0 if 1.0 / cap <= rho <= cap else 0.0
            else:
                raise AssertionError(variant)
            weights[i][t] = w
            r = math.exp(log_prob[i][t] - old[i][t])
            a = adv[i][t]
            unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
            # d(-A r)/d lp = -A r; the clipped branch is flat where the clip binds.
            if unclipped >= clipped:
                term, d = unclipped, -a * r
            else:
                term, d = clipped, (-a * r if 1 - low < r < 1 + high else 0.0)
            if dual_c is not None and a < 0 and term > -a * dual_c:
                term, d = -a * dual_c, 0.0
            total += w * term / tokens
            grad[i][t] = w * d / tokens
    return grad, total, weights


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_equals_an_independent_float64_computation(variant):
    n, length = 3, 5
    mask = (torch.arange(length) < torch.tensor([5, 4, 2]).unsqueeze(-1)).tolist()
    g = torch.Generator().manual_seed(1)
    old = (-torch.rand(n, length, generator=g, dtype=torch.float64) * 2 - 0.2).tolist()
    # log(pi_old / mu) per token: inside the band, beyond the cap above, beyond 1/cap below,
    # just above and just below the cap (log 2 = 0.693); row sums land on both sides of log(cap)
    # for seq_tis.
    behaviour_gap = [
        [0.1, 1.2, -0.05, -0.9, 0.70],
        [-0.3, 0.2, 0.05, 0.68, 9.9],  # the last is padding: junk that must not count
        [2.5, -1.5, 7.0, -7.0, 0.0],
    ]
    behaviour = [[old[i][t] - behaviour_gap[i][t] for t in range(length)] for i in range(n)]
    # New log-probs around old: some ratios inside the clip band, some beyond it on each side.
    step = [[0.05, 0.4, -0.35, 0.1, -0.02], [0.3, -0.1, 0.02, -0.5, 0.0], [-0.05, 0.25, 1.5, 0.01, 0.0]]
    log_prob = [[old[i][t] + step[i][t] for t in range(length)] for i in range(n)]
    adv = [[a] * length for a in (1.3, -2.0, 0.8)]
    low, high, dual_c = 0.2, 0.3, 3.0

    expected_grad, expected_loss, expected_weights = _reference_grad(
        variant, log_prob, old, behaviour, adv, mask, low, high, dual_c, CAP
    )
    algo = _algo(f"algo.rollout_correction={variant}", f"algo.rollout_correction_cap={CAP}")
    lp = torch.tensor(log_prob, dtype=torch.float64, requires_grad=True)
    loss, metrics = compute_policy_loss(
        algo,
        lp,
        torch.tensor(old, dtype=torch.float64),
        torch.tensor(adv, dtype=torch.float64),
        torch.tensor(mask),
        behaviour_log_prob=torch.tensor(behaviour, dtype=torch.float64),
        rollout_correction=variant,
    )
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-12, abs=1e-15)

    # The weights themselves, and that the test covers both sides of the cap.
    weights, _ = ROLLOUT_CORRECTIONS.get(variant)(
        torch.tensor(old, dtype=torch.float64), torch.tensor(behaviour, dtype=torch.float64), torch.tensor(mask), cap=CAP
    )
    torch.testing.assert_close(weights, torch.tensor(expected_weights, dtype=torch.float64), rtol=1e-12, atol=0)
    real = [expected_weights[i][t] for i in range(n) for t in range(length) if mask[i][t]]
    if variant == "mask":
        assert 0.0 in real and 1.0 in real
        assert float(metrics["rollout_is_masked_frac"]) == pytest.approx(real.count(0.0) / len(real))
    else:
        assert CAP in real and any(w < CAP for w in real)
        at_cap = real.count(CAP)
        assert float(metrics["rollout_is_truncated_frac"]) == pytest.approx(at_cap / len(real))
    assert float(metrics["rollout_is_weight_mean"]) == pytest.approx(sum(real) / len(real), rel=1e-12)


def test_seq_tis_weight_is_the_product_and_never_overflows():
    old = torch.zeros(2, 4)
    behaviour = torch.tensor([[-0.1, -0.1, -0.1, 0.0], [-100.0, -100.0, -100.0, -100.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    weights, _ = ROLLOUT_CORRECTIONS.get("seq_tis")(old, behaviour, mask, cap=CAP)
    torch.testing.assert_close(weights[0], torch.tensor([math.exp(0.3)] * 3 + [0.0]))
    assert torch.equal(weights[1], torch.full((4,), CAP))
    assert torch.isfinite(weights).all() and not weights.requires_grad


def test_weights_carry_no_gradient():
    old = torch.zeros(1, 3, requires_grad=True)
    behaviour = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True)
    for name in VARIANTS:
        weights, _ = ROLLOUT_CORRECTIONS.get(name)(old, behaviour, torch.ones(1, 3, dtype=torch.bool), cap=CAP)
        assert not weights.requires_grad, name


# ----------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "none"),
        (["trainer.mode=async"], "tis"),
        (["rollout.engine=vllm"], "tis"),
        (["trainer.mode=async", "rollout.engine=vllm"], "tis"),
        (["trainer.mode=async", "algo.rollout_correction=none"], "none"),
        (["algo.rollout_correction=seq_tis"], "seq_tis"),
        (["algo.rollout_correction=decoupled", "rollout.engine=vllm"], "decoupled"),
    ],
)
def test_auto_resolves_as_specified(overrides, expected):
    assert resolve_rollout_correction(load_config(overrides=overrides)) == expected


def test_presets_resolve():
    assert resolve_rollout_correction(load_config(preset="cpu-tiny")) == "none"
    assert resolve_rollout_correction(load_config(preset="geo3k-qwen25vl-7b")) == "tis"
    assert load_config().algo.rollout_correction_cap == 2.0


@pytest.mark.parametrize("cap", ["1", "1.0", "0.5", "0", "-2", ".inf", ".nan"])
def test_bad_caps_are_refused_naming_the_key(cap):
    with pytest.raises(ConfigError, match=r"algo\.rollout_correction_cap must be a finite number > 1"):
        load_config(overrides=[f"algo.rollout_correction_cap={cap}", "algo.rollout_correction=tis"])


def test_bad_names_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"'algo\.rollout_correction'.*one of 'auto', 'none', 'tis'"):
        load_config(overrides=["algo.rollout_correction=is"])
    from mapo_ray.config import AlgoConfig, Config
    from mapo_ray.job import check_names

    # A name the Literal lets through (a config built in code) is checked against the registry.
    with pytest.raises(ConfigError, match=r"algo\.rollout_correction: unknown rollout correction 'tiss'"):
        check_names(Config(algo=AlgoConfig(rollout_correction="tiss")))  # type: ignore[arg-type]


def test_staleness_metrics_are_max_and_mean_over_the_batch():
    from mapo_ray.coordinator import staleness_metrics

    assert staleness_metrics(5, [4, 4, 3, 5]) == {"rollout/staleness": 2.0, "rollout/staleness_mean": 1.0}
    assert staleness_metrics(0, [0, 0]) == {"rollout/staleness": 0.0, "rollout/staleness_mean": 0.0}
