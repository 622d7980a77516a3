"""The label grader: the response names one label of a fixed set (e.g. an emotion).

The response's answer is the content of its last ``\\boxed{}``; without a box, the
text after the last ``</think>`` (or the whole response if there is none), so a
model that answers in plain words is still graded. Comparison ignores case, outer
whitespace, a trailing period and a ``\\text{...}`` wrapper.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mapo_ray.reward.contract import RewardInputError
from mapo_ray.reward.text import has_think_box_format, last_boxed, text_after_think

_TEXT_WRAPPER = re.compile(r"\\text\s*\{(.*)\}", re.DOTALL)


def normalize_label(text: str) -> str:
    """``text`` reduced to the form labels are compared in (case-folded, unwrapped)."""
    text = text.strip()
    wrapped = _TEXT_WRAPPER.fullmatch(text)
    if wrapped:
        text = wrapped.group(1).strip()
    return text.rstrip(".").strip().casefold()


def response_label(response: str) -> str:
    """The label a response gives, normalized (see the module docstring for where it is read)."""
    boxed = last_boxed(response)
    return normalize_label(boxed if boxed is not None else text_after_think(response))


def score_label(
    response: str,
    answer: str,
    *,
    labels: Sequence[str],
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
) -> dict[str, float]:
    """Score one response against the reference label ``answer``.

    Returns ``{"overall", "format", "accuracy"}`` as ``score_math`` does; accuracy is
    1.0 when the response's label equals ``answer`` ignoring case. Raises
    ``RewardInputError`` if ``answer`` is not in ``labels``.
    """
    gold = normalize_label(answer)
    if gold not in {normalize_label(label) for label in labels}:
        raise RewardInputError(f"reference label {answer!r} is not in the label set {list(labels)}")
    accuracy = float(response_label(response) == gold)
    fmt = float(has_think_box_format(response))
    return {
        "overall": accuracy_weight * accuracy + format_weight * fmt,
        "format": fmt,
        "accuracy": accuracy,
    }
