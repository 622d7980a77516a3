"""The tiny offline policies: tokenizer, chat template, model folders, input preparation."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import huggingface_hub.constants
import jinja2
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
)

from mapo_ray.models import (
    build_tiny_text,
    build_tiny_vl,
    prepare_inputs,
    tiny_text_path,
    tiny_vl_path,
)
from mapo_ray.models import tiny
from mapo_ray.models.tokenizer import (
    FORMAT_TOKENS,
    IM_END,
    IMAGE_PAD,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every load here must work with the Hub switched off."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return build_tiny_vl(tmp_path_factory.mktemp("vl") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(vl_dir):
    return AutoTokenizer.from_pretrained(vl_dir)


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _image(size: tuple[int, int], colour: str) -> Image.Image:
    image = Image.new("RGB", size, colour)
    # A second colour so the patches differ from one another.
    image.paste("white", (0, 0, size[0] // 2, size[1] // 3))
    return image


# --- tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Find x. In \\triangle ABC, m \\angle B = 90^\\circ and AB = 2\\sqrt{3}.",
        "<think> x = \\frac{3}{2} </think> The answer is \\boxed{\\frac{3}{2}}.",
        "How many red cubes are there?\n\nChoices: A. 3 B. 4",
        "naïve café 三角形 😀 \t tabs  and  spaces ",
    ],
)
def test_tokenizer_round_trips_task_text(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_tokenizer_round_trips_any_nfc_text(tokenizer, text):
    # The pipeline NFC-normalises first (as Qwen2's does), so only NFC text is
    # guaranteed to come back byte for byte.
    assume(unicodedata.normalize("NFC", text) == text)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_special_and_format_tokens_are_single_distinct_ids(tokenizer):
    ids = []
    for token in SPECIAL_TOKENS + FORMAT_TOKENS:
        encoded = tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert encoded.count(token_id) == 1, token
        ids.append(token_id)
    assert len(set(ids)) == len(ids)
    assert max(ids) == len(tokenizer) - 1
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD_TOKEN


def test_format_tokens_survive_skip_special_tokens(tokenizer):
    # The format reward reads <think>...</think> from decoded responses.
    text = "<think> 3 + 4 </think> \\boxed{7}<|im_end|><|endoftext|>"
    decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert decoded == "<think> 3 + 4 </think> \\boxed{7}"


def test_tokenizer_build_is_deterministic():
    first, second = build_tokenizer(4096), build_tokenizer(4096)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_task_text_is_compressed_by_the_learnt_merges(tokenizer):
    text = "Find the perimeter of the rectangle. The answer is \\boxed{12}."
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2


# --- chat template --------------------------------------------------------------


def test_chat_template_renders_one_placeholder_per_image(tokenizer):
    messages = _user({"type": "image"}, {"type": "text", "text": "Compare "}, {"type": "image"})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == f"<|im_start|>user\n{vision}Compare {vision}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_accepts_plain_string_content(tokenizer):
    messages = [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think> 4 </think> \\boxed{4}"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nThink first.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n<think> 4 </think> \\boxed{4}<|im_end|>\n"
    )


def test_chat_template_names_an_unsupported_part(tokenizer):
    with pytest.raises(jinja2.exceptions.TemplateError, match="audio.*user"):
        tokenizer.apply_chat_template(_user({"type": "audio"}), tokenize=False)


# --- model folders --------------------------------------------------------------


def test_vl_folder_loads_offline_with_consistent_ids(vl_dir, tokenizer):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir)
    config = model.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 64
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    processor = AutoImageProcessor.from_pretrained(vl_dir)
    assert isinstance(processor, Qwen2VLImageProcessorPil)
    assert (processor.size.shortest_edge, processor.size.longest_edge) == (tiny.MIN_PIXELS, tiny.MAX_PIXELS)


def test_build_is_deterministic_in_seed(vl_dir, tmp_path):
    again = load_file(build_tiny_vl(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_vl(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(vl_dir / "model.safetensors")
    assert reference.keys() == again.keys() == other.keys()
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    assert not all(torch.equal(reference[name], other[name]) for name in reference)


def test_reload_gives_the_built_model_outputs(vl_dir, tokenizer):
    # The in-memory model of the recipe and the folder must agree exactly.
    ids = tiny.special_token_ids(tokenizer)
    built = tiny._seeded_init(
        Qwen2_5_VLForConditionalGeneration, tiny.tiny_vl_config(len(tokenizer), ids), seed=0
    )
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir).eval()
    input_ids = tokenizer(["Find x. <think>"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(built(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)


def test_vl_forward_and_generate_with_images_of_different_sizes(vl_dir, tokenizer):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir).eval()
    processor = AutoImageProcessor.from_pretrained(vl_dir)
    questions = ["How many red cubes are there?", "Find x. In \\triangle ABC, AB = 2\\sqrt{3} and BC = 4."]
    prompts = [
        tokenizer.apply_chat_template(
            _user({"type": "image"}, {"type": "text", "text": q}), tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    images = [[_image((120, 64), "red")], [_image((500, 420), "blue")]]

    inputs = prepare_inputs(tokenizer, processor, prompts, images)

    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3) and not torch.equal(grid[0], grid[1])
    per_image = grid.prod(-1) // processor.merge_size**2
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert torch.equal((inputs["input_ids"] == image_id).sum(-1), per_image)
    assert torch.equal(inputs["mm_token_type_ids"] == 1, inputs["input_ids"] == image_id)
    assert inputs["pixel_values"].shape[0] == grid.prod(-1).sum()
    # Left padding: every row ends with the generation prompt, the shorter one starts padded.
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][:, 0].all()

    batch, length = inputs["input_ids"].shape
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (batch, length, len(tokenizer))
    assert torch.isfinite(logits).all()

    torch.manual_seed(0)
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert generated.shape[0] == batch and length < generated.shape[1] <= length + 8
    assert torch.equal(generated[:, :length], inputs["input_ids"])


def test_prepare_inputs_without_images_is_text_only(vl_dir, tokenizer):
    processor = AutoImageProcessor.from_pretrained(vl_dir)
    inputs = prepare_inputs(tokenizer, processor, ["What is 2 + 2?", "Hi"], [[], []])
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert not inputs["mm_token_type_ids"].any()


@pytest.mark.parametrize(
    ("prompts", "images", "message"),
    [
        (["<|image_pad|> a", "b"], [[], []], "prompt 0 has 1 .* but 0 image"),
        (["a", "b"], [[], [Image.new("RGB", (56, 56))]], "prompt 1 has 0 .* but 1 image"),
        (["a"], [[], []], "1 prompts but 2 image lists"),
    ],
)
def test_prepare_inputs_names_a_placeholder_mismatch(vl_dir, tokenizer, prompts, images, message):
    processor = AutoImageProcessor.from_pretrained(vl_dir)
    with pytest.raises(ValueError, match=message):
        prepare_inputs(tokenizer, processor, prompts, images)


def test_prepare_inputs_names_an_image_it_cannot_process(vl_dir, tokenizer):
    processor = AutoImageProcessor.from_pretrained(vl_dir)
    sliver = Image.new("RGB", (1000, 2))  # aspect ratio 500, beyond the processor's 200
    with pytest.raises(ValueError, match=r"image 1 of prompt 1 \(1000x2, mode RGB\).*aspect ratio"):
        prepare_inputs(
            tokenizer,
            processor,
            ["<|image_pad|>", "<|image_pad|><|image_pad|>"],
            [[_image((64, 64), "red")], [_image((64, 64), "red"), sliver]],
        )


def test_text_model_builds_loads_and_generates(tmp_path):
    folder = build_tiny_text(tmp_path / "text", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer([prompt], return_tensors="pt")
    torch.manual_seed(0)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=True)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# --- building and caching -------------------------------------------------------


def test_cached_paths_build_once_then_reuse(monkeypatch, tmp_path):
    monkeypatch.setenv("MAPO_RAY_CACHE", str(tmp_path))
    vl = tiny_vl_path()
    assert vl == tmp_path / "models" / f"{tiny.TINY_VL_NAME}-{tiny.MODEL_VERSION}"
    weights = vl / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert tiny_vl_path() == vl and weights.stat().st_mtime_ns == stamp
    text = tiny_text_path()
    assert text != vl and (text / "model.safetensors").is_file()
    # Only the finished folders remain: no partial build beside them.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted([vl.name, text.name])


def test_failed_build_leaves_nothing_behind(tmp_path):
    def write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        tiny._build_atomically(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def test_build_loses_a_race_cleanly(monkeypatch, tmp_path):
    """Another process renaming its finished build first is reported, and the cache reuses it."""
    monkeypatch.setenv("MAPO_RAY_CACHE", str(tmp_path))
    target = tiny.cache_dir() / "race-v0"

    def write(folder: Path) -> None:
        (folder / "mine").write_text("")
        target.mkdir()
        (target / "theirs").write_text("")

    with pytest.raises(FileExistsError, match="appeared while building"):
        tiny._build_atomically(target, write)
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in target.parent.iterdir()] == ["race-v0"]

    def lose_race(path: Path) -> Path:
        path.mkdir()  # the winner's folder
        return tiny._build_atomically(path, lambda folder: None)

    winner = tiny.cache_dir() / f"race-{tiny.MODEL_VERSION}"
    assert tiny._cached("race", lose_race) == winner


def test_cache_does_not_swallow_other_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("MAPO_RAY_CACHE", str(tmp_path))

    def broken_build(path: Path) -> Path:
        raise FileExistsError("something else")

    with pytest.raises(FileExistsError, match="something else"):
        tiny._cached("broken", broken_build)


def test_build_refuses_an_existing_folder(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        build_tiny_vl(tmp_path / "model")


def test_cli_builds_the_text_model(tmp_path, capsys):
    tiny.main(["--out", str(tmp_path / "cli"), "--text", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cli").config.model_type == "qwen2"
