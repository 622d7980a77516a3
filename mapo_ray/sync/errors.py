"""The one error type of weight sync."""

from __future__ import annotations


class WeightSyncError(RuntimeError):
    """A weight update could not be planned, sent, received or loaded; the message says who and where."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (gloo and Ray append long tails), else its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
