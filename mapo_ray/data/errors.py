"""The two ways bad input leaves the data pipeline.

``DataError`` is raised, before any Ray work starts, for a problem with a whole file
or its schema (it names the file and, where one is at fault, the column). ``RowSkip``
is raised by the per-row functions for a problem with one row: the pipeline turns it
into a row marked with its reason, and the consumer counts and drops it, so every
skipped row shows up as a ``data/skipped/<reason>`` metric.
"""

from __future__ import annotations

# Every reason a row can be skipped for; consumers report a counter for each.
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # no image bytes and no readable path
    "corrupt_image",  # bytes that PIL cannot decode
    "image_too_large",  # declared size over data.max_decode_pixels
    "image_aspect_ratio",  # too elongated for a 28-px patch grid
    "empty_problem",
    "placeholder_mismatch",  # number of <image> in the problem != number of images
    "missing_answer",  # answer null, empty or not a string
    "invalid_text",  # a text cell whose bytes are not UTF-8
    "unknown_label",  # EmoSet label outside its eight emotions
    "prompt_too_long",  # templated prompt, image tokens included, over data.max_prompt_tokens
)


class DataError(ValueError):
    """A source, file or schema that cannot be read; the message names the file and column."""


class RowSkip(ValueError):
    """One row that cannot become a prompt: ``reason`` (one of ``SKIP_REASONS``) and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
