"""Answer extraction and the format check: exact semantics, adversarial sizes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mapo_ray.reward.text import has_think_box_format, last_boxed, text_after_think, truncate

# The format's definition (has_think_box_format's docstring), as a regex; the linear check must agree with it.
FORMAT_REGEX = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)

FRAGMENTS = ["<think>", "</think>", "\\boxed{", "\\boxed {", "{", "}", "\\{", "\\}", "\\\\", "a", " ", "\n", "<", "/"]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)


def reference_last_boxed(text: str) -> str | None:
    """Quadratic but obvious: try each box from the last opening backwards and
    walk forward until its braces balance."""
    tokens = list(re.finditer(r"\\boxed\s*\{|\\[\\{}]|[{}]", text))
    for i in range(len(tokens) - 1, -1, -1):
        if not tokens[i].group().startswith("\\boxed"):
            continue
        depth = 1
        for token in tokens[i + 1 :]:
            if token.group() in ("{", "}") or token.group().startswith("\\boxed"):
                depth += 1 if token.group() != "}" else -1
            if depth == 0:
                return text[tokens[i].end() : token.start()]
    return None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no box here", None),
        ("\\boxed{42}", "42"),
        ("first \\boxed{1} then \\boxed{2}.", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{a \\} b}", "a \\} b"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\boxed{1}}", "1"),  # the last box by opening position
        ("\\boxed{3} and a cut-off \\boxed{4", "3"),  # an unclosed box does not count
        ("} stray } \\boxed{5} {", "5"),
        ("\\boxed{}", ""),
        ("\\\\boxed{6}", None),  # a LaTeX line break followed by the word "boxed"
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@settings(max_examples=300, deadline=None)
@given(fragment_text)
def test_last_boxed_matches_the_obvious_implementation(text):
    assert last_boxed(text) == reference_last_boxed(text)


@settings(max_examples=300, deadline=None)
@given(fragment_text)
def test_format_check_matches_the_regex(text):
    assert has_think_box_format(text) == bool(FORMAT_REGEX.fullmatch(text.strip()))


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>a</think> so \\boxed{1}.", True),
        ("\n<think>\nmulti\nline\n</think>\n\\boxed{x}\n", True),  # outer whitespace is ignored
        ("<think></think>\\boxed{}", True),
        ("\\boxed{1}", False),
        ("<think>a</think> 1", False),
        ("<think>a \\boxed{1}</think>", False),  # the box must come after the thinking
        ("pre <think>a</think>\\boxed{1}", False),  # must start with <think>
        ("<think>a</think>\\boxed{", False),
    ],
)
def test_format(response, ok):
    assert has_think_box_format(response) is ok


def test_adversarial_sizes_are_handled_in_one_pass():
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert last_boxed(nested) == "{" * 10_000 + "1" + "}" * 10_000
    unclosed = "\\boxed{" * 15_000  # 105k characters, no box ever closes
    assert last_boxed(unclosed) is None
    long_think = "<think>" + "</think>" * 12_500  # 100k characters, regex-hostile
    assert has_think_box_format(long_think) is False


def test_text_after_think_and_truncate():
    assert text_after_think("<think>x</think> Happy ") == " Happy "
    assert text_after_think("a</think>b</think>c") == "c"
    assert text_after_think("plain") == "plain"
    assert truncate("abc", 5) == "abc"
    assert truncate("x" * 250) == "x" * 200 + "...[50 more chars]"
