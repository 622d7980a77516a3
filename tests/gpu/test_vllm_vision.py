"""``VLLMEngine`` on the tiny Qwen2.5-VL with images, on a CUDA device with the official vLLM.

vLLM's CPU build cannot run the vision path (its Qwen2.5-VL processor imports
torchvision, which does not load beside the CPU torch build), so this
is the only test of ``multi_modal_data``: after a weight update, vLLM's greedy responses
to image prompts equal ``HFEngine``'s on the same GPU and weights, seeded sampling
repeats itself, and sleeping between rollouts changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mapo_ray.data.prompts import render_prompt
from mapo_ray.models import tiny_vl_path
from mapo_ray.rollout import HFEngine
from mapo_ray.types import Prompt, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device; none is visible", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM: pip install -c constraints/gpu.txt -e '.[vllm]'")

from mapo_ray.rollout import VLLMEngine  # noqa: E402

GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Seeded noise on every matrix: moves the random tiny model off its near-uniform logits."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, w + scale * torch.randn(w.shape, generator=generator) if w.ndim == 2 else w)
        for name, w in ((n, p.detach().cpu()) for n, p in model.named_parameters())
    ]


def image(size: tuple[int, int], colour: str) -> Image.Image:
    picture = Image.new("RGB", size, colour)
    picture.paste("white", (0, 0, size[0] // 2, size[1] // 3))
    return picture


@pytest.fixture(scope="module")
def hf() -> HFEngine:
    return HFEngine(tiny_vl_path(), device="cuda", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(hf) -> list[Prompt]:
    render = lambda problem: render_prompt(hf.tokenizer, problem)  # noqa: E731
    return [
        Prompt("v0", render("<image>Find x. AB = 3."), (image((112, 84), "red"),)),
        Prompt("v1", render("How many cubes are in <image>?"), (np.asarray(image((56, 140), "blue")),)),
        Prompt("v2", render("Compare <image> with <image>."), (image((56, 56), "green"), image((84, 84), "gray"))),
    ]


@pytest.fixture(scope="module")
def engine():
    return VLLMEngine(
        tiny_vl_path(), dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024, sleep_between_rollouts=True
    )


def test_image_prompts_match_hf_after_a_weight_update(engine, hf, prompts):
    before = [g.samples[0].response_ids for g in engine.generate(prompts, GREEDY)]
    update = perturbed(hf.model, scale=0.1, seed=1)
    engine.load_weights(update, version=1)
    hf.load_weights(update, version=1)
    got = engine.generate(prompts, GREEDY)
    want = hf.generate(prompts, GREEDY)
    assert engine.weight_version == 1
    assert [g.samples[0].response_ids for g in got] != before
    for g, w in zip(got, want):
        # vLLM expands each <|image_pad|> itself; the expanded prompts must agree token for token.
        assert g.samples[0].prompt_ids == w.samples[0].prompt_ids
        assert g.samples[0].response_ids == w.samples[0].response_ids
        assert g.samples[0].weight_version == 1
        torch.testing.assert_close(
            torch.tensor(g.samples[0].response_logprobs),
            torch.tensor(w.samples[0].response_logprobs),
            atol=2e-3,
            rtol=0,
        )


def test_seeded_sampling_repeats_across_sleeps(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5)
    first = engine.generate(prompts, params)
    second = engine.generate(prompts, params)  # the engine slept and woke in between
    ids = lambda groups: [s.response_ids for g in groups for s in g.samples]  # noqa: E731
    assert ids(first) == ids(second)
    for group in first:
        assert len(group.samples) == 4 and len({tuple(s.response_ids) for s in group.samples}) > 1
        for sample in group.samples:
            assert len(sample.response_logprobs) == len(sample.response_ids)
            assert all(np.isfinite(sample.response_logprobs)) and max(sample.response_logprobs) <= 0
