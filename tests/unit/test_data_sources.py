"""Finding and checking source files, planning and reading units (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mapo_ray.data import DataError, open_source, plan_reads, read_unit
from mapo_ray.data.sources import read_file_bytes

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def geo3k_table(rows: int, **overrides) -> pa.Table:
    columns = {
        "images": pa.array([[{"bytes": png_bytes(), "path": f"{i}.png"}] for i in range(rows)], pa.list_(IMAGE)),
        "problem": [f"<image>problem {i}" for i in range(rows)],
        "answer": [str(i) for i in range(rows)],
    }
    columns.update(overrides)
    return pa.table({name: values for name, values in columns.items() if values is not None})


def write(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_file_folder_glob_and_uri_find_the_same_files(tmp_path):
    write(tmp_path / "geo" / "train-0.parquet", geo3k_table(3))
    write(tmp_path / "geo" / "train-1.parquet", geo3k_table(2))
    (tmp_path / "geo" / "notes.txt").write_text("not data")
    (tmp_path / "geo" / "_SUCCESS").write_text("")

    single = open_source(str(tmp_path / "geo" / "train-0.parquet"))
    assert [f.name for f in single.files] == ["train-0.parquet"] and single.num_rows == 3

    folder = open_source(str(tmp_path / "geo"))
    glob = open_source(str(tmp_path / "geo" / "train-*.parquet"))
    uri = open_source(f"file://{tmp_path}/geo/")
    for source in (folder, glob, uri):
        assert [f.name for f in source.files] == ["train-0.parquet", "train-1.parquet"]
        assert source.num_rows == 5 and source.passthrough == ()


def test_extra_columns_pass_through(tmp_path):
    table = geo3k_table(2).append_column("id", pa.array(["a", "b"])).append_column(
        "choices", pa.array([["1", "2"], ["3"]])
    )
    source = open_source(str(write(tmp_path / "x.parquet", table)))
    assert source.passthrough == ("id", "choices")


def expect_error(spec: str, *fragments: str, layout: str = "geo3k") -> None:
    with pytest.raises(DataError) as info:
        open_source(spec, layout)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_missing_source_and_empty_folder(tmp_path):
    expect_error(str(tmp_path / "nope"), "no such file or folder")
    expect_error("someone/dataset", "no such file or folder", "org/name@split")
    (tmp_path / "empty").mkdir()
    expect_error(str(tmp_path / "empty"), "no .parquet files found")


def test_empty_file_fails_naming_it(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"")
    expect_error(str(path), str(path), "empty file")


def test_file_that_is_not_parquet_fails_naming_it(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("images,problem,answer\n")
    expect_error(str(tmp_path), str(path), "not a parquet file")


def test_parquet_without_rows_fails_naming_it(tmp_path):
    path = write(tmp_path / "train.parquet", geo3k_table(0))
    expect_error(str(path), str(path), "no rows")


@pytest.mark.parametrize("column", ["images", "problem", "answer"])
def test_missing_column_fails_naming_file_and_column(tmp_path, column):
    path = write(tmp_path / "train.parquet", geo3k_table(2, **{column: None}))
    expect_error(str(path), str(path), f"missing column {column!r}")


def test_non_string_answer_column_fails_naming_file_and_column(tmp_path):
    path = write(tmp_path / "train.parquet", geo3k_table(2, answer=pa.array([1, 2])))
    expect_error(str(path), str(path), "column 'answer' has type int64")


def test_images_of_the_wrong_type_fail(tmp_path):
    path = write(tmp_path / "train.parquet", geo3k_table(2, images=pa.array([1.0, 2.0])))
    expect_error(str(path), "column 'images' has type double")


def test_raw_bytes_images_are_accepted(tmp_path):
    table = geo3k_table(2, images=pa.array([[png_bytes()], [png_bytes()]], pa.list_(pa.binary())))
    assert open_source(str(write(tmp_path / "x.parquet", table))).num_rows == 2


def test_files_of_one_source_must_share_their_columns(tmp_path):
    write(tmp_path / "a.parquet", geo3k_table(1))
    write(tmp_path / "b.parquet", geo3k_table(1).append_column("id", pa.array(["x"])))
    expect_error(str(tmp_path), str(tmp_path / "b.parquet"), "same columns")


def test_a_column_named_like_an_output_column_is_refused(tmp_path):
    path = write(tmp_path / "x.parquet", geo3k_table(1).append_column("prompt", pa.array(["p"])))
    expect_error(str(path), "'prompt'", "clash")


@pytest.fixture
def hub_offline(monkeypatch):
    """The hub unreachable, as HF_HUB_OFFLINE=1 makes it (the library reads that variable at import)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unreachable_hub_dataset_fails_naming_it(tmp_path, hub_offline):
    with pytest.raises(DataError) as info:
        open_source("hiyouga/geometry3k@train", hub_cache_dir=str(tmp_path), hub_timeout_s=2.0)
    message = str(info.value)
    assert "'hiyouga/geometry3k'" in message and "split 'train'" in message and "not in the local cache" in message


