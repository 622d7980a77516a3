"""Per-row validation, skip marking, counting and exact rebatching (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mapo_ray.data import (
    IMAGES_TYPE,
    PixelBudget,
    RowSkip,
    drop_skipped,
    emoset_as_geo3k,
    pack_image,
    prepare_row,
    prepare_table,
    rebatch,
    to_batch,
    unpack_image,
)
from mapo_ray.data.prompts import EMOSET_QUESTION

BUDGET = PixelBudget(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, max_decode_pixels=400 * 400)


def png(width: int = 100, height: int = 80, colour=(200, 30, 30)) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def render(problem: str) -> str:
    return f"<prompt>{problem}</prompt>"


def prepare(row):
    return prepare_row(row, render=render, budget=BUDGET)


def skip_reason(row) -> str:
    with pytest.raises(RowSkip) as info:
        prepare(row)
    return info.value.reason


def test_good_row_becomes_prompt_images_answer():
    row = {"images": [png(), png(60, 60)], "problem": "<image> and <image>", "answer": " 12 "}
    prompt, images, answer = prepare(row)
    assert prompt == "<prompt><image> and <image></prompt>"
    assert [image.shape for image in images] == [(84, 112, 3), (56, 56, 3)]
    assert answer == "12"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"images": [{"bytes": b"not a png", "path": None}], "problem": "<image>x", "answer": "1"}, "corrupt_image"),
        ({"images": [None], "problem": "<image>x", "answer": "1"}, "missing_image"),
        ({"images": [png(500, 500)], "problem": "<image>x", "answer": "1"}, "image_too_large"),
        ({"images": [png(300, 1)], "problem": "<image>x", "answer": "1"}, "image_aspect_ratio"),
        ({"images": [png()], "problem": "<image>", "answer": "1"}, "empty_problem"),
        ({"images": [], "problem": "", "answer": "1"}, "empty_problem"),
        ({"images": [png()], "problem": None, "answer": "1"}, "empty_problem"),
        ({"images": [png()], "problem": "<image>x", "answer": 3}, "missing_answer"),
        ({"images": [png()], "problem": "<image>x", "answer": None}, "missing_answer"),
        ({"images": [png()], "problem": "<image>x", "answer": "  "}, "missing_answer"),
        ({"images": [png(), png()], "problem": "<image>x", "answer": "1"}, "placeholder_mismatch"),
        ({"images": None, "problem": "<image>x", "answer": "1"}, "placeholder_mismatch"),
    ],
)
def test_each_bad_row_gets_its_reason(row, reason):
    assert skip_reason(row) == reason


def test_skip_detail_names_the_column_and_image_index():
    row = {"images": [png(), {"bytes": b"junk", "path": None}], "problem": "<image><image>x", "answer": "1"}
    with pytest.raises(RowSkip) as info:
        prepare(row)
    assert "column 'images'[1]" in info.value.detail


def test_emoset_row_becomes_a_fixed_question_with_the_label_as_answer():
    image = png()
    row = emoset_as_geo3k({"image": image, "emotion": " Awe "})
    assert row == {"images": [image], "problem": EMOSET_QUESTION, "answer": "awe"}
    with pytest.raises(RowSkip) as info:
        emoset_as_geo3k({"image": image, "emotion": "boredom"})
    assert info.value.reason == "unknown_label"
    with pytest.raises(RowSkip) as info:
        emoset_as_geo3k({"image": image, "emotion": None})
    assert info.value.reason == "missing_answer"


def raw_table() -> pa.Table:
    return pa.table(
        {
            "images": [[png()], [{"bytes": b"junk", "path": None}], [png(40, 40)]],
            "problem": ["<image>a", "<image>b", "<image>c"],
            "answer": ["1", "2", None],
            "id": ["q0", "q1", "q2"],
            "choices": [["1", "2"], ["3"], []],
            "uid": ["f#0", "f#1", "f#2"],
        }
    )


def test_prepare_table_marks_skips_in_place_and_passes_extra_columns_through():
    out = prepare_table(raw_table(), prepare, passthrough=["id", "choices"])
    assert out.num_rows == 3
    assert out.schema.field("images").type == IMAGES_TYPE
    assert out["uid"].to_pylist() == ["f#0", "f#1", "f#2"]
    assert out["skip_reason"].to_pylist() == ["", "corrupt_image", "missing_answer"]
    assert out["choices"].to_pylist() == [["1", "2"], ["3"], []]
    assert out["images"].to_pylist()[1] == []

    kept, skipped = drop_skipped(out)
    assert kept["uid"].to_pylist() == ["f#0"]
    assert "skip_reason" not in kept.column_names
    assert [(reason, uid) for reason, uid, _ in skipped] == [("corrupt_image", "f#1"), ("missing_answer", "f#2")]

    batch = to_batch(kept)
    [images] = batch["images"]
    assert images[0].shape == (84, 112, 3) and tuple(images[0][0, 0]) == (200, 30, 30)
    assert batch["prompt"][0] == "<prompt><image>a</prompt>"


def test_a_batch_of_only_skipped_rows_keeps_the_schema():
    table = raw_table().slice(1, 2)
    out = prepare_table(table, prepare, passthrough=["id", "choices"])
    assert out.schema == prepare_table(raw_table(), prepare, passthrough=["id", "choices"]).schema
    assert drop_skipped(out)[0].num_rows == 0


def test_pack_and_unpack_round_trip_pixels():
    image = np.random.default_rng(0).integers(0, 256, size=(28, 56, 3), dtype=np.uint8)
    assert np.array_equal(unpack_image(pack_image(image)), image)


@pytest.mark.parametrize("size", [1, 3, 4, 10])
def test_rebatch_gives_exact_sizes_and_keeps_every_row_in_order(size):
    lengths = [0, 2, 5, 1, 0, 3]
    tables, start = [], 0
    for length in lengths:
        tables.append(pa.table({"x": list(range(start, start + length))}))
        start += length
    batches = list(rebatch(tables, size))
    assert all(b.num_rows == size for b in batches[:-1]) and 0 < batches[-1].num_rows <= size
    assert [x for b in batches for x in b["x"].to_pylist()] == list(range(sum(lengths)))


def test_an_unexpected_error_stops_the_batch_naming_the_row():
    def broken(row):
        raise KeyError("bug")

    with pytest.raises(RuntimeError, match="row f#0 failed: KeyError"):
        prepare_table(raw_table(), broken, passthrough=["id", "choices"])


def test_prompt_tokens_count_each_image_as_its_merged_vision_tokens():
    from mapo_ray.data.rows import prompt_tokens

    images = [np.zeros((56, 84, 3), np.uint8), np.zeros((28, 28, 3), np.uint8)]
    # "a <pad> b <pad>" is 4 words; the pads become 2 * 3 = 6 and 1 * 1 = 1 tokens.
    assert prompt_tokens("a <pad> b <pad>", images, lambda text: len(text.split())) == 4 - 2 + 6 + 1


def test_a_prompt_over_max_prompt_tokens_is_a_counted_skip():
    from mapo_ray.data.rows import check_prompt_length

    words = lambda text: len(text.split())  # noqa: E731
    prepared = ("one two three <pad>", [np.zeros((56, 56, 3), np.uint8)], "4")  # 3 + 4 image tokens
    assert check_prompt_length(prepared, words, None) is prepared
    assert check_prompt_length(prepared, words, 7) is prepared
    with pytest.raises(RowSkip, match=r"7 tokens with its 1 image\(s\), over data.max_prompt_tokens \(6\)") as info:
        check_prompt_length(prepared, words, 6)
    assert info.value.reason == "prompt_too_long"
    # Marked in place by prepare_table like every other skip, so the consumer counts it.
    table = pa.table({"uid": ["f#0"]})
    out = prepare_table(table, lambda row: check_prompt_length(prepared, words, 6), passthrough=())
    kept, skipped = drop_skipped(out)
    assert kept.num_rows == 0 and [reason for reason, _, _ in skipped] == ["prompt_too_long"]


def test_prepare_prompts_skips_rows_over_max_prompt_tokens_with_the_real_tokenizer():
    """PreparePrompts (the Ray Data actor's class, called directly) counts the templated
    prompt's tokens with the image's merged vision tokens, and marks longer rows."""
    import pyarrow.fs as pafs

    from mapo_ray.data.pipeline import PreparePrompts
    from mapo_ray.data.rows import FILE_COLUMN
    from mapo_ray.models.tiny import tiny_vl_path

    image = png(112, 56)  # resized within BUDGET to 112 x 56: 8 merged vision tokens
    rows = pa.table(
        {
            "uid": ["f#0", "f#1"],
            FILE_COLUMN: ["/data/f.parquet"] * 2,
            "images": [[image], [image]],
            "problem": ["<image>Find x.", "<image>" + " Find x." * 40],
            "answer": ["3", "4"],
        }
    )

    def prepared(limit):
        actor = PreparePrompts(
            tokenizer_path=str(tiny_vl_path()),
            layout="geo3k",
            budget=BUDGET,
            filesystem=pafs.LocalFileSystem(),
            passthrough=(),
            max_prompt_tokens=limit,
        )
        return actor(rows)

    kept, skipped = drop_skipped(prepared(None))
    assert kept.num_rows == 2 and not skipped
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path())
    short = len(tokenizer.encode(kept["prompt"][0].as_py(), add_special_tokens=False)) - 1 + 8
    kept, skipped = drop_skipped(prepared(short))
    assert kept["uid"].to_pylist() == ["f#0"]
    assert [(reason, uid) for reason, uid, _ in skipped] == [("prompt_too_long", "f#1")]
    kept, skipped = drop_skipped(prepared(short - 1))
    assert kept.num_rows == 0 and len(skipped) == 2


def test_a_text_cell_that_is_not_utf8_skips_its_row_and_names_the_column(tmp_path):
    import pyarrow.parquet as pq

    raw = pa.array([b"1", b"\xff\xfe2", b"3"], pa.binary())
    # A string column with bytes Arrow never checked, as a file written by another tool may hold.
    answers = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    table = raw_table().set_column(2, "answer", answers)
    pq.write_table(table, tmp_path / "bad.parquet")
    read_back = pq.read_table(tmp_path / "bad.parquet")
    with pytest.raises(UnicodeDecodeError):
        read_back.to_pylist()

    out = prepare_table(read_back, prepare, passthrough=["id", "choices"])
    assert out["uid"].to_pylist() == ["f#0", "f#1", "f#2"]
    # Row 2 is prepared as before: its answer "3" is good and its image too.
    assert out["skip_reason"].to_pylist() == ["", "invalid_text", ""]
    assert out["skip_detail"][1].as_py() == "column 'answer' is not UTF-8 (invalid start byte at byte 0)"
    assert out["answer"].to_pylist() == ["1", "", "3"]
