"""The ``RolloutEngine`` protocol, and building an engine and its sampling parameters from config."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from mapo_ray.types import Group, Prompt, SamplingParams

if TYPE_CHECKING:
    from mapo_ray.config import RolloutConfig
    from mapo_ray.sync import GroupAddress, SyncPlan


class RolloutEngine(Protocol):
    """Samples groups of responses and takes new weights in place.

    ``weight_version`` is 0 for the checkpoint the engine was built from, the version of
    the last update loaded in full after that, and None while an update is incomplete
    (then ``generate`` raises rather than sample from a mix of two policies).
    ``sync_ranks`` is how many ranks of a weight-sync group the engine holds (one per
    process that keeps a copy of the weights).
    """

    sync_ranks: int

    @property
    def weight_version(self) -> int | None: ...

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        """One group of ``params.n`` samples per prompt, in prompt order."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load ``(name, tensor)`` pairs named as in the learner's model, then report ``version``."""

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        """Join the weight-sync group at ``address`` as ranks ``first_rank .. first_rank + sync_ranks - 1``."""

    def receive_weights(self, plan: SyncPlan) -> int:
        """Receive update ``plan`` from the group and load it; returns ``plan.version``."""


def make_engine(cfg: RolloutConfig, model_path: str | os.PathLike, seed: int = 0) -> RolloutEngine:
    """The engine ``cfg.engine`` names, for the checkpoint folder ``model_path``."""
    if cfg.engine == "hf":
        from mapo_ray.rollout.hf_engine import HFEngine

        dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        return HFEngine(model_path, device=cfg.device, dtype=dtype)
    from mapo_ray.rollout.sampling import vllm_logprobs_mode
    from mapo_ray.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_path,
        tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        sleep_between_rollouts=cfg.sleep_between_rollouts,
        seed=seed,
        logprobs_mode=vllm_logprobs_mode(cfg.temperature),
    )


def sampling_params(cfg: RolloutConfig, seed: int | None) -> SamplingParams:
    """Training-time sampling: ``cfg.group_size`` responses per prompt with the configured knobs."""
    return SamplingParams(
        n=cfg.group_size,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop=tuple(cfg.stop),
        seed=seed,
    )
