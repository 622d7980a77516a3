"""Pure pieces of the learner: batch splitting, collation, image encoding, lr schedule, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from mapo_ray.config import ConfigError, load_config
from mapo_ray.learner import (
    Experience,
    collate,
    deepspeed_config,
    encode_images,
    lr_factor,
    shard_by_group,
    split_minibatches,
    token_budget_micro_batches,
)
from mapo_ray.learner.experience import padded_tokens
from mapo_ray.models import tiny_vl_path
from mapo_ray.models.tokenizer import IMAGE_PAD


def _experience(prompt: list[int], response: list[int], group: int = 0, images: tuple = ()) -> Experience:
    return Experience(
        prompt_ids=prompt,
        response_ids=response,
        response_logprobs=[0.0] * len(response),
        group_id=group,
        reward=0.0,
        success=None,
        weight_version=0,
        images=images,
    )


# ------------------------------------------------------------------- micro-batches


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 60)), min_size=1, max_size=40),
    budget=st.integers(1, 400),
    min_count=st.integers(1, 8),
)
def test_micro_batches_partition_within_budget(lengths, budget, min_count):
    prompts, responses = [p for p, _ in lengths], [r for _, r in lengths]
    parts = token_budget_micro_batches(prompts, responses, budget, min_count)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(lengths)))
    assert all(part for part in parts)
    for part in parts:
        size = padded_tokens([prompts[i] for i in part], [responses[i] for i in part])
        assert size <= budget or len(part) == 1
    assert len(parts) >= min(min_count, len(lengths))


def test_micro_batches_group_similar_lengths():
    # Two long and four short samples: the long ones share a micro-batch, the short ones another.
    prompts = [10, 50, 10, 10, 50, 10]
    responses = [5, 50, 5, 5, 50, 5]
    parts = token_budget_micro_batches(prompts, responses, budget=200)
    assert sorted(parts) == [[0, 2, 3, 5], [1, 4]]
    # One token less and the long ones no longer fit together.
    parts = token_budget_micro_batches(prompts, responses, budget=199)
    assert sorted(parts) == [[0, 2, 3, 5], [1], [4]]
    parts = token_budget_micro_batches(prompts, responses, budget=10_000)
    assert parts == [[0, 1, 2, 3, 4, 5]]


def test_micro_batches_split_to_min_count():
    parts = token_budget_micro_batches([4] * 6, [4] * 6, budget=10_000, min_count=3)
    assert len(parts) == 3 and sorted(len(p) for p in parts) == [1, 2, 3]
    # Cannot split below one sample each.
    assert len(token_budget_micro_batches([4, 4], [4, 4], budget=10_000, min_count=5)) == 2


def test_micro_batches_reject_bad_input():
    with pytest.raises(ValueError, match="budget"):
        token_budget_micro_batches([1], [1], budget=0)
    with pytest.raises(ValueError, match="2 prompt lengths but 1"):
        token_budget_micro_batches([1, 2], [1], budget=10)


# ------------------------------------------------------------------- shards and mini-batches


def test_shard_by_group_keeps_groups_whole_and_balances_tokens():
    # Groups interleaved in the batch, of different sizes and lengths.
    group_ids = [7, 3, 7, 3, 9, 9, 9, 1]
    tokens = [100, 10, 100, 10, 30, 30, 30, 50]
    shards = shard_by_group(group_ids, tokens, world_size=2)
    assert sorted(i for s in shards for i in s) == list(range(8))
    for shard in shards:
        assert shard == sorted(shard)
        groups = {group_ids[i] for i in shard}
        assert all(i in shard for i, g in enumerate(group_ids) if g in groups)
    loads = sorted(sum(tokens[i] for i in s) for s in shards)
    assert loads == [160, 200]  # group 7 (200) alone; 9 (90) + 1 (50) + 3 (20) on the other rank


def test_shard_by_group_needs_a_group_per_rank():
    with pytest.raises(ValueError, match="2 group\\(s\\), fewer than the 3 learner ranks"):
        shard_by_group([0, 0, 1], [1, 1, 1], world_size=3)


def test_split_minibatches():
    assert split_minibatches(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="3 sample\\(s\\) on this learner rank cannot fill learner.updates_per_step=4"):
        split_minibatches(3, 4)


# ------------------------------------------------------------------- experiences


def test_experience_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="group 4: 2 response_ids but 1 response_logprobs"):
        Experience([1], [2, 3], [0.0], group_id=4, reward=1.0, success=None, weight_version=0)
    with pytest.raises(ValueError, match="group 5: reward must be finite, got nan"):
        Experience([1], [2], [0.0], group_id=5, reward=math.nan, success=None, weight_version=0)
    with pytest.raises(ValueError, match="group 6: prompt_ids is empty"):
        Experience([], [2], [0.0], group_id=6, reward=0.0, success=None, weight_version=0)


# ------------------------------------------------------------------- collation and images


@pytest.fixture(scope="module")
def processors():
    path = tiny_vl_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, AutoImageProcessor.from_pretrained(path), tokenizer.convert_tokens_to_ids(IMAGE_PAD)


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_collate_layout_puts_every_response_at_one_column(processors):
    tokenizer, image_processor, image_pad = processors
    images = (_image(56, 56, 0),)  # a 4x4 patch grid: 4 merged tokens
    short = _experience([5, image_pad, image_pad, image_pad, image_pad, 6], [7, 8, 9], group=0, images=images)
    # A text-only sample whose response contains an image-pad token (sampled, not an image slot).
    long = _experience([1, 2, 3, 4, 5, 6, 7, 8], [image_pad, 11], group=1)
    vision = encode_images([short, long], image_processor, image_pad)
    assert vision[1] is None
    inputs = collate([short, long], vision, pad_token_id=0, image_token_id=image_pad)

    assert inputs.input_ids.tolist() == [
        [0, 0, 5, image_pad, image_pad, image_pad, image_pad, 6, 7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, image_pad, 11, 0],
    ]
    assert inputs.attention_mask.tolist() == [[0, 0] + [1] * 9, [1] * 10 + [0]]
    assert inputs.mm_token_type_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 11]
    assert inputs.response_ids.tolist() == [[7, 8, 9], [image_pad, 11, 0]]
    assert inputs.response_mask.tolist() == [[True, True, True], [True, True, False]]
    assert inputs.image_grid_thw.tolist() == [[1, 4, 4]]
    assert inputs.pixel_values.shape[0] == 16


def test_collate_holds_each_distinct_image_once(processors):
    """Two samples of one group share a one-image tuple; a third sample has two other images."""
    _, image_processor, image_pad = processors
    shared, pair = (_image(56, 56, 0),), (_image(56, 84, 1), _image(84, 56, 2))
    pads_shared, pads_pair = [image_pad] * 4, [image_pad] * 12  # 4 and 6 + 6 merged tokens
    exps = [
        _experience([5, *pads_shared, 6], [7], group=0, images=shared),
        _experience([5, *pads_pair, 6], [7], group=1, images=pair),
        _experience([5, *pads_shared, 6], [8, 9], group=0, images=shared),
    ]
    vision = encode_images(exps, image_processor, image_pad)
    assert vision[0] is vision[2]
    inputs = collate(exps, vision, pad_token_id=0, image_token_id=image_pad)
    # What the prompts hold, row by row (for the 3-D positions) ...
    assert inputs.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6], [1, 6, 4], [1, 4, 4]]
    # ... and what the vision tower runs on: each distinct image once.
    assert inputs.unique_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6], [1, 6, 4]]
    assert inputs.image_source.tolist() == [0, 1, 2, 0]
    expected = torch.cat([vision[0].pixel_values, vision[1].pixel_values])
    assert torch.equal(inputs.pixel_values, expected)


def test_encode_images_matches_prepare_inputs(processors):
    from mapo_ray.models import prepare_inputs

    tokenizer, image_processor, image_pad = processors
    images = (_image(56, 84, 1), _image(84, 56, 2))
    prompt = f"<|vision_start|>{IMAGE_PAD}<|vision_end|> and <|vision_start|>{IMAGE_PAD}<|vision_end|> ?"
    reference = prepare_inputs(tokenizer, image_processor, [prompt], [list(images)])
    exp = _experience(reference["input_ids"][0].tolist(), [1], images=images)
    (vision,) = encode_images([exp], image_processor, image_pad)
    torch.testing.assert_close(vision.pixel_values, reference["pixel_values"], rtol=0, atol=0)
    assert torch.equal(vision.image_grid_thw, reference["image_grid_thw"])
    inputs = collate([exp], [vision], pad_token_id=0, image_token_id=image_pad)
    assert torch.equal(inputs.mm_token_type_ids[:, :-1], reference["mm_token_type_ids"])


def test_encode_images_names_the_sample_with_a_pad_count_mismatch(processors):
    _, image_processor, image_pad = processors
    images = (_image(56, 56, 3),)
    good = _experience([image_pad] * 4, [1], group=0, images=images)
    bad = _experience([image_pad] * 3, [1], group=12, images=images)
    mismatch = "sample 1 \\(group 12\\): the prompt holds 3 image-pad token\\(s\\) but its 1 image\\(s\\) expand to 4"
    with pytest.raises(ValueError, match=mismatch):
        encode_images([good, bad], image_processor, image_pad)
    missing = "sample 0 \\(group 2\\): the prompt holds 2 image-pad token\\(s\\) but the sample has no images"
    with pytest.raises(ValueError, match=missing):
        encode_images([_experience([image_pad, image_pad], [1], group=2)], image_processor, image_pad)
    with pytest.raises(ValueError, match="sample 0 \\(group 0\\) carries 1 image\\(s\\), but the model has no vision"):
        encode_images([good], None, None)
    with pytest.raises(ValueError, match="sample 0 \\(group 0\\) image 0: expected a PIL image"):
        not_an_image = _experience([image_pad] * 4, [1], images=(np.zeros((4, 4), np.float32),))
        encode_images([not_an_image], image_processor, image_pad)


# ------------------------------------------------------------------- schedule and config


def test_lr_factor_warmup_then_constant_or_cosine():
    assert [lr_factor(s, 4, None, 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0, None, 0.0) == 1.0
    cosine = [lr_factor(s, 2, 10, 0.1) for s in range(14)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[2 + 5] == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert cosine[12:] == [pytest.approx(0.1)] * 2
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))


def test_learner_config_checks_its_keys():
    config = load_config(overrides=["learner.zero_stage=3", "learner.lr_decay_steps=100", "learner.min_lr_ratio=0.1"])
    assert (config.learner.zero_stage, config.learner.lr_decay_steps) == (3, 100)
    with pytest.raises(ConfigError, match="learner.zero_stage must be 0, 1, 2 or 3, got 4"):
        load_config(overrides=["learner.zero_stage=4"])
    with pytest.raises(ConfigError, match="did you mean 'learner.updates_per_step'"):
        load_config(overrides=["learner.update_per_step=2"])
    with pytest.raises(ConfigError, match="min_lr_ratio is only read with learner.lr_decay_steps"):
        load_config(overrides=["learner.min_lr_ratio=0.1"])


def test_deepspeed_config_policy_and_reference():
    cfg = load_config(overrides=["learner.zero_stage=2", "learner.grad_clip=0.5", "learner.precision=fp32"]).learner
    policy = deepspeed_config(cfg, world_size=4)
    assert policy["zero_optimization"] == {"stage": 2}
    assert policy["gradient_clipping"] == 0.5 and policy["bf16"] == {"enabled": False}
    assert policy["train_batch_size"] == 4 * policy["train_micro_batch_size_per_gpu"]
    assert deepspeed_config(cfg, 4, train=False)["zero_optimization"] == {"stage": 0}
    cfg3 = load_config(overrides=["learner.zero_stage=3", "learner.precision=bf16"]).learner
    reference = deepspeed_config(cfg3, 4, train=False)
    assert reference["zero_optimization"] == {"stage": 3} and reference["bf16"] == {"enabled": True}
    assert "gradient_clipping" not in reference
