"""Group-relative advantage estimators, batched, for any grouping of the samples.

Notation: a group is the G rollouts of one prompt, with rewards
r_1..r_G, mean mu, standard deviation sigma and certainty p (the fraction that
succeeded). Every per-group quantity is computed once per distinct group id and
gathered back by each sample's own id, so samples of a group need not be
contiguous, ids need not be 0..K-1, and groups may differ in size. This is the fix
for the reference code's defect of pairing per-group weights with samples by
position after the batch had been reordered.

Statistics are accumulated in float64 so that huge or nearly equal rewards neither
overflow nor lose the exact zero of an all-equal group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from mapo_ray.registry import Registry

StdMode = Literal["population", "unbiased"]


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one batch of N samples in K groups; float tensors are float64.

    ``index`` (N,) maps each sample to its row in the (K,) tensors; ``centered``
    (N,) is each sample's reward minus its group mean, exactly 0 in a group whose
    rewards are all equal (a group of one included).
    """

    group_ids: torch.Tensor  # (K,) distinct ids, sorted
    index: torch.Tensor  # (N,) int64 in [0, K)
    size: torch.Tensor  # (K,)
    mean: torch.Tensor  # (K,)
    std: torch.Tensor  # (K,)
    success_rate: torch.Tensor  # (K,) p
    constant: torch.Tensor  # (K,) bool: every reward of the group is equal
    centered: torch.Tensor  # (N,)
    eps: float

    @property
    def tcr_weight(self) -> torch.Tensor:
        """(K,) lambda(p) = 1 - 4 p (1 - p): 0 at p = 1/2, 1 at p in {0, 1}."""
        p = self.success_rate
        return 1.0 - 4.0 * p * (1.0 - p)


def group_stats(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    success: torch.Tensor | None = None,
    success_threshold: float = 1.0,
    std: StdMode = "population",
    eps: float = 1e-6,
) -> GroupStats:
    """Per-group mean, std, certainty and constancy of ``scores`` (N,) grouped by ``group_ids`` (N,)."""
    _check_inputs(scores, group_ids, success, std)
    x = scores.detach().to(torch.float64)
    distinct, index = torch.unique(group_ids, return_inverse=True)
    k = distinct.numel()

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, index, values)

    lowest = torch.full((k,), torch.inf, dtype=torch.float64, device=x.device)
    lowest = lowest.scatter_reduce(0, index, x, reduce="amin")
    highest = torch.full((k,), -torch.inf, dtype=torch.float64, device=x.device)
    highest = highest.scatter_reduce(0, index, x, reduce="amax")
    constant = lowest == highest

    size = per_group_sum(torch.ones_like(x))
    # The sum of equal floats divided by their count need not give the value back;
    # using the group's exact value makes ``centered`` exactly 0 for such groups.
    mean = torch.where(constant, lowest, per_group_sum(x) / size)
    centered = x - mean[index]
    dof = size if std == "population" else (size - 1.0).clamp_min(1.0)
    sigma = (per_group_sum(centered.square()) / dof).sqrt()

    succeeded = (scores >= success_threshold) if success is None else success
    success_rate = per_group_sum(succeeded.to(torch.float64)) / size
    return GroupStats(
        group_ids=distinct,
        index=index,
        size=size,
        mean=mean,
        std=sigma,
        success_rate=success_rate,
        constant=constant,
        centered=centered,
        eps=eps,
    )


# An estimator maps the batch's statistics to (N,) float64 advantages. Those below
# scale ``centered`` by one per-group factor, so they gather once and give exact 0
# for groups of equal rewards.
Estimator = Callable[[GroupStats, "torch.Generator | None"], torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) z-score: (r - mu) / (sigma + eps)."""
    return stats.centered / (stats.std[stats.index] + stats.eps)


@ADVANTAGE_ESTIMATORS.register("apd")
def apd(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) advantage percent deviation: (r - mu) / (|mu| + eps)."""
    return stats.centered / (stats.mean.abs()[stats.index] + stats.eps)


def _mix(stats: GroupStats, weight: torch.Tensor) -> torch.Tensor:
    """(N,) (1 - w) * GRPO + w * APD, with ``weight`` (K,) one value per group."""
    scale = (1.0 - weight) / (stats.std + stats.eps) + weight / (stats.mean.abs() + stats.eps)
    return stats.centered * scale[stats.index]


@ADVANTAGE_ESTIMATORS.register("mapo")
def mapo(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) MAPO: GRPO and APD mixed by the trajectory-certainty weight lambda(p)."""
    return _mix(stats, stats.tcr_weight)


@ADVANTAGE_ESTIMATORS.register("mapo_random")
def mapo_random(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) the paper's ablation: lambda ~ U[0, 1] per group; group id g (>= 0) takes the g-th draw,
    so the groups of a learner rank's shard get the weights the whole batch would give them
    (with a CPU ``generator``, whose first k draws do not depend on how many are drawn)."""
    if stats.group_ids.numel() and int(stats.group_ids.min()) < 0:
        raise ValueError("mapo_random needs group ids >= 0: group g takes the g-th random draw")
    device = generator.device if generator is not None else stats.mean.device
    draws = int(stats.group_ids.max()) + 1 if stats.group_ids.numel() else 0
    weight = torch.rand(draws, generator=generator, dtype=torch.float64, device=device)
    return _mix(stats, weight.to(stats.mean.device)[stats.group_ids])


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) Dr. GRPO: r - mu, with no scaling by sigma."""
    return stats.centered


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo(stats: GroupStats, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) leave-one-out: r_i - mean of the others = (r_i - mu) * G / (G - 1)."""
    return stats.centered * (stats.size / (stats.size - 1.0).clamp_min(1.0))[stats.index]


