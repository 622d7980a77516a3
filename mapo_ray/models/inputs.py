"""Qwen2.5-VL model inputs from rendered prompts and PIL images, without the HF processor.

``Qwen2_5_VLProcessor`` imports torchvision, which does not load beside the CPU
torch build used here (PyPI's torchvision fails to import beside it), so its one job that the model needs is
done by hand: run the image processor, then widen each ``<|image_pad|>`` in the
prompt into as many pad tokens as the vision tower will emit for that image
(``grid_thw.prod() // merge_size**2``), and mark those tokens in
``mm_token_type_ids`` so the model can give them 3-D (M-RoPE) positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, Qwen2VLImageProcessorPil

from mapo_ray.models.tokenizer import IMAGE_PAD

# Values of mm_token_type_ids, as Qwen2.5-VL's get_rope_index reads them.
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1


def _expand_image_pads(prompt: str, counts: Iterator[int]) -> str:
    """Replace each ``<|image_pad|>`` of ``prompt``, in order, by ``next(counts)`` copies of it."""
    head, *rest = prompt.split(IMAGE_PAD)
    return head + "".join(IMAGE_PAD * next(counts) + piece for piece in rest)


def _process_images(
    image_processor: Qwen2VLImageProcessorPil, images: Sequence[Sequence[Image.Image]]
) -> dict[str, torch.Tensor]:
    """Run the processor on all images at once; on failure, name the image that failed."""
    flat = [image for prompt_images in images for image in prompt_images]
    try:
        return dict(image_processor(images=flat, return_tensors="pt"))
    except ValueError as batch_error:
        # Rare path: find the culprit one image at a time so the error can point at it.
        for i, prompt_images in enumerate(images):
            for j, image in enumerate(prompt_images):
                try:
                    image_processor(images=[image], return_tensors="pt")
                except ValueError as err:
                    raise ValueError(
                        f"prepare_inputs: image {j} of prompt {i} ({image.width}x{image.height}, "
                        f"mode {image.mode}) cannot be processed: {err}"
                    ) from err
        raise batch_error


def prepare_inputs(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Qwen2VLImageProcessorPil,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of B prompts with their images, left-padded for generation.

    Args:
        prompts: B chat-template renderings; prompt i holds one ``<|image_pad|>``
            per image in ``images[i]``, in order.
        images: B lists of PIL images (a list may be empty).

    Returns:
        ``input_ids`` (B, L) int64, ``attention_mask`` (B, L) int64 (0 on the left
        padding), ``mm_token_type_ids`` (B, L) int32 (1 on image tokens, else 0);
        when any image is given, also ``pixel_values`` (P, C*T*14*14) float32 with P
        the total patch count, and ``image_grid_thw`` (N, 3) int64 for the N images
        in batch order. Pass the dict to ``model(**inputs)`` or ``model.generate``.

    Raises:
        ValueError: when the batch sizes differ, prompt i has a number of
            ``<|image_pad|>`` that is not ``len(images[i])``, or an image cannot be
            processed (e.g. aspect ratio over 200); the message names the prompt
            and image.
    """
    if len(prompts) != len(images):
        raise ValueError(f"prepare_inputs: {len(prompts)} prompts but {len(images)} image lists")
    for i, (prompt, prompt_images) in enumerate(zip(prompts, images)):
        n_pads = prompt.count(IMAGE_PAD)
        if n_pads != len(prompt_images):
            raise ValueError(
                f"prepare_inputs: prompt {i} has {n_pads} {IMAGE_PAD} placeholder(s) "
                f"but {len(prompt_images)} image(s)"
            )

    vision: dict[str, torch.Tensor] = {}
    texts = list(prompts)
    if any(images):
        vision = _process_images(image_processor, images)
        tokens_per_image = (vision["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
        counts = iter(tokens_per_image)  # images are in prompt order, so one shared cursor
        texts = [_expand_image_pads(prompt, counts) for prompt in prompts]

    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    mm_token_type_ids = torch.where(
        encoded["input_ids"] == image_token_id, IMAGE_TOKEN_TYPE, TEXT_TOKEN_TYPE
    ).to(torch.int32)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": mm_token_type_ids,
        **vision,
    }
