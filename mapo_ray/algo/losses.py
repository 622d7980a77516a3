"""Policy losses, KL estimators and DAPO's reward shaping, as pure tensor functions.

Shapes: N responses, L response tokens (right padded), V vocabulary entries.
``response_mask`` (N, L) is 1 (or True) on real response tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch

from mapo_ray.algo.advantage import group_stats
from mapo_ray.registry import Registry

if TYPE_CHECKING:
    from mapo_ray.config import AlgoConfig

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]

# exp() of a log-ratio beyond this overflows float32 and carries no signal.
_MAX_LOG_RATIO = 20.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar mean of ``values`` (N, L) over the entries where ``mask`` (N, L) is set; 0 if none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def aggregate_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: AggMode, *, norm_length: float | None = None
) -> torch.Tensor:
    """Reduce a (N, L) per-token loss to a scalar.

    - ``token-mean``: mean over every unmasked token of the batch.
    - ``seq-mean-token-mean``: mean over tokens within each response, then over
      responses that have at least one token.
    - ``seq-mean-token-sum``: each response's token sum, then the mean over responses
      (verl's mode of that name).
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): each response's token sum divided by
      the constant ``norm_length`` (default L), then the mean over responses: Dr. GRPO's
      ``masked_sum(loss, mask, constant_normalizer=generate_max_length)`` per response,
      averaged over the batch (its reference code, oat), and recent verl's ``agg_loss``
      (token sums divided by ``loss_scale_factor``, default the padded response length,
      then by the global number of responses). The learner passes
      ``rollout.max_new_tokens``, a constant for the whole run. Older verl divided the
      batch's token sum by the padded length without the 1/N, which makes the step
      grow with the batch size; that form is not used here.
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    token_sums = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return token_sums.mean()
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(-1)
        has_tokens = lengths > 0
        per_seq = token_sums / lengths.clamp_min(1.0)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1)
    if mode == "seq-mean-token-sum-norm":
        return (token_sums / (norm_length or loss_mat.shape[-1])).mean()
    raise ValueError(f"unknown loss aggregation mode {mode!r}")


def _clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, L) PPO loss ``max(-A r, -A clip(r, 1-low, 1+high))``, dual-clipped at ``-A c`` for A < 0."""
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": masked_mean((clipped > unclipped).float(), mask)}
    if dual_clip_c is not None:
        # For A < 0 a huge ratio would make the loss unbounded; cap it at -A c.
        bound = -advantages * dual_clip_c
        negative = advantages < 0
        metrics["dual_clip_frac"] = masked_mean((negative & (loss > bound)).float(), mask)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    return loss, metrics


PolicyLoss = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("ppo")
def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip_c: float | None = 3.0,
    agg_mode: AggMode = "token-mean",
    norm_length: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clipped surrogate with clip-higher (DAPO) and dual-clip.

    Args: ``log_prob``, ``old_log_prob``, ``advantages``, ``response_mask``, all (N, L);
    ``weights`` (N, L), optional and without gradient: each token's (dual-)clipped
    surrogate is multiplied by its weight before aggregation (a rollout correction,
    ``ROLLOUT_CORRECTIONS``); the aggregation's denominator is unchanged.
    Returns: the scalar loss and scalar metrics ``clip_frac``, ``dual_clip_frac``
    and ``approx_kl`` (mean of old - new log-prob, the k1 estimate of KL(old || new)).
    """
    log_ratio = log_prob - old_log_prob
    loss_mat, metrics = _clipped_surrogate(
        log_ratio, advantages, response_mask, clip_low, clip_high, dual_clip_c
    )
    if weights is not None:
        loss_mat = loss_mat * weights.detach()
    metrics["approx_kl"] = masked_mean(-log_ratio.detach(), response_mask)
    return aggregate_loss(loss_mat, response_mask, agg_mode, norm_length=norm_length), metrics


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip_c: float | None = None,
    agg_mode: AggMode = "seq-mean-token-mean",
    norm_length: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: one importance ratio per response, the geometric mean of its token ratios.

    Each token carries the sequence ratio s_i = exp(mean_t(log_prob - old_log_prob))
    as its value, with the gradient of its own log-prob, so the clip acts per
    sequence. Shapes as in ``ppo_loss``.

    ``weights`` (N, L), optional, no gradient, multiply each token's clipped term
    before aggregation, as in ``ppo_loss``. Since token t's term carries the gradient
    of its own log-prob, a per-token weight w_t scales token t's share of the
    sequence's gradient, s_i A_i w_t grad log pi(y_t); whether the sequence is
    clipped is still decided by s_i alone. A sequence-level weight (``seq_tis``, the
    same value on every token of a response) scales the whole sequence's term, the
    natural match for GSPO's sequence ratio.
    """
    mask = response_mask.to(log_prob.dtype)
    token_log_ratio = log_prob - old_log_prob
    seq_log_ratio = (token_log_ratio * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    loss_mat, metrics = _clipped_surrogate(
        log_ratio, advantages, response_mask, clip_low, clip_high, dual_clip_c
    )
    if weights is not None:
        loss_mat = loss_mat * weights.detach()
    metrics["approx_kl"] = masked_mean(-token_log_ratio.detach(), response_mask)
    return aggregate_loss(loss_mat, response_mask, agg_mode, norm_length=norm_length), metrics


# ------------------------------------------------------------------------- rollout corrections
#
# Three policies score each sampled token: the behaviour policy mu (the rollout engine
# that sampled it: other numerics, such as vLLM's kernels, and in async mode weights up
# to trainer.max_staleness versions old), the proximal policy pi_old (the learner's
# weights at the start of the update, recomputed: ``old_log_prob``) and pi_theta (the
# weights being trained). The PPO ratio pi_theta / pi_old is clipped as before; a
# correction multiplies each token's clipped surrogate by a constant weight built from
# pi_old / mu. With mu = pi_old every weight is exactly 1 and the loss is plain PPO.

RolloutCorrection = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
ROLLOUT_CORRECTIONS: Registry[RolloutCorrection] = Registry("rollout correction")


def _behaviour_log_ratio(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) detached log(pi_old / mu), 0 off the mask (so padding never yields NaN), and the bool mask."""
    mask = response_mask.bool()
    log_ratio = (old_log_prob.detach() - behaviour_log_prob.detach()).to(old_log_prob.dtype)
    return torch.where(mask, log_ratio, torch.zeros_like(log_ratio)), mask


