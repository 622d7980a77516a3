"""Experiences to padded model inputs: image encoding and collation (pure torch, no model).

Layout of one micro-batch of n samples, width P + R (P: longest prompt, R: longest
response in it)::

    [ left pad | prompt ][ response | right pad ]
      <------- P ------> <------- R ------->

Every response starts at column P, so the logits that predict response tokens are one
contiguous slice (columns P-1 .. P+R-2) and the model computes logits only there
(``logits_to_keep``). The attention mask is 0 on both paddings; Qwen2.5-VL derives
its 3-D (M-RoPE) positions from it and ``mm_token_type_ids``, which is 1 exactly on
the prompt's image tokens. A response may itself contain an image-pad token (a
policy can sample any id); it is type 0, plain text, as it was while sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import BaseImageProcessor

from mapo_ray.learner.experience import Experience
from mapo_ray.models.inputs import IMAGE_TOKEN_TYPE, TEXT_TOKEN_TYPE
from mapo_ray.types import pil_image


@dataclass(frozen=True)
class VisionInput:
    """One sample's encoded images: ``pixel_values`` (patches, C*T*14*14), ``image_grid_thw`` (images, 3)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


@dataclass(frozen=True)
class PolicyInputs:
    """One collated micro-batch of n samples (see the module docstring for the layout).

    ``input_ids``, ``attention_mask``, ``mm_token_type_ids``: (n, P + R);
    ``response_ids``, ``response_mask``: (n, R), the mask bool. The images, all None
    without any: ``image_grid_thw`` (images, 3) lists every sample's images in row
    order, as the prompts hold them; ``pixel_values`` (patches, D) and
    ``unique_grid_thw`` (distinct, 3) hold each distinct image once (the samples of
    a group share theirs); ``image_source`` (images,) long says which distinct image
    each of the former is, so the vision tower runs once per distinct image.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    unique_grid_thw: torch.Tensor | None
    image_source: torch.Tensor | None

    def to(self, device: torch.device) -> PolicyInputs:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PolicyInputs(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


def encode_images(
    experiences: Sequence[Experience], image_processor: BaseImageProcessor | None, image_token_id: int | None
) -> list[VisionInput | None]:
    """Run the image processor on each sample's images (once per distinct ``images`` tuple).

    Returns one ``VisionInput`` per sample, None for a sample without images.

    Raises:
        ValueError: naming the sample and its group when it has images but the model
            has no vision tower, an image cannot be processed, or the prompt's number of
            image-pad tokens differs from what its images expand to.
    """
    cache: dict[int, VisionInput] = {}
    out: list[VisionInput | None] = []
    for index, exp in enumerate(experiences):
        where = f"sample {index} (group {exp.group_id})"
        pads = 0 if image_token_id is None else sum(1 for t in exp.prompt_ids if t == image_token_id)
        if not exp.images:
            if pads:
                raise ValueError(f"{where}: the prompt holds {pads} image-pad token(s) but the sample has no images")
            out.append(None)
            continue
        if image_processor is None:
            raise ValueError(f"{where} carries {len(exp.images)} image(s), but the model has no vision tower")
        encoded = cache.get(id(exp.images))
        if encoded is None:
            images = [pil_image(im, f"{where} image {j}") for j, im in enumerate(exp.images)]
            try:
                processed = image_processor(images=images, return_tensors="pt")
            except ValueError as err:
                raise ValueError(f"{where}: its images cannot be processed: {err}") from err
            encoded = VisionInput(processed["pixel_values"], processed["image_grid_thw"])
            cache[id(exp.images)] = encoded
        expected = int((encoded.image_grid_thw.prod(-1) // image_processor.merge_size**2).sum())
        if pads != expected:
            raise ValueError(
                f"{where}: the prompt holds {pads} image-pad token(s) but its {len(exp.images)} image(s) "
                f"expand to {expected}; the images must be the ones the rollout engine saw"
            )
        out.append(encoded)
    return out


def collate(
    experiences: Sequence[Experience],
    vision: Sequence[VisionInput | None],
    *,
    pad_token_id: int,
    image_token_id: int | None,
) -> PolicyInputs:
    """Pad ``experiences`` (n) into one ``PolicyInputs``; ``vision`` is ``encode_images``'s output for them."""
    if len(experiences) != len(vision) or not experiences:
        raise ValueError(f"collate: {len(experiences)} experiences and {len(vision)} vision inputs (need n >= 1 each)")
    n = len(experiences)
    width_p = max(len(e.prompt_ids) for e in experiences)
    width_r = max(len(e.response_ids) for e in experiences)
    input_ids = torch.full((n, width_p + width_r), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width_p + width_r), dtype=torch.long)
    response_ids = torch.full((n, width_r), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((n, width_r), dtype=torch.bool)
    for row, exp in enumerate(experiences):
        p, r = len(exp.prompt_ids), len(exp.response_ids)
        input_ids[row, width_p - p : width_p] = torch.tensor(exp.prompt_ids)
        input_ids[row, width_p : width_p + r] = torch.tensor(exp.response_ids, dtype=torch.long)
        attention_mask[row, width_p - p : width_p + r] = 1
        response_ids[row, :r] = input_ids[row, width_p : width_p + r]
        response_mask[row, :r] = True
    mm_token_type_ids = torch.full_like(input_ids, TEXT_TOKEN_TYPE, dtype=torch.int32)
    if image_token_id is not None:
        prompt_part = mm_token_type_ids[:, :width_p]
        prompt_part[input_ids[:, :width_p] == image_token_id] = IMAGE_TOKEN_TYPE
    encoded = [v for v in vision if v is not None]
    # encode_images gives the samples of one images tuple the same VisionInput object.
    first: dict[int, int] = {}  # id of a VisionInput -> where its images start among the distinct ones
    distinct: list[VisionInput] = []
    source: list[int] = []
    for v in encoded:
        if id(v) not in first:
            first[id(v)] = sum(len(u.image_grid_thw) for u in distinct)
            distinct.append(v)
        source += range(first[id(v)], first[id(v)] + len(v.image_grid_thw))
    return PolicyInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        response_ids=response_ids,
        response_mask=response_mask,
        pixel_values=torch.cat([v.pixel_values for v in distinct]) if encoded else None,
        image_grid_thw=torch.cat([v.image_grid_thw for v in encoded]) if encoded else None,
        unique_grid_thw=torch.cat([v.image_grid_thw for v in distinct]) if encoded else None,
        image_source=torch.tensor(source, dtype=torch.long) if encoded else None,
    )
