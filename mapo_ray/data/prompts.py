"""Chat prompts for the two tasks: pure functions over strings and a tokenizer.

The text of a Geo3K problem marks each image with ``<image>``. The chat message puts
an image part exactly there, so the tokenizer's chat template renders
``<|vision_start|><|image_pad|><|vision_end|>`` in its place, and the format
instruction follows the problem.
"""

from __future__ import annotations

from typing import Any, Protocol

IMAGE_PLACEHOLDER = "<image>"

# The response format the reward grades: reasoning in <think></think>, answer in \boxed{}.
FORMAT_INSTRUCTION = (
    "Work through the problem step by step inside <think> </think> tags. "
    "After the closing tag, give the final answer alone inside \\boxed{}."
)

# EmoSet's eight emotion categories (Mikels' model), in its own spelling.
EMOTIONS: tuple[str, ...] = (
    "amusement",
    "anger",
    "awe",
    "contentment",
    "disgust",
    "excitement",
    "fear",
    "sadness",
)
EMOSET_QUESTION = (
    f"{IMAGE_PLACEHOLDER}Which emotion does this image evoke most strongly? "
    f"Choose one of: {', '.join(EMOTIONS)}."
)


class ChatTokenizer(Protocol):
    """What prompt rendering needs from a Hugging Face tokenizer."""

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


def chat_messages(problem: str, instruction: str = FORMAT_INSTRUCTION) -> list[dict[str, Any]]:
    """One user turn: the problem's text with an image part at each ``<image>``, then ``instruction``."""
    text = f"{problem.rstrip()}\n\n{instruction}" if instruction else problem
    content: list[dict[str, Any]] = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer: ChatTokenizer, problem: str, instruction: str = FORMAT_INSTRUCTION) -> str:
    """The chat-templated prompt string, ending with the assistant turn's opening."""
    prompt = tokenizer.apply_chat_template(
        chat_messages(problem, instruction), tokenize=False, add_generation_prompt=True
    )
    if not isinstance(prompt, str):
        raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
    return prompt
