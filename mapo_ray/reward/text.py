"""Pure string helpers shared by the graders: answer extraction and the format check.

Model output is untrusted and can be long or adversarial (100k characters, 10k
nested braces), so every function here runs in time linear in its input and uses
no backtracking-prone regular expression.
"""

from __future__ import annotations

import re

# One token per character that matters for brace matching: an opening ``\boxed{``
# (spaces allowed before the brace), an escaped brace or backslash (literal text in
# LaTeX, so it must not change the depth), or a bare brace.
_BRACE_TOKENS = re.compile(r"\\boxed\s*\{|\\[\\{}]|[{}]")


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text``, or None.

    "Last" is by opening position, so in ``\\boxed{\\boxed{1}}`` it is ``1``. Nested
    braces are matched; ``\\{`` and ``\\}`` are literal. A box whose closing brace
    never comes (a truncated response) does not count. Linear time: one pass over
    the brace tokens with a stack.
    """
    stack: list[int | None] = []  # content start of each open box, None for a plain brace
    best: tuple[int, int] | None = None
    for match in _BRACE_TOKENS.finditer(text):
        token = match.group()
        if token.startswith("\\boxed"):
            stack.append(match.end())
        elif token == "{":
            stack.append(None)
        elif token == "}":
            if not stack:
                continue  # a stray closing brace outside any group
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, match.start())
    return None if best is None else text[best[0] : best[1]]


def has_think_box_format(response: str) -> bool:
    """Whether ``response`` (outer whitespace stripped) fully matches
    ``<think>.*</think>.*\\boxed{.*}.*`` with ``.`` matching newlines.

    Equivalent to that regex, but each ``.*`` is resolved by taking the earliest
    possible next marker, which keeps it linear where the regex could backtrack
    quadratically on a long response.
    """
    text = response.strip()
    if not text.startswith("<think>"):
        return False
    close = text.find("</think>", len("<think>"))
    if close < 0:
        return False
    box = text.find("\\boxed{", close + len("</think>"))
    return box >= 0 and text.rfind("}") >= box + len("\\boxed{")


def text_after_think(response: str) -> str:
    """The text after the last ``</think>``, or the whole response if there is none."""
    _, sep, tail = response.rpartition("</think>")
    return tail if sep else response


def truncate(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (for logs)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"
