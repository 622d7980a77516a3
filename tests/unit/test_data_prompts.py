"""Chat prompts built with the tiny model's real tokenizer and chat template (no Ray)."""

from __future__ import annotations

import pytest

from mapo_ray.data import FORMAT_INSTRUCTION, chat_messages, render_prompt
from mapo_ray.data.prompts import EMOSET_QUESTION, EMOTIONS

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mapo_ray.models.tiny import tiny_vl_path

    return AutoTokenizer.from_pretrained(tiny_vl_path())


def test_image_parts_sit_where_the_placeholders_were():
    [message] = chat_messages("<image>Find x. Compare <image> with the first.", instruction="Answer.")
    assert message["role"] == "user"
    assert message["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Find x. Compare "},
        {"type": "image"},
        {"type": "text", "text": " with the first.\n\nAnswer."},
    ]


def test_rendered_prompt_has_one_vision_block_per_image_in_place(tokenizer):
    prompt = render_prompt(tokenizer, "In the figure <image>, find the angle.")
    assert prompt.count(VISION) == 1
    assert f"In the figure {VISION}, find the angle." in prompt
    # The instruction follows the problem, and the prompt opens the assistant's turn.
    assert prompt.index(FORMAT_INSTRUCTION) > prompt.index("find the angle")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_instruction_asks_for_think_tags_and_a_boxed_answer():
    assert "<think>" in FORMAT_INSTRUCTION and "</think>" in FORMAT_INSTRUCTION
    assert "\\boxed{}" in FORMAT_INSTRUCTION


def test_prompt_without_images_has_no_vision_tokens(tokenizer):
    prompt = render_prompt(tokenizer, "What is 2 + 2?")
    assert VISION not in prompt and "What is 2 + 2?" in prompt


def test_emoset_question_lists_every_emotion_and_one_image():
    assert EMOSET_QUESTION.count("<image>") == 1
    assert all(emotion in EMOSET_QUESTION for emotion in EMOTIONS)
