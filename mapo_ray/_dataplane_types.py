"""(moves into mapo_ray/types.py) What a rollout leaves in the object store for one group."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from mapo_ray.rollout.types import FinishReason, Group


@dataclass(frozen=True)
class GroupSummary:
    """The few numbers the coordinator reads of one generated group; the tokens stay in the object store.

    ``response_lengths``, ``finish_reasons`` and ``weight_versions`` are per sample, in sampling order.
    """

    uid: str
    prompt_length: int
    response_lengths: list[int]
    finish_reasons: list[FinishReason]
    weight_versions: list[int]

    @property
    def size(self) -> int:
        return len(self.response_lengths)

    @property
    def tokens(self) -> int:
        """Prompt plus response tokens over the group's samples: what the learner will process."""
        return sum(self.prompt_length + n for n in self.response_lengths)

    @classmethod
    def of(cls, group: Group) -> GroupSummary:
        return cls(
            uid=group.uid,
            prompt_length=len(group.samples[0].prompt_ids) if group.samples else 0,
            response_lengths=[len(s.response_ids) for s in group.samples],
            finish_reasons=[s.finish_reason for s in group.samples],
            weight_versions=[s.weight_version for s in group.samples],
        )


@dataclass(frozen=True)
class GroupPayload:
    """One group as the learner needs it: its samples and its prompt's images."""

    group: Group
    images: tuple[Image.Image | np.ndarray, ...]
