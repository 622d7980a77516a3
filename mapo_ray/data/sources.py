"""Finding, checking and slicing the files of a prompt source. No Ray here.

A source is written as one string:

- a local file, folder or glob: ``data/train.parquet``, ``data/``, ``data/*/train-*.parquet``;
- a URI any pyarrow filesystem reads, with or without a glob: ``s3://bucket/geo3k/``,
  ``gs://bucket/geo3k/train-*.parquet``;
- a Hugging Face hub dataset and split: ``hiyouga/geometry3k@train``, downloaded with
  ``huggingface_hub`` into its cache (or found there when the hub is unreachable).

``open_source`` lists the files and checks each one up front (a zero-byte file, a file
that is not parquet or JSON lines, a missing column, a column of the wrong type, a
file without rows): such a file fails the whole run at once with a ``DataError`` that
names it. ``plan_reads`` then cuts the files into read units, the unit of parallelism
and of shuffling; ``read_unit`` reads one.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from mapo_ray.data.errors import DataError
from mapo_ray.data.rows import EMOSET_COLUMNS, FILE_COLUMN, GEO3K_COLUMNS, OUTPUT_COLUMNS

Layout = Literal["geo3k", "emoset"]
LAYOUT_COLUMNS: dict[str, tuple[str, ...]] = {"geo3k": GEO3K_COLUMNS, "emoset": EMOSET_COLUMNS}
_EXTENSIONS: dict[str, tuple[str, ...]] = {"geo3k": (".parquet",), "emoset": (".parquet", ".jsonl", ".json")}
_HUB_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)@(?P<split>[\w.-]+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class DataFile:
    """One checked data file."""

    path: str  # as its filesystem names it
    name: str  # relative to the source's root; the stable part of each row's uid
    row_groups: tuple[int, ...]  # rows per parquet row group; one entry for a JSON-lines file

    @property
    def format(self) -> Literal["parquet", "jsonl"]:
        return "parquet" if self.path.endswith(".parquet") else "jsonl"


@dataclass(frozen=True)
class DataSource:
    """The checked files of one source string, all of one layout."""

    spec: str
    layout: Layout
    filesystem: pafs.FileSystem
    files: tuple[DataFile, ...]
    passthrough: tuple[str, ...]  # columns beyond the layout's, carried to the output

    @property
    def num_rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)


def open_source(
    spec: str, layout: Layout = "geo3k", *, hub_cache_dir: str | None = None, hub_timeout_s: float = 10.0
) -> DataSource:
    """List and check the files of ``spec``; raises ``DataError`` naming the file at fault."""
    if layout not in LAYOUT_COLUMNS:
        raise DataError(f"unknown data layout {layout!r}; expected one of {sorted(LAYOUT_COLUMNS)}")
    filesystem, listed = _list_files(spec, layout, hub_cache_dir, hub_timeout_s)
    files: list[DataFile] = []
    passthrough: tuple[str, ...] | None = None
    for path, name in listed:
        data_file, schema = _inspect(filesystem, path, name, layout)
        extra = check_schema(schema, layout, path)
        if passthrough is None:
            passthrough = extra
        elif set(extra) != set(passthrough):
            raise DataError(
                f"{path}: extra columns {sorted(extra)} differ from {sorted(passthrough)} "
                f"in {files[0].path}; every file of a source needs the same columns"
            )
        if files and data_file.format != files[0].format:
            raise DataError(
                f"{path}: a {data_file.format} file beside {files[0].format} ones; use one format per source"
            )
        files.append(data_file)
    return DataSource(spec, layout, filesystem, tuple(files), passthrough or ())


def check_schema(schema: pa.Schema, layout: Layout, where: str) -> tuple[str, ...]:
    """Check ``schema`` against ``layout``; returns the extra (pass-through) column names.

    Raises ``DataError`` naming ``where`` and the column that is missing or mistyped.
    """
    required = LAYOUT_COLUMNS[layout]
    for column in required:
        if column not in schema.names:
            raise DataError(
                f"{where}: missing column {column!r} (the {layout} layout needs {', '.join(required)}; "
                f"found {', '.join(schema.names) or 'none'})"
            )
    image_column = "images" if layout == "geo3k" else "image"
    image_type = schema.field(image_column).type
    if layout == "geo3k":
        if not (pa.types.is_list(image_type) or pa.types.is_large_list(image_type)) or not _is_image_type(
            image_type.value_type
        ):
            raise DataError(
                f"{where}: column 'images' has type {image_type}; expected a list of images "
                "(structs with 'bytes'/'path', raw bytes, or path strings)"
            )
    elif not _is_image_type(image_type):
        raise DataError(
            f"{where}: column 'image' has type {image_type}; expected an image "
            "(a struct with 'bytes'/'path', raw bytes, or a path string)"
        )
    for column in required:
        if column != image_column and not _is_string(schema.field(column).type):
            raise DataError(f"{where}: column {column!r} has type {schema.field(column).type}; expected a string")
    reserved = set(OUTPUT_COLUMNS) | {FILE_COLUMN}
    extra = tuple(name for name in schema.names if name not in required)
    clashes = sorted(reserved.intersection(extra))
    if clashes:
        raise DataError(f"{where}: column(s) {clashes} clash with the columns the pipeline adds")
    return extra


def plan_reads(
    files: tuple[DataFile, ...], rows_per_unit: int, *, shuffle: bool, seed: int, epoch: int
) -> list[dict[str, Any]]:
    """Cut ``files`` into read units of at most ``rows_per_unit`` rows, in this epoch's order.

    A unit is a plain dict (``path``, ``name``, ``row_group``, ``start``, ``stop``,
    ``first_row``, ``order_seed``): rows ``start:stop`` of one row group, whose first
    row is row ``first_row`` of its file. With ``shuffle`` the unit order is a
    permutation drawn from ``(seed, epoch)``, and each unit gets an ``order_seed`` for
    permuting its own rows (-1: keep file order).
    """
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be at least 1, got {rows_per_unit}")
    units = []
    for data_file in files:
        first_row = 0
        for group, group_rows in enumerate(data_file.row_groups):
            for start in range(0, group_rows, rows_per_unit):
                stop = min(start + rows_per_unit, group_rows)
                units.append(
                    dict(path=data_file.path, name=data_file.name, row_group=group, start=start, stop=stop,
                         first_row=first_row + start, order_seed=-1)
                )
            first_row += group_rows
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        units = [units[i] for i in rng.permutation(len(units))]
        for unit, order_seed in zip(units, rng.integers(0, 2**31, size=len(units))):
            unit["order_seed"] = int(order_seed)
    return units


def read_unit(filesystem: pafs.FileSystem, unit: dict[str, Any], table: pa.Table | None = None) -> pa.Table:
    """The raw rows of one read unit, with ``uid`` and ``_file`` columns added.

    Parquet units are read from ``filesystem``; a JSON-lines unit is cut from its
    already-read ``table``.
    """
    start, stop = unit["start"], unit["stop"]
    if table is None:
        with filesystem.open_input_file(unit["path"]) as handle:
            table = pq.ParquetFile(handle).read_row_group(unit["row_group"])
    table = table.slice(start, stop - start)
    uids = [f"{unit['name']}#{unit['first_row'] + i}" for i in range(table.num_rows)]
    table = table.append_column("uid", pa.array(uids, pa.string()))
    table = table.append_column(FILE_COLUMN, pa.array([unit["path"]] * table.num_rows, pa.string()))
    if unit["order_seed"] >= 0:
        table = table.take(np.random.default_rng(unit["order_seed"]).permutation(table.num_rows))
    return table


def read_jsonl(filesystem: pafs.FileSystem, path: str) -> pa.Table:
    """A whole JSON-lines file as a table; raises ``DataError`` naming the file."""
    try:
        with filesystem.open_input_stream(path) as stream:
            return pajson.read_json(stream)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not a JSON-lines file ({err})") from err


def read_file_bytes(filesystem: pafs.FileSystem, base_dir: str, path: str) -> bytes:
    """Bytes of ``path``, taken relative to ``base_dir`` unless absolute or a URI."""
    if "://" in path:
        filesystem, path = pafs.FileSystem.from_uri(path)
    elif not posixpath.isabs(path):
        path = posixpath.join(base_dir, path)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _inspect(filesystem: pafs.FileSystem, path: str, name: str, layout: Layout) -> tuple[DataFile, pa.Schema]:
    if filesystem.get_file_info(path).size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    if path.endswith(".parquet"):
        try:
            with filesystem.open_input_file(path) as handle:
                metadata = pq.ParquetFile(handle).metadata
                schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a parquet file ({err})") from err
        row_groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    else:
        table = read_jsonl(filesystem, path)
        schema, row_groups = table.schema, (table.num_rows,)
    if sum(row_groups) == 0:
        raise DataError(f"{path}: the file has no rows")
    return DataFile(path, name, row_groups), schema


def _list_files(
    spec: str, layout: Layout, hub_cache_dir: str | None, hub_timeout_s: float
) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """``(filesystem, [(path, name), ...])`` sorted by path; raises ``DataError`` when there are none."""
    extensions = _EXTENSIONS[layout]
    if "://" in spec:
        filesystem, pattern = _from_uri(spec)
    else:
        filesystem, pattern = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))
        hub = _HUB_SPEC.match(spec)
        if hub and not _GLOB_CHARS.search(spec) and not os.path.exists(pattern):
            return filesystem, _hub_files(hub["repo"], hub["split"], hub_cache_dir, hub_timeout_s)
    glob = _GLOB_CHARS.search(pattern)
    if glob:
        root = posixpath.dirname(pattern[: glob.start()])
        candidates = [p for p in _walk(filesystem, root, spec) if fnmatch.fnmatchcase(p, pattern)]
    else:
        info = filesystem.get_file_info(pattern)
        if info.type == pafs.FileType.NotFound:
            hint = " (a hub dataset is written org/name@split)" if spec.count("/") == 1 and "@" not in spec else ""
            raise DataError(f"data source {spec!r}: no such file or folder{hint}")
        if info.type == pafs.FileType.File:
            return filesystem, [(pattern, posixpath.basename(pattern))]
        root, candidates = pattern, _walk(filesystem, pattern, spec)
    found = [p for p in candidates if p.endswith(extensions) and not posixpath.basename(p).startswith((".", "_"))]
    if not found:
        raise DataError(f"data source {spec!r}: no {'/'.join(extensions)} files found")
    return filesystem, [(p, posixpath.relpath(p, root)) for p in sorted(found)]


def _from_uri(spec: str) -> tuple[pafs.FileSystem, str]:
    glob = _GLOB_CHARS.search(spec)
    # pyarrow parses the URI up to the first glob character; the pattern keeps the rest.
    head = spec[: glob.start()].rsplit("/", 1)[0] if glob else spec
    try:
        filesystem, path = pafs.FileSystem.from_uri(head)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"data source {spec!r}: pyarrow cannot open this URI ({err})") from err
    return filesystem, path + spec[len(head) :] if glob else path


def _walk(filesystem: pafs.FileSystem, root: str, spec: str) -> list[str]:
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (FileNotFoundError, NotADirectoryError) as err:
        raise DataError(f"data source {spec!r}: cannot list {root} ({err})") from err
    return [info.path for info in infos if info.type == pafs.FileType.File]


def _hub_files(repo: str, split: str, cache_dir: str | None, timeout_s: float) -> list[tuple[str, str]]:
    """Parquet files of one split of a hub dataset, from the hub or its local cache."""
    # The file layouts the hub uses for parquet splits.
    patterns = [f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet"]
    patterns += [f"*/{p}" for p in patterns]
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(
            repo_id=repo, repo_type="dataset", allow_patterns=patterns, cache_dir=cache_dir, etag_timeout=timeout_s
        )
    except Exception as err:  # any failure here means the same thing to the user
        raise DataError(
            f"hub dataset {repo!r} (split {split!r}) could not be downloaded and is not in the local cache "
            f"({type(err).__name__}: {err}). Download its parquet files where the hub is reachable and "
            "pass their folder as the source instead."
        ) from err
    found = []
    for folder, _, names in os.walk(root):
        for file_name in names:
            relative = posixpath.relpath(posixpath.join(folder, file_name), root)
            if any(fnmatch.fnmatch(relative, p) for p in patterns):
                found.append((posixpath.join(folder, file_name), f"{repo}/{relative}"))
    if not found:
        raise DataError(f"hub dataset {repo!r} has no parquet files for split {split!r}")
    return sorted(found)


def _is_string(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type)


def _is_binary(data_type: pa.DataType) -> bool:
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type)


def _is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        names = {data_type.field(i).name for i in range(data_type.num_fields)}
        return "bytes" in names or "path" in names
    return _is_binary(data_type) or _is_string(data_type)
