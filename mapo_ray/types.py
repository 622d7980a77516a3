"""The plain dataclasses that the learner, rollout and reward packages share: no Ray, no torch.

What goes into a rollout engine and what comes out. A batch of B ``Prompt`` and one
``SamplingParams`` with ``n = G`` give B ``Group``, each holding the G ``Sample`` of its
prompt in sampling order; a rollout actor leaves each group in the object store as a
``GroupPayload`` and hands back only its ``GroupSummary``. ``derive_seed`` gives the per-prompt seed of a batch seed (the
engines sample with it, the learner seeds with it). This module imports nothing else
from ``mapo_ray``, so any package may import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

# "stop": an eos token or a stop string ended the response; "length": max_new_tokens did.
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the G responses of each prompt.

    Attributes:
        n: responses per prompt (the group size G).
        temperature: softmax temperature; 0 means greedy decoding (then ``n`` must be 1).
        top_p: nucleus mass in (0, 1]; 1 keeps the whole vocabulary.
        max_new_tokens: the most response tokens one sample may have.
        stop: strings that end a response; the response keeps the tokens that complete one.
        seed: with the same weights, prompts and seed an engine gives the same samples;
            None draws fresh randomness.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be at least 1, got {self.n}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n != 1:
            raise ValueError(f"SamplingParams: greedy decoding (temperature 0) gives one response, but n={self.n}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must be a sequence of non-empty strings, got {self.stop!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"SamplingParams.seed must be >= 0 or None, got {self.seed}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Prompt:
    """One prompt of a rollout batch.

    Attributes:
        uid: names the prompt (and its group) in every result and error.
        text: the chat-templated prompt, with one ``<|image_pad|>`` per image, in order.
        images: RGB images as PIL images or ``(H, W, 3) uint8`` arrays, already resized.
        answer: the reference answer, passed through to the group for the reward.
    """

    uid: str
    text: str
    images: tuple[Image.Image | np.ndarray, ...] = ()
    answer: str = ""


@dataclass(frozen=True)
class Sample:
    """One response. The three token lists are plain ints/floats, ready to pickle.

    ``response_logprobs[t]`` is the log-probability of ``response_ids[t]`` under the
    distribution it was sampled from (see ``mapo_ray.rollout.sampling``).
    """

    group_uid: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    response_text: str
    finish_reason: FinishReason
    weight_version: int


@dataclass(frozen=True)
class Group:
    """The G samples of one prompt, with the prompt's uid and reference answer."""

    uid: str
    answer: str
    samples: list[Sample]


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


def pil_image(image: Image.Image | np.ndarray, where: str) -> Image.Image:
    """``image`` as an RGB PIL image; ``where`` names it in the error for anything else."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return Image.fromarray(image)
    described = f"array {image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"{where}: expected a PIL image or an (H, W, 3) uint8 array, got {described}")


def prompts_from_batch(batch: Mapping[str, Any]) -> list[Prompt]:
    """The prompts of one batch of ``mapo_ray.data`` rows (columns ``uid``, ``prompt``, ``images``, ``answer``)."""
    missing = [c for c in ("uid", "prompt", "images", "answer") if c not in batch]
    if missing:
        raise ValueError(f"prompt batch lacks column(s) {missing}; it has {sorted(batch)}")
    return [
        Prompt(uid=str(uid), text=str(text), images=tuple(images), answer=str(answer))
        for uid, text, images, answer in zip(batch["uid"], batch["prompt"], batch["images"], batch["answer"])
    ]


def count_tokens(groups: Sequence[Group]) -> int:
    """Response tokens generated in ``groups``."""
    return sum(len(s.response_ids) for g in groups for s in g.samples)


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for prompt ``index`` of a batch sampled with ``seed``.

    Hashing (rather than ``seed + index``) keeps neighbouring batch seeds from sharing
    prompt seeds; vLLM adds the sample index to it for each of the G samples.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
