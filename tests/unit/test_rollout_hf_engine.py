"""``HFEngine`` on the tiny offline models: batching, log-probs, seeds, stops, weight loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mapo_ray.data.prompts import render_prompt
from mapo_ray.models import prepare_inputs, tiny_text_path, tiny_vl_path
from mapo_ray.rollout import HFEngine, token_logprobs
from mapo_ray.types import Prompt, SamplingParams


@pytest.fixture(scope="module")
def vl() -> HFEngine:
    return HFEngine(tiny_vl_path())


@pytest.fixture(scope="module")
def text() -> HFEngine:
    return HFEngine(tiny_text_path())


def _image(size: tuple[int, int], colour: str) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste("white", (0, 0, size[0] // 2, size[1] // 3))
    return image


@pytest.fixture(scope="module")
def vl_prompts(vl) -> list[Prompt]:
    # Different image sizes and text lengths, so the batch is left-padded.
    render = lambda problem: render_prompt(vl.tokenizer, problem)  # noqa: E731
    return [
        Prompt("geo#0", render("<image>Find x. AB = 3 and BC = 4."), (_image((112, 84), "red"),), "5"),
        Prompt("geo#1", render("How many red cubes are there in <image>?"), (_image((56, 140), "blue"),), "2"),
        Prompt(
            "geo#2",
            render("Compare <image> and <image>: which is larger?"),
            (_image((56, 56), "green"), _image((84, 84), "gray")),
            "B",
        ),
    ]


def text_types(mm_token_type_ids: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` extended over the (text) response tokens."""
    return torch.cat([mm_token_type_ids, torch.zeros_like(response, dtype=mm_token_type_ids.dtype)], dim=1)


def _text_prompts(engine: HFEngine, *questions: str) -> list[Prompt]:
    render = lambda question: render_prompt(engine.tokenizer, question, instruction="")  # noqa: E731
    return [Prompt(f"q{i}", render(q), answer=str(i)) for i, q in enumerate(questions)]


def test_logprobs_are_those_of_the_sampled_distribution(vl, vl_prompts):
    """Each recorded log-prob equals ``token_logprobs`` (temperature-scaled, no top-p cut)
    on a teacher-forced forward pass of prompt + response, one prompt at a time: the
    learner's recomputation, although the tokens were drawn with top-p 0.9."""
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=0)
    groups = vl.generate(vl_prompts, params)
    assert [g.uid for g in groups] == [p.uid for p in vl_prompts]
    for prompt, group in zip(vl_prompts, groups):
        inputs = prepare_inputs(vl.tokenizer, vl.image_processor, [prompt.text], [list(prompt.images)])
        assert len(group.samples) == 2 and group.answer == prompt.answer
        for sample in group.samples:
            assert sample.prompt_ids == inputs["input_ids"][0].tolist()
            response = torch.tensor([sample.response_ids])
            ids = torch.cat([inputs["input_ids"], response], dim=1)
            with torch.no_grad():
                logits = vl.model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=text_types(inputs["mm_token_type_ids"], response),
                    pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"],
                ).logits
            prompt_len = inputs["input_ids"].shape[1]
            expected = token_logprobs(logits[:, prompt_len - 1 : -1], response, 0.7)[0]
            torch.testing.assert_close(torch.tensor(sample.response_logprobs), expected, atol=1e-4, rtol=0)
            assert torch.isfinite(expected).all()


def test_batched_greedy_equals_one_prompt_at_a_time(vl, vl_prompts):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    batched = vl.generate(vl_prompts, greedy)
    for prompt, group in zip(vl_prompts, batched):
        alone = vl.generate([prompt], greedy)[0].samples[0]
        assert group.samples[0].response_ids == alone.response_ids
        assert group.samples[0].prompt_ids == alone.prompt_ids
        torch.testing.assert_close(group.samples[0].response_logprobs, alone.response_logprobs, atol=1e-4, rtol=0)