def test_hub_dataset_found_in_the_cache_when_unreachable(tmp_path, hub_offline):
    # The documented cache layout: refs/<branch> holds the commit, snapshots/<commit>/ the files.
    repo = tmp_path / "datasets--hiyouga--geometry3k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    write(snapshot / "data" / "train-00000-of-00001.parquet", geo3k_table(3))
    write(snapshot / "data" / "test-00000-of-00001.parquet", geo3k_table(2))
    source = open_source("hiyouga/geometry3k@train", hub_cache_dir=str(tmp_path), hub_timeout_s=2.0)
    assert [f.name for f in source.files] == ["hiyouga/geometry3k/data/train-00000-of-00001.parquet"]
    assert source.num_rows == 3


def test_emoset_jsonl_with_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    lines = [{"image": "imgs/a.png", "emotion": "awe", "id": 1}, {"image": "imgs/a.png", "emotion": "fear", "id": 2}]
    path = tmp_path / "emoset.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    source = open_source(str(path), "emoset")
    assert source.num_rows == 2 and source.passthrough == ("id",)
    assert read_file_bytes(source.filesystem, str(tmp_path), "imgs/a.png") == png_bytes()


def test_emoset_jsonl_problems_fail_naming_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.png", "emotion": "awe"}\n{"image": \n')
    expect_error(str(broken), str(broken), "not a JSON-lines file", layout="emoset")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"image": "a.png"}\n')
    expect_error(str(unlabelled), str(unlabelled), "missing column 'emotion'", layout="emoset")


def test_plan_covers_every_row_once_in_a_seeded_order(tmp_path):
    path = write(tmp_path / "t.parquet", geo3k_table(23), row_group_size=10)
    files = open_source(str(path)).files
    assert files[0].row_groups == (10, 10, 3)

    plain = plan_reads(files, 4, shuffle=False, seed=0, epoch=0)
    assert [(u["row_group"], u["start"], u["stop"], u["first_row"]) for u in plain][:4] == [
        (0, 0, 4, 0),
        (0, 4, 8, 4),
        (0, 8, 10, 8),
        (1, 0, 4, 10),
    ]
    assert all(u["order_seed"] == -1 for u in plain)

    def rows(plan):
        return sorted(u["first_row"] + i for u in plan for i in range(u["stop"] - u["start"]))

    epoch0 = plan_reads(files, 4, shuffle=True, seed=7, epoch=0)
    assert rows(epoch0) == list(range(23))
    assert epoch0 == plan_reads(files, 4, shuffle=True, seed=7, epoch=0)
    assert epoch0 != plan_reads(files, 4, shuffle=True, seed=7, epoch=1)
    assert epoch0 != plan_reads(files, 4, shuffle=True, seed=8, epoch=0)


def test_read_unit_attaches_uids_that_follow_their_rows(tmp_path):
    path = write(tmp_path / "t.parquet", geo3k_table(23), row_group_size=10)
    source = open_source(str(path))
    for unit in plan_reads(source.files, 4, shuffle=True, seed=3, epoch=0):
        table = read_unit(source.filesystem, unit)
        for row in table.to_pylist():
            index = int(row["uid"].split("#")[1])
            assert row["uid"] == f"t.parquet#{index}" and row["problem"] == f"<image>problem {index}"
            assert row["_file"] == str(path)


def test_emoset_parquet_with_image_structs(tmp_path):
    table = pa.table(
        {
            "image": pa.array([{"bytes": png_bytes(), "path": "a.png"}] * 2, IMAGE),
            "emotion": ["awe", "fear"],
        }
    )
    source = open_source(str(write(tmp_path / "emoset.parquet", table)), "emoset")
    assert source.num_rows == 2 and source.passthrough == ()
    expect_error(str(tmp_path / "emoset.parquet"), "missing column 'images'")  # not the geo3k layout
