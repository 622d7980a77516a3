"""Scored rollouts as the learner takes them, and how a rollout batch is divided: pure, no Ray.

One ``Experience`` is one sampled response with its prompt, reward and images. A rollout
batch (all groups of one step) is divided three ways:

- across learner ranks by whole groups, balanced by tokens (``shard_by_group``);
- on each rank into ``updates_per_step`` mini-batches, one optimizer step each
  (``split_minibatches``);
- each mini-batch into micro-batches whose padded size fits a token budget, one
  forward/backward each (``token_budget_micro_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from mapo_ray.types import Sample


@dataclass(frozen=True)
class Experience:
    """One scored response, ready for the learner.

    Attributes:
        prompt_ids: the prompt exactly as the rollout engine fed it to the model, with
            every ``<|image_pad|>`` already widened to one token per merged vision patch.
        response_ids: the sampled tokens (eos included when the response stopped on it).
        response_logprobs: the sampler's log-probability of each response token; only
            compared against the learner's (metric ``actor/rollout_logprob_abs_diff``).
        group_id: samples of one prompt share it; advantages are relative within it.
        reward: the scalar reward (finite).
        success: whether the response succeeded; None means ``reward >=
            algo.success_threshold``.
        weight_version: the policy version that sampled it.
        images: the prompt's images (PIL or ``(H, W, 3)`` uint8 arrays, already resized
            as for the rollout), in prompt order; the learner re-runs the image processor.
            Samples of one group should share the same tuple object: each distinct
            tuple is processed once per call.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    group_id: int
    reward: float
    success: bool | None
    weight_version: int
    images: tuple[Image.Image | np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        where = f"experience of group {self.group_id}"
        if not self.prompt_ids:
            raise ValueError(f"{where}: prompt_ids is empty")
        if len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(
                f"{where}: {len(self.response_ids)} response_ids but {len(self.response_logprobs)} response_logprobs"
            )
        if not math.isfinite(self.reward):
            raise ValueError(f"{where}: reward must be finite, got {self.reward}")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @classmethod
    def from_sample(
        cls,
        sample: Sample,
        *,
        group_id: int,
        reward: float,
        success: bool | None,
        images: tuple[Image.Image | np.ndarray, ...],
    ) -> Experience:
        """An ``Experience`` from a rollout ``Sample``, its group's integer id, its reward and the prompt's images."""
        return cls(
            prompt_ids=sample.prompt_ids,
            response_ids=sample.response_ids,
            response_logprobs=sample.response_logprobs,
            group_id=group_id,
            reward=reward,
            success=success,
            weight_version=sample.weight_version,
            images=images,
        )


def shard_by_group(group_ids: Sequence[int], num_tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of each rank's samples: whole groups, balanced by total tokens.

    Groups go, largest first, to the rank with the fewest tokens so far (ties: lowest
    rank); each rank's indices stay in batch order. Deterministic, so every rank
    computes the same split.

    Raises:
        ValueError: when there are fewer groups than ranks (a rank would idle).
    """
    if len(group_ids) != len(num_tokens):
        raise ValueError(f"shard_by_group: {len(group_ids)} group ids but {len(num_tokens)} token counts")
    members: dict[int, list[int]] = {}
    for index, group in enumerate(group_ids):
        members.setdefault(group, []).append(index)
    if len(members) < world_size:
        raise ValueError(
            f"the rollout batch has {len(members)} group(s), fewer than the {world_size} learner ranks; "
            "raise the number of prompts per step"
        )
    sizes = {group: sum(num_tokens[i] for i in indices) for group, indices in members.items()}
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for group in sorted(members, key=lambda g: (-sizes[g], g)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].extend(members[group])
        load[rank] += sizes[group]
    return [sorted(shard) for shard in shards]


def split_minibatches(num_samples: int, count: int) -> list[list[int]]:
    """``count`` contiguous runs of ``range(num_samples)`` whose sizes differ by at most one.

    Raises:
        ValueError: when ``num_samples < count`` (a mini-batch would be empty).
    """
    if num_samples < count:
        raise ValueError(
            f"{num_samples} sample(s) on this learner rank cannot fill learner.updates_per_step={count} mini-batches"
        )
    return [run.tolist() for run in np.array_split(np.arange(num_samples), count)]


def padded_tokens(prompt_lens: Sequence[int], response_lens: Sequence[int]) -> int:
    """Tokens of one collated micro-batch: rows x (longest prompt + longest response)."""
    if not prompt_lens:
        return 0
    return len(prompt_lens) * (max(prompt_lens) + max(response_lens))


def token_budget_micro_batches(
    prompt_lens: Sequence[int], response_lens: Sequence[int], budget: int, min_count: int = 1
) -> list[list[int]]:
    """Partition sample indices into micro-batches of at most ``budget`` padded tokens.

    Samples are taken longest first, so each micro-batch holds similar lengths and
    little padding; a sample longer than ``budget`` alone gets a micro-batch of its
    own. If that gives fewer than ``min_count`` micro-batches, the largest ones with
    two or more samples are halved until there are ``min_count`` (or every one holds a
    single sample). ``padded_tokens`` defines the size of a micro-batch.

    Returns:
        Lists of indices into the inputs, each sorted ascending; together a partition.
    """
    if len(prompt_lens) != len(response_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths but {len(response_lens)} response lengths")
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(range(len(prompt_lens)), key=lambda i: -(prompt_lens[i] + response_lens[i]))
    parts: list[list[int]] = []
    for index in order:
        if parts:
            candidate = parts[-1] + [index]
            size = padded_tokens([prompt_lens[i] for i in candidate], [response_lens[i] for i in candidate])
            if size <= budget:
                parts[-1] = candidate
                continue
        parts.append([index])

    def size_of(part: list[int]) -> int:
        return padded_tokens([prompt_lens[i] for i in part], [response_lens[i] for i in part])

    while len(parts) < min_count:
        splittable = [p for p in parts if len(p) > 1]
        if not splittable:
            break
        largest = max(splittable, key=size_of)
        parts.remove(largest)
        half = len(largest) // 2
        parts.extend([largest[:half], largest[half:]])
    return [sorted(part) for part in parts]
