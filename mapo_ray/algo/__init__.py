"""The math of mapo-ray: advantage estimators, policy losses, KL estimators. No Ray here."""

from mapo_ray.algo.advantage import (
    ADVANTAGE_ESTIMATORS,
    AdvantageDiagnostics,
    GroupStats,
    advantage_diagnostics,
    compute_advantages,
    expand_to_tokens,
    group_stats,
)
from mapo_ray.algo.losses import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PolicyLossSettings,
    ROLLOUT_CORRECTIONS,
    aggregate_loss,
    compute_policy_loss,
    dapo_group_filter,
    entropy_from_logits,
    masked_mean,
    overlong_penalty,
    policy_loss_settings,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "AdvantageDiagnostics",
    "PolicyLossSettings",
    "GroupStats",
    "advantage_diagnostics",
    "aggregate_loss",
    "compute_advantages",
    "compute_policy_loss",
    "dapo_group_filter",
    "entropy_from_logits",
    "expand_to_tokens",
    "group_stats",
    "masked_mean",
    "overlong_penalty",
    "policy_loss_settings",
]