def compute_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    estimator: str = "mapo",
    *,
    success: torch.Tensor | None = None,
    success_threshold: float = 1.0,
    std: StdMode = "population",
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Advantages of N rollouts from their scalar rewards.

    Args:
        scores: (N,) float, one reward per rollout.
        group_ids: (N,) int64, any values; samples with equal ids form a group.
        estimator: a name in ``ADVANTAGE_ESTIMATORS``.
        success: (N,) bool, whether each rollout succeeded; default
            ``scores >= success_threshold``.
        std: "population" (1/G) or "unbiased" (1/(G-1)) for sigma.
        eps: added to the denominators.
        generator: random source for ``mapo_random``.

    Returns:
        (N,) float32 on the device of ``scores``. A group of equal rewards (a group
        of one included) gets exactly 0; the result is finite for finite input.
    """
    fn = ADVANTAGE_ESTIMATORS.get(estimator)
    stats = group_stats(
        scores, group_ids, success=success, success_threshold=success_threshold, std=std, eps=eps
    )
    advantages = fn(stats, generator)
    # APD divides by |mu| + eps, which can exceed float32's range for huge
    # mixed-sign rewards; saturate rather than return inf.
    limit = torch.finfo(torch.float32).max
    return advantages.clamp(-limit, limit).to(torch.float32)


@dataclass(frozen=True)
class AdvantageDiagnostics:
    """Per-group certainty diagnostics of one batch; tensors are (K,) float64."""

    group_ids: torch.Tensor
    size: torch.Tensor
    success_rate: torch.Tensor  # p
    tcr_weight: torch.Tensor  # lambda(p)
    mean: torch.Tensor  # mu
    std: torch.Tensor  # sigma
    zero_variance: torch.Tensor  # bool
    max_abs_advantage: float
    num_bins: int

    def p_histogram(self) -> list[int]:
        """Group counts of p in ``num_bins`` equal bins over [0, 1] (1 falls in the last)."""
        return torch.histc(self.success_rate, bins=self.num_bins, min=0.0, max=1.0).long().tolist()

    def metrics(self, prefix: str = "certainty/") -> dict[str, float]:
        """Flat scalars ready for a metrics logger."""
        p = self.success_rate
        out = {
            f"{prefix}num_groups": float(p.numel()),
            f"{prefix}p_mean": p.mean().item(),
            f"{prefix}lambda_mean": self.tcr_weight.mean().item(),
            f"{prefix}zero_variance_frac": self.zero_variance.double().mean().item(),
            f"{prefix}p_extreme_frac": ((p == 0) | (p == 1)).double().mean().item(),
            f"{prefix}max_abs_advantage": self.max_abs_advantage,
        }
        width = 1.0 / self.num_bins
        for i, count in enumerate(self.p_histogram()):
            out[f"{prefix}p_hist/{i * width:.2f}-{(i + 1) * width:.2f}"] = float(count)
        return out


def advantage_diagnostics(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    success: torch.Tensor | None = None,
    success_threshold: float = 1.0,
    std: StdMode = "population",
    eps: float = 1e-6,
    num_bins: int = 10,
) -> AdvantageDiagnostics:
    """Certainty diagnostics for ``scores`` (N,), ``group_ids`` (N,) and the ``advantages`` (N,) used."""
    stats = group_stats(
        scores, group_ids, success=success, success_threshold=success_threshold, std=std, eps=eps
    )
    return AdvantageDiagnostics(
        group_ids=stats.group_ids,
        size=stats.size,
        success_rate=stats.success_rate,
        tcr_weight=stats.tcr_weight,
        mean=stats.mean,
        std=stats.std,
        zero_variance=stats.constant,
        max_abs_advantage=advantages.abs().max().item() if advantages.numel() else 0.0,
        num_bins=num_bins,
    )


def expand_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N, L) token-level advantages: ``advantages`` (N,) broadcast over the (N, L) mask, 0 where masked."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"expand_to_tokens: advantages must be (N,) and response_mask (N, L); "
            f"got {tuple(advantages.shape)} and {tuple(response_mask.shape)}"
        )
    # A bool mask multiplies without materialising a float copy of it.
    mask = response_mask if response_mask.dtype == torch.bool else response_mask.to(advantages.dtype)
    return advantages.unsqueeze(-1) * mask


def _check_inputs(
    scores: torch.Tensor, group_ids: torch.Tensor, success: torch.Tensor | None, std: str
) -> None:
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D float tensor; got shape {tuple(scores.shape)}, {scores.dtype}")
    if group_ids.shape != scores.shape or group_ids.is_floating_point():
        raise ValueError(
            f"group_ids must be an integer tensor of shape {tuple(scores.shape)}; "
            f"got {tuple(group_ids.shape)}, {group_ids.dtype}"
        )
    if success is not None and (success.shape != scores.shape or success.dtype != torch.bool):
        raise ValueError(f"success must be a bool tensor of shape {tuple(scores.shape)}; got {success.dtype}")
    if std not in ("population", "unbiased"):
        raise ValueError(f"std must be 'population' or 'unbiased'; got {std!r}")
    bad = ~torch.isfinite(scores)
    if bad.any():
        positions = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"scores must be finite; NaN or inf at positions {positions}")
