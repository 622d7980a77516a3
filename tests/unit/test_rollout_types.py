"""Rollout inputs and config: validation that names the field, image and batch conversion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mapo_ray.config import ConfigError, RolloutConfig, load_config
from mapo_ray.rollout import sampling_params
from mapo_ray.types import Prompt, SamplingParams, pil_image, prompts_from_batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=0), "SamplingParams.n"),
        (dict(temperature=-0.1), "SamplingParams.temperature"),
        (dict(temperature=float("nan")), "SamplingParams.temperature"),
        (dict(temperature=0.0, n=4), "greedy"),
        (dict(top_p=0.0), "SamplingParams.top_p"),
        (dict(top_p=1.5), "SamplingParams.top_p"),
        (dict(max_new_tokens=0), "SamplingParams.max_new_tokens"),
        (dict(stop="</think>"), "SamplingParams.stop"),
        (dict(stop=("",)), "SamplingParams.stop"),
        (dict(seed=-1), "SamplingParams.seed"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_keep_stop_as_a_tuple():
    params = SamplingParams(n=2, stop=["</answer>"])
    assert params.stop == ("</answer>",) and not params.greedy
    assert SamplingParams(temperature=0.0).greedy


def test_pil_image_accepts_arrays_and_images_and_names_bad_input():
    array = np.zeros((28, 56, 3), dtype=np.uint8)
    array[:, :28] = 255
    image = pil_image(array, "prompt 'a' image 0")
    assert image.size == (56, 28) and image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    assert pil_image(Image.new("L", (8, 8)), "x").mode == "RGB"
    with pytest.raises(ValueError, match=r"prompt 'a' image 1: .*array \(28, 56\) float32"):
        pil_image(np.zeros((28, 56), dtype=np.float32), "prompt 'a' image 1")
    with pytest.raises(ValueError, match="prompt 'b' image 0: .* got bytes"):
        pil_image(b"\x89PNG", "prompt 'b' image 0")


def _object_column(values):
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def test_prompts_from_a_data_batch():
    images = [[np.zeros((56, 56, 3), np.uint8)], []]
    batch = {
        "uid": np.array(["a.parquet#0", "a.parquet#1"], dtype=object),
        "prompt": np.array(["<|image_pad|>Find x.", "What is 2+2?"], dtype=object),
        "images": _object_column(images),
        "answer": np.array(["3", "4"], dtype=object),
    }
    prompts = prompts_from_batch(batch)
    assert [p.uid for p in prompts] == ["a.parquet#0", "a.parquet#1"]
    assert [len(p.images) for p in prompts] == [1, 0] and prompts[1].answer == "4"
    assert isinstance(prompts[0], Prompt)
    del batch["answer"]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        prompts_from_batch(batch)


def test_rollout_config_defaults_give_the_paper_sampling():
    params = sampling_params(RolloutConfig(), seed=5)
    assert (params.n, params.temperature, params.top_p, params.max_new_tokens, params.seed) == (12, 1.0, 0.99, 2048, 5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.group_size=0", "rollout.group_size must be positive"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.temperature=0", "rollout.group_size is 12"),
        ("rollout.tensor_parallel_size=2", "needs rollout.engine 'vllm'"),
        ("rollout.sleep_between_rollouts=true", "rollout.sleep_between_rollouts"),
        ("rollout.engine=sglang", "rollout.engine"),
        ("rollout.stop=['']", "rollout.stop"),
        ("rollout.top_k=5", "unknown config key 'rollout.top_k'"),
    ],
)
def test_rollout_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_rollout_config_accepts_vllm_on_cuda_with_sleep():
    cfg = load_config(
        overrides=["rollout.engine=vllm", "rollout.device=cuda", "rollout.tensor_parallel_size=2",
                   "rollout.sleep_between_rollouts=true"]
    ).rollout
    assert (cfg.engine, cfg.tensor_parallel_size, cfg.sleep_between_rollouts) == ("vllm", 2, True)