def _truncated_token_weights(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    log_ratio, mask = _behaviour_log_ratio(old_log_prob, behaviour_log_prob, response_mask)
    log_cap = math.log(cap)
    # min(exp(x), C) = exp(min(x, log C)): no overflow, and exp(0) = 1 exactly when mu = pi_old.
    weights = torch.exp(log_ratio.clamp(max=log_cap)) * mask
    metrics = {
        "rollout_is_weight_mean": masked_mean(weights, mask),
        "rollout_is_truncated_frac": masked_mean((log_ratio >= log_cap).to(weights.dtype), mask),
    }
    return weights, metrics


@ROLLOUT_CORRECTIONS.register("tis")
def tis_weights(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling, per token: w_t = min(pi_old(y_t) / mu(y_t), cap).

    As verl's rollout correction (``rollout_is=token``), OpenRLHF's TIS and TRL's vLLM
    importance sampling correction (``token_truncate``). Args: ``old_log_prob`` (log
    pi_old), ``behaviour_log_prob`` (log mu, the sampler's), ``response_mask``, all
    (N, L). Returns (N, L) detached weights, 0 off the mask, and scalar metrics
    ``rollout_is_weight_mean`` and ``rollout_is_truncated_frac`` (tokens at the cap),
    token means over the mask.
    """
    return _truncated_token_weights(old_log_prob, behaviour_log_prob, response_mask, cap)


@ROLLOUT_CORRECTIONS.register("seq_tis")
def seq_tis_weights(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level TIS: one weight per response, w_i = min(prod_t pi_old(y_t) / mu(y_t), cap),
    on every token of response i.

    The product (exp of the summed log-ratio), not the geometric mean: the product is
    the importance ratio of the whole response, the quantity that makes the sequence's
    expectation unbiased before truncation (verl's ``rollout_is=sequence``, TRL's
    ``sequence_truncate``); the geometric mean is a length-normalised statistic (GSPO's
    ratio), not a likelihood ratio, and would correct long responses too little. The
    price is variance: on long responses the product leaves 1 quickly, so more
    sequences sit at the cap. Shapes and metrics as in ``tis_weights`` (metrics are
    token means: a response at the cap counts with all its tokens).
    """
    log_ratio, mask = _behaviour_log_ratio(old_log_prob, behaviour_log_prob, response_mask)
    seq_log_ratio = log_ratio.sum(-1, keepdim=True)
    log_cap = math.log(cap)
    weights = torch.exp(seq_log_ratio.clamp(max=log_cap)).expand_as(log_ratio) * mask
    at_cap = (seq_log_ratio >= log_cap).expand_as(log_ratio).to(weights.dtype)
    metrics = {
        "rollout_is_weight_mean": masked_mean(weights, mask),
        "rollout_is_truncated_frac": masked_mean(at_cap, mask),
    }
    return weights, metrics


@ROLLOUT_CORRECTIONS.register("mask")
def mask_weights(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token masking: w_t = 1 where pi_old(y_t) / mu(y_t) lies in [1/cap, cap], else 0.

    A dropped token still counts in the aggregation's denominator (``aggregate_loss``
    is given the unchanged ``response_mask``): masking removes its term, it does not
    re-normalise the rest, so the more tokens are dropped the smaller the step, and the
    learner's micro-batch shares, computed from response lengths before any forward,
    stay exact. This is TRL's ``token_mask`` convention (AReaL's cap filter, too). The
    bounds are inclusive, so a token exactly at the cap is kept. Shapes as in
    ``tis_weights``; metrics ``rollout_is_weight_mean`` and ``rollout_is_masked_frac``.
    """
    log_ratio, mask = _behaviour_log_ratio(old_log_prob, behaviour_log_prob, response_mask)
    log_cap = math.log(cap)
    keep = (log_ratio >= -log_cap) & (log_ratio <= log_cap) & mask
    weights = keep.to(log_ratio.dtype)
    metrics = {
        "rollout_is_weight_mean": masked_mean(weights, mask),
        "rollout_is_masked_frac": masked_mean((mask & ~keep).to(weights.dtype), mask),
    }
    return weights, metrics


@ROLLOUT_CORRECTIONS.register("decoupled")
def decoupled_weights(
    old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO (AReaL): the clip is taken around the proximal policy, and the behaviour
    weight w_t = min(pi_old(y_t) / mu(y_t), cap) multiplies each token's clipped surrogate.

    In this codebase it coincides with ``tis`` in formula, value and gradient. AReaL's
    objective is E_mu[ pi_prox / mu * min(r A, clip(r) A) ] with r = pi_theta / pi_prox;
    the learner already takes the ratio against pi_old recomputed at the start of the
    update (the proximal policy, ``update``), in every mode, so TIS here is the same
    product with the same per-token truncation. The two differ only where the
    frameworks they come from differ, not here: verl's TIS in "bypass" mode and
    OpenRLHF without recomputation clip around mu itself (here never), and AReaL's own
    code does not truncate at the cap but drops tokens whose weight exceeds it (and
    keeps the others untruncated), closer to ``mask`` with no lower bound. The option
    exists so that a config can say which algorithm it means, and as the place for
    such a variant. Shapes and metrics as in ``tis_weights``.
    """
    return _truncated_token_weights(old_log_prob, behaviour_log_prob, response_mask, cap)


KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1", "kl")
def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """(N, L) log p - log q, unbiased for KL(p || q) under samples from p."""
    return log_prob - ref_log_prob


@KL_ESTIMATORS.register("k2", "mse")
def kl_k2(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """(N, L) (log p - log q)^2 / 2."""
    return 0.5 * (log_prob - ref_log_prob).square()


@KL_ESTIMATORS.register("k3", "low_var_kl")
def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """(N, L) q/p - log(q/p) - 1: non-negative, low variance; clamped to [-10, 10] for stability."""
    log_q_over_p = (ref_log_prob - log_prob).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(log_q_over_p) - log_q_over_p - 1.0).clamp(-10.0, 10.0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(...) entropy of the softmax over the last axis of ``logits`` (..., V)."""
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)


@dataclass(frozen=True)
class PolicyLossSettings:
    """The clip ratios, dual-clip constant (None: none) and aggregation a policy loss runs with."""

    clip_low: float
    clip_high: float
    dual_clip_c: float | None
    agg_mode: AggMode


def policy_loss_settings(config: AlgoConfig) -> PolicyLossSettings:
    """``config``'s settings for its ``policy_loss``: each key left null (None) takes that
    loss's own default, the keyword default of its registered function (PPO: 0.2 / 0.3
    with dual-clip 3.0 and token-mean; GSPO: 3e-4 / 4e-4, no dual clip,
    seq-mean-token-mean). ``dual_clip_c`` false means no dual clip whatever the loss.
    The one place these keys are resolved."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(POLICY_LOSSES.get(config.policy_loss)).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }

    def pick(value, name):
        return defaults[name] if value is None else value

    dual = config.dual_clip_c
    return PolicyLossSettings(
        clip_low=pick(config.clip_ratio_low, "clip_low"),
        clip_high=pick(config.clip_ratio_high, "clip_high"),
        dual_clip_c=None if dual is False else pick(dual, "dual_clip_c"),
        agg_mode=pick(config.loss_agg_mode, "agg_mode"),
    )


def compute_policy_loss(
    config: AlgoConfig,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_log_prob: torch.Tensor | None = None,
    norm_length: float | None = None,
    *,
    behaviour_log_prob: torch.Tensor | None = None,
    rollout_correction: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of ``config``: policy loss plus ``kl_coef`` times the KL term.

    All tensors are (N, L); ``ref_log_prob`` is required when ``config.kl_coef > 0``.
    With ``behaviour_log_prob`` (the sampler's log-probs, log mu), the rollout
    correction ``rollout_correction`` (default ``config.rollout_correction``; it must be
    resolved, not "auto": see ``mapo_ray.config.resolve_rollout_correction``) weights
    each token's policy surrogate before aggregation (``ROLLOUT_CORRECTIONS``, capped at
    ``config.rollout_correction_cap``); "none" or no ``behaviour_log_prob``: plain loss.
    The KL term is not weighted. Returns the scalar loss and scalar metrics
    (``pg_loss``, ``kl``, the policy loss's own and the correction's).
    """
    policy_loss = POLICY_LOSSES.get(config.policy_loss)
    weights, correction_metrics = None, {}
    if behaviour_log_prob is not None:
        name = rollout_correction if rollout_correction is not None else config.rollout_correction
        if name == "auto":
            raise ValueError("compute_policy_loss: algo.rollout_correction 'auto' must be resolved first")
        if name != "none":
            weights, correction_metrics = ROLLOUT_CORRECTIONS.get(name)(
                old_log_prob, behaviour_log_prob, response_mask, cap=config.rollout_correction_cap
            )
    settings = policy_loss_settings(config)
    pg_loss, metrics = policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=settings.clip_low,
        clip_high=settings.clip_high,
        dual_clip_c=settings.dual_clip_c,
        agg_mode=settings.agg_mode,
        norm_length=norm_length,
        weights=weights,
    )
    metrics.update(correction_metrics)
    metrics["pg_loss"] = pg_loss.detach()
    if config.kl_coef == 0:
        return pg_loss, metrics
    if ref_log_prob is None:
        raise ValueError(f"algo.kl_coef is {config.kl_coef} but no reference log-probs were given")
    kl = aggregate_loss(
        KL_ESTIMATORS.get(config.kl_estimator)(log_prob, ref_log_prob),
        response_mask,
        settings.agg_mode,
        norm_length=norm_length,
    )
    metrics["kl"] = kl.detach()
    return pg_loss + config.kl_coef * kl, metrics


def dapo_group_filter(success: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(N,) bool: keep the samples of groups whose mean ``success`` (N, 0 or 1) is strictly in (0, 1).

    DAPO's dynamic sampling drops groups that all succeed or all fail: they carry
    no group-relative signal.
    """
    stats = group_stats(success.to(torch.float32), group_ids)
    mean = stats.mean[stats.index]
    return (mean > 0) & (mean < 1)


def overlong_penalty(
    response_lengths: torch.Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """(N,) DAPO's soft overlong penalty for ``response_lengths`` (N,).

    0 up to ``max_length - buffer_length`` tokens, then falling linearly to
    ``-penalty_factor`` at ``max_length``, and ``-penalty_factor`` beyond.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"need 0 < buffer_length <= max_length; got {buffer_length}, {max_length}")
    excess = response_lengths.to(torch.float32) - (max_length - buffer_length)
    return -penalty_factor * (excess / buffer_length).clamp(0.0, 1.0)