def test_seeded_sampling_repeats_and_different_seeds_differ(text):
    prompts = _text_prompts(text, "What is 2 + 2?", "Find the perimeter of the rectangle with sides 3 and 4.")
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=11)
    first, again = text.generate(prompts, params), text.generate(prompts, params)
    other = text.generate(prompts, SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=12))
    ids = lambda groups: [s.response_ids for g in groups for s in g.samples]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)
    for prompt, group in zip(prompts, first):
        assert group.uid == prompt.uid and group.answer == prompt.answer
        assert len({tuple(s.response_ids) for s in group.samples}) > 1
        for s in group.samples:
            assert s.group_uid == prompt.uid and s.weight_version == 0
            assert s.prompt_ids == text.tokenizer(prompt.text)["input_ids"]
            # The random tiny model never says eos this early.
            assert s.finish_reason == "length" and len(s.response_ids) == len(s.response_logprobs) == 8
            assert s.response_text == text.tokenizer.decode(s.response_ids, skip_special_tokens=True)


def test_a_stop_string_ends_the_response_after_its_last_token(text):
    prompts = _text_prompts(text, "How many red cubes are there?")
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=3)
    full = text.generate(prompts, params)[0].samples[0]
    stop = text.tokenizer.decode(full.response_ids[5:7])  # two tokens from the middle
    assert stop and full.finish_reason == "length"
    stopped = SamplingParams(n=1, temperature=1.0, max_new_tokens=16, seed=3, stop=(stop,))
    cut = text.generate(prompts, stopped)[0].samples[0]
    assert cut.finish_reason == "stop"
    assert cut.response_ids == full.response_ids[: len(cut.response_ids)] and len(cut.response_ids) <= 7
    assert stop in cut.response_text
    assert cut.response_logprobs == full.response_logprobs[: len(cut.response_ids)]


def test_load_weights_changes_generation_and_advances_the_version():
    engine = HFEngine(tiny_text_path())
    prompts = _text_prompts(engine, "What is 2 + 2?", "Find x.")
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    before = [g.samples[0].response_ids for g in engine.generate(prompts, greedy)]
    g = torch.Generator().manual_seed(0)
    update = [(n, p + 0.1 * torch.randn(p.shape, generator=g)) for n, p in engine.model.named_parameters()]
    engine.load_weights(update, version=1)
    after = engine.generate(prompts, greedy)
    assert engine.weight_version == 1 and all(g.samples[0].weight_version == 1 for g in after)
    assert [g.samples[0].response_ids for g in after] != before

    with pytest.raises(ValueError, match="no parameter or buffer 'model.layers.9.mlp.up_proj.weight'"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))], version=2)
    # A failed update leaves the engine with no version, and it refuses to sample.
    assert engine.weight_version is None
    with pytest.raises(RuntimeError, match="weight update failed part-way"):
        engine.generate(prompts, greedy)
    name, param = update[0]
    shape = rf"\[{param.shape[0]}, {param.shape[1]}\]"
    with pytest.raises(ValueError, match=rf"'{name}' has shape {shape}, the update gives \[3\]"):
        engine.load_weights([(name, torch.zeros(3))], version=2)
    engine.load_weights(update, version=2)
    assert engine.generate(prompts, greedy)[0].samples[0].weight_version == 2


def test_bad_inputs_name_the_prompt(text, vl):
    image_prompt = Prompt("row-7", render_prompt(text.tokenizer, "<image>What is shown?"), (_image((56, 56), "red"),))
    with pytest.raises(ValueError, match=r"\['row-7'\] carry images, but the model has no vision tower"):
        text.generate([image_prompt], SamplingParams())
    flat = Prompt("row-8", image_prompt.text, (torch.zeros(3).numpy(),))
    with pytest.raises(ValueError, match="prompt 'row-8' image 0: expected a PIL image"):
        vl.generate([flat], SamplingParams())
    assert vl.generate([], SamplingParams()) == []
