"""The math grader on real math-verify: components, weights, 20 tricky answer pairs."""

from __future__ import annotations

import pytest

from mapo_ray.config import RewardConfig
from mapo_ray.reward import RewardInputError, load_reward_fn, math_equal, score_math


def respond(boxed: str) -> str:
    return f"<think>Let me work it out.</think> The answer is \\boxed{{{boxed}}}."


# (boxed content, reference answer, expected accuracy, why); the report's table.
TRICKY_PAIRS = [
    (r"\dfrac{1}{2}", "0.5", 1.0, "\\dfrac and a decimal are the same number"),
    (r"2\sqrt{3}", r"\sqrt{12}", 1.0, "radicals are simplified symbolically"),
    (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}", 1.0, "brace-less LaTeX arguments parse"),
    (r"30^\circ", "30", 1.0, "a degree sign is dropped"),
    (r"\frac{\pi}{3}", r"60^\circ", 0.0, "radians are not converted to degrees"),
    (r"\left(1, 2\right)", "(1,2)", 1.0, "\\left/\\right and spaces are ignored"),
    ("(2,1)", "(1,2)", 0.0, "tuples and intervals are ordered"),
    (r"\{1,2\}", r"\{2,1\}", 1.0, "sets are not ordered"),
    ("1,000", "1000", 1.0, "a thousands separator is read as such"),
    (r"12 \text{ cm}", "12", 1.0, "a trailing unit is dropped"),
    ("12 m", "12 cm", 1.0, "units are dropped, never converted (a known limit)"),
    ("0.333333", r"\frac{1}{3}", 1.0, "floats are compared rounded to 6 decimals"),
    ("0.33", r"\frac{1}{3}", 0.0, "two decimals are outside that tolerance"),
    ("2.828", r"2\sqrt{2}", 0.0, "a 3-decimal approximation of an exact answer fails"),
    ("x = 5", "5", 1.0, "an assignment is compared by its right-hand side"),
    (r"10\%", "0.1", 1.0, "a percentage is divided by 100"),
    (r"8\frac{1}{2}", "8.5", 1.0, "a mixed number is read as 8 + 1/2"),
    ("AB", "BA", 1.0, "letters are symbols and a product commutes (a known limit for segment names)"),
    ("1e3", "1000", 0.0, "scientific 'e' notation is not read as a number"),
    (r"\text{none}", "0", 0.0, "words are not numbers"),
]


@pytest.mark.parametrize(("boxed", "answer", "accuracy", "why"), TRICKY_PAIRS, ids=[p[0] for p in TRICKY_PAIRS])
def test_tricky_pairs(boxed, answer, accuracy, why):
    scores = score_math(respond(boxed), answer)
    assert scores["accuracy"] == accuracy, why


def test_components_and_default_weights():
    assert score_math(respond("4"), "4") == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
    assert score_math(respond("5"), "4") == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}
    unformatted = score_math("The answer is \\boxed{4}", "4")
    assert unformatted == {"overall": pytest.approx(0.9), "format": 0.0, "accuracy": 1.0}
    assert score_math("<think>hmm</think> four", "4") == {"overall": 0.0, "format": 0.0, "accuracy": 0.0}


def test_the_last_box_is_graded():
    assert score_math("\\boxed{4} no wait \\boxed{5}", "5")["accuracy"] == 1.0
    assert score_math("\\boxed{5} no wait \\boxed{4}", "5")["accuracy"] == 0.0
    assert score_math("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}")["accuracy"] == 1.0


def test_weights_come_from_the_config():
    fn = load_reward_fn(RewardConfig(accuracy_weight=0.5, format_weight=0.5))
    assert fn("\\boxed{4}", "4")["overall"] == 0.5
    assert fn(respond("4"), "4")["overall"] == 1.0


def test_unparsable_prediction_is_just_wrong():
    assert math_equal("\\frac{1}{", "1") is False
    assert score_math(respond("}{ ??? \\sqrt"), "2")["accuracy"] == 0.0


@pytest.mark.parametrize("answer", ["???", "", "\\frac{1}{"])
def test_unparsable_reference_answer_is_an_error_naming_it(answer):
    with pytest.raises(RewardInputError, match=r"reference answer .* is not parsable as math"):
        score_math(respond("1"), answer)
    # Also when the response has no box, so a bad answer is never hidden.
    with pytest.raises(RewardInputError):
        score_math("no box", answer)


def test_a_repeated_comparison_is_remembered_and_gives_the_same_verdict():
    math_equal.cache_clear()
    first = [math_equal("red", "blue"), math_equal("\\frac{2}{4}", "\\frac{1}{2}")]
    again = [math_equal("red", "blue"), math_equal("\\frac{2}{4}", "\\frac{1}{2}")]
    assert first == again == [False, True]
    assert math_equal.cache_info().hits == 2
