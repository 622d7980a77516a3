"""Per-row and per-batch work of the prompt pipeline: pure functions, no Ray.

Producer side (inside Ray Data workers): ``prepare_table`` turns raw rows into the
output schema, marking a row it cannot use with its skip reason rather than dropping
it. Consumer side: ``drop_skipped`` separates those rows (to be counted), ``rebatch``
regroups the usable ones into batches of an exact size and ``to_batch`` hands them
over as numpy columns.

Output row schema, one prompt per row:

- ``uid`` (str): ``"<file name>#<row index in that file>"``, stable across epochs and
  machines; it names the row in every skip message.
- ``prompt`` (str): the chat-templated prompt.
- ``images`` (list of ``(H, W, 3) uint8`` arrays): decoded and resized, ready for an
  HF processor or vLLM's ``multi_modal_data`` with no further decoding. In transit
  they are ``IMAGES_TYPE`` structs (``pack_image`` / ``unpack_image``).
- ``answer`` (str), plus the source's other columns, passed through unchanged.
- ``skip_reason`` / ``skip_detail`` (str): empty for a usable row (producer side only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mapo_ray.data.errors import RowSkip
from mapo_ray.data.images import PixelBudget, load_image
from mapo_ray.data.prompts import EMOSET_QUESTION, EMOTIONS, IMAGE_PLACEHOLDER

Batch = dict[str, np.ndarray]
# prompt, images, answer
Prepared = tuple[str, list[np.ndarray], str]
# Images travel through Ray Data as raw pixels in a plain Arrow type: decoded once, by the
# producer, and neither re-encoded nor pickled on the way to the consumer.
IMAGES_TYPE = pa.list_(pa.struct([("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.binary())]))

GEO3K_COLUMNS: tuple[str, ...] = ("images", "problem", "answer")
EMOSET_COLUMNS: tuple[str, ...] = ("image", "emotion")
OUTPUT_COLUMNS: tuple[str, ...] = ("uid", "prompt", "images", "answer", "skip_reason", "skip_detail")
# Attached by the reader to each raw row: the full path of the file it came from.
FILE_COLUMN = "_file"
# Pixels of one merged vision token of Qwen2.5-VL (14-px patches merged 2 x 2).
PIXELS_PER_IMAGE_TOKEN = 28 * 28


def prepare_row(
    row: Mapping[str, Any],
    *,
    render: Callable[[str], str],
    budget: PixelBudget,
    read_file: Callable[[str], bytes] | None = None,
) -> Prepared:
    """Validate and prepare one Geo3K-layout row.

    ``render`` maps the problem text to the chat prompt; ``read_file`` reads an image
    given by path. Raises ``RowSkip`` naming the column at fault.
    """
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.replace(IMAGE_PLACEHOLDER, "").strip():
        raise RowSkip("empty_problem", f"column 'problem' has no text: {problem!r}")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise RowSkip("missing_answer", f"column 'answer' is {answer!r}, not a non-empty string")
    cells = row.get("images")
    cells = [] if cells is None else list(cells)
    placeholders = problem.count(IMAGE_PLACEHOLDER)
    if placeholders != len(cells):
        raise RowSkip(
            "placeholder_mismatch",
            f"column 'problem' has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but column 'images' holds {len(cells)} image(s)",
        )
    images = []
    for index, cell in enumerate(cells):
        try:
            images.append(load_image(cell, budget, read_file))
        except RowSkip as skip:
            raise RowSkip(skip.reason, f"column 'images'[{index}]: {skip.detail}") from skip
    return render(problem), images, answer.strip()


def prompt_tokens(prompt: str, images: Sequence[np.ndarray], count_tokens: Callable[[str], int]) -> int:
    """Tokens of a prepared prompt as the model reads it: ``count_tokens(prompt)`` (one
    ``<|image_pad|>`` per image) with each image's pad widened to its merged vision tokens,
    one per 28 x 28 pixels of the image as resized (already on the 28-px grid)."""
    vision = sum(image.shape[0] * image.shape[1] // PIXELS_PER_IMAGE_TOKEN for image in images)
    return count_tokens(prompt) - len(images) + vision


def check_prompt_length(
    prepared: Prepared, count_tokens: Callable[[str], int], max_prompt_tokens: int | None
) -> Prepared:
    """``prepared`` unchanged, or ``RowSkip("prompt_too_long")`` when its ``prompt_tokens``
    exceed ``max_prompt_tokens`` (None: no limit)."""
    if max_prompt_tokens is None:
        return prepared
    prompt, images, _ = prepared
    length = prompt_tokens(prompt, images, count_tokens)
    if length > max_prompt_tokens:
        raise RowSkip(
            "prompt_too_long",
            f"the templated prompt is {length} tokens with its {len(images)} image(s), "
            f"over data.max_prompt_tokens ({max_prompt_tokens})",
        )
    return prepared


def emoset_as_geo3k(row: Mapping[str, Any]) -> dict[str, Any]:
    """An EmoSet-layout row (``image``, ``emotion``) as a Geo3K-layout row with a fixed question."""
    label = row.get("emotion")
    if not isinstance(label, str) or not label.strip():
        raise RowSkip("missing_answer", f"column 'emotion' is {label!r}, not a non-empty string")
    label = label.strip().lower()
    if label not in EMOTIONS:
        raise RowSkip("unknown_label", f"column 'emotion' is {label!r}, not one of {', '.join(EMOTIONS)}")
    return {"images": [row.get("image")], "problem": EMOSET_QUESTION, "answer": label}


def python_rows(table: pa.Table) -> Iterator[tuple[dict[str, Any], RowSkip | None]]:
    """Each row of ``table`` as a dict, with None, or with a ``RowSkip`` when one of its
    text cells is not UTF-8 (the dict then lacks that cell): Arrow does not check the
    bytes of a string column when it reads a file, only when a cell becomes a ``str``."""
    try:
        yield from ((row, None) for row in table.to_pylist())
        return
    except UnicodeDecodeError:
        pass
    for index in range(table.num_rows):
        row, bad = {}, []
        for name in table.column_names:
            try:
                row[name] = table[name][index].as_py()
            except UnicodeDecodeError as err:
                bad.append(f"column {name!r} is not UTF-8 ({err.reason} at byte {err.start})")
        yield row, RowSkip("invalid_text", "; ".join(bad)) if bad else None


def prepare_table(
    table: pa.Table,
    prepare: Callable[[Mapping[str, Any]], Prepared],
    passthrough: Sequence[str],
) -> pa.Table:
    """Apply ``prepare`` to each raw row of ``table``; a ``RowSkip`` marks its row, it never drops it.

    ``table`` needs a ``uid`` column. Returns the producer schema (``OUTPUT_COLUMNS`` and
    ``passthrough``, taken from ``table`` unchanged), one row per input row.
    """
    columns: dict[str, list[Any]] = {name: [] for name in OUTPUT_COLUMNS}
    for row, invalid in python_rows(table.drop_columns(list(passthrough))):
        try:
            if invalid is not None:
                raise invalid
            prompt, images, answer = prepare(row)
            reason = detail = ""
        except RowSkip as skip:
            prompt, images, answer = "", [], ""
            reason, detail = skip.reason, skip.detail
        except Exception as err:  # a bug, not bad data: stop, but say which row hit it
            raise RuntimeError(f"preparing row {row['uid']} failed: {type(err).__name__}: {err}") from err
        columns["uid"].append(row["uid"])
        columns["prompt"].append(prompt)
        columns["images"].append([pack_image(image) for image in images])
        columns["answer"].append(answer)
        columns["skip_reason"].append(reason)
        columns["skip_detail"].append(detail)
    arrays = {
        name: pa.array(values, IMAGES_TYPE if name == "images" else pa.string()) for name, values in columns.items()
    }
    return pa.table({**arrays, **{name: table[name] for name in passthrough}})


def drop_skipped(table: pa.Table) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """Split a producer table into its usable rows and ``(reason, uid, detail)`` of the others."""
    usable = pc.equal(table["skip_reason"], "")
    rejected = table.filter(pc.invert(usable))
    skipped = list(
        zip(
            rejected["skip_reason"].to_pylist(),
            rejected["uid"].to_pylist(),
            rejected["skip_detail"].to_pylist(),
        )
    )
    return table.filter(usable).drop_columns(["skip_reason", "skip_detail"]), skipped


def rebatch(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Regroup tables of any lengths into tables of exactly ``size`` rows; the last may be short."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        if table.num_rows == 0:
            continue
        pending.append(table)
        count += table.num_rows
        while count >= size:
            merged = pa.concat_tables(pending)
            yield merged.slice(0, size)
            count -= size
            pending = [merged.slice(size)] if count else []
    if count:
        yield pa.concat_tables(pending)


def to_batch(table: pa.Table) -> Batch:
    """A consumer table as a dict of 1-D numpy arrays; ``images`` holds lists of ``(H, W, 3)`` arrays."""
    batch = {}
    for name in table.column_names:
        values = table[name].to_pylist()
        if name == "images":
            values = [[unpack_image(image) for image in images] for images in values]
        batch[name] = _object_array(values)
    return batch


def pack_image(image: np.ndarray) -> dict[str, Any]:
    """An ``(H, W, 3) uint8`` array as an ``IMAGES_TYPE`` element (its raw pixels, no re-encoding)."""
    height, width, _ = image.shape
    return {"height": height, "width": width, "pixels": np.ascontiguousarray(image).tobytes()}


def unpack_image(packed: Mapping[str, Any]) -> np.ndarray:
    """The read-only ``(H, W, 3) uint8`` view of a packed image."""
    return np.frombuffer(packed["pixels"], dtype=np.uint8).reshape(packed["height"], packed["width"], 3)


def _object_array(values: list[Any]) -> np.ndarray:
    # Element by element: numpy would otherwise turn a list of equal-length lists into 2-D.
    array = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        array[index] = value
    return array
