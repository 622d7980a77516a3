"""The math grader: format and accuracy of a ``<think>...</think> ... \\boxed{answer}`` response.

Equivalence is decided by math-verify (Hugging Face), which parses LaTeX into SymPy
and compares numerically and symbolically; it covers ``\\frac``/``\\dfrac``, ``\\sqrt``,
degrees, ``\\left``/``\\right``, thousands separators, ``\\text{}`` units, percentages
and float rounding to 6 decimals. It is called here with its own signal-based
timeouts turned off: they only work in a main thread, and the time limit of every
grading is enforced one level up by running the grader in a child process
(``mapo_ray.reward.sandbox``). Nothing here evaluates the model's text as code.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from mapo_ray.reward.contract import RewardInputError
from mapo_ray.reward.text import has_think_box_format, last_boxed

_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


class _DropTimeoutNotice(logging.Filter):
    # math-verify warns once per process that its timeout is off; here that is on
    # purpose (see the module docstring), so the notice would only mislead.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())


def _parse(latex: str) -> list:
    # Wrapped in $...$ so math-verify reads the whole string as one LaTeX expression;
    # its result is SymPy objects, then the raw string as a fallback.
    return parse(f"${latex}$", extraction_config=_EXTRACTION, parsing_timeout=None)


@lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    """The parsed reference answer; every response of a group shares it, hence the cache."""
    parsed = _parse(answer)
    if not any(not isinstance(item, str) for item in parsed):
        raise RewardInputError(f"reference answer {answer!r} is not parsable as math")
    return tuple(parsed)


# A policy repeats itself: most boxed answers of a group, and of a run, are ones seen
# before, and a symbolic comparison that fails costs about 30 ms. The grading process
# is long-lived, so it remembers; a comparison that overran killed the process, so
# nothing it left half-done is remembered.
@lru_cache(maxsize=65536)
def math_equal(prediction: str, answer: str) -> bool:
    """Whether LaTeX ``prediction`` is mathematically equal to the reference ``answer``.

    Raises ``RewardInputError`` if ``answer`` does not parse; an unparsable
    prediction is simply not equal.
    """
    gold = _parse_answer(answer)
    return bool(verify(list(gold), _parse(prediction), timeout_seconds=None))


def score_math(
    response: str, answer: str, *, accuracy_weight: float = 0.9, format_weight: float = 0.1
) -> dict[str, float]:
    """Score one response against its reference answer.

    Returns ``{"overall", "format", "accuracy"}``: format is 1.0 when the response
    fully matches ``<think>...</think>...\\boxed{...}...``; accuracy is 1.0 when the
    last ``\\boxed{}`` content equals ``answer`` (see ``math_equal``);
    overall = accuracy_weight * accuracy + format_weight * format.
    """
    # The reference is checked even without a box, so a bad answer never hides
    # behind responses that happen not to box anything.
    _parse_answer(answer)
    boxed = last_boxed(response)
    accuracy = float(boxed is not None and math_equal(boxed, answer))
    fmt = float(has_think_box_format(response))
    return {
        "overall": accuracy_weight * accuracy + format_weight * fmt,
        "format": fmt,
        "accuracy": accuracy,
    }
