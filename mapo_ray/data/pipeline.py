"""Prompt data on Ray Data: a thin composition of the pure pieces in this package.

::

    plan_reads (driver)                  read units in this epoch's order
      -> from_items / from_arrow         one block per unit
      -> map_batches(read_units)         raw rows of each unit (parquet row-group slices)
      -> map_batches(PreparePrompts)     decode, resize, template: CPU actor pool
      -> iter_batches / streaming_split  consumers wrap each iterator in PromptBatches

The units are read here rather than with ``ray.data.read_parquet``, which reads a
file in one task and keeps no row positions: slices of row groups let one file be
decoded by several workers, and give each row a uid that names its file and row.
Ray fuses the two ``map_batches`` steps, so rows are read and prepared in one actor.

Rows that cannot be used stay in the stream with their ``skip_reason``, so a row is
counted exactly once by whichever consumer receives it; ``PromptBatches`` counts and
drops them and reports ``data/skipped/<reason>``. Counts of several consumers (the
iterators of one ``streaming_split``) add up.

Shuffling is per epoch and seeded: ``plan_reads`` permutes the units and the rows
inside each one from ``(seed, epoch)``. Parallel workers may finish units in a
slightly different order from run to run; which rows an epoch holds never changes.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from mapo_ray.config import DataConfig
from mapo_ray.data.errors import SKIP_REASONS
from mapo_ray.data.images import PixelBudget
from mapo_ray.data.prompts import render_prompt
from mapo_ray.data.rows import (
    FILE_COLUMN,
    Batch,
    Prepared,
    check_prompt_length,
    drop_skipped,
    emoset_as_geo3k,
    prepare_row,
    prepare_table,
    rebatch,
    to_batch,
)
from mapo_ray.data.sources import DataSource, Layout, open_source, plan_reads, read_file_bytes, read_jsonl, read_unit

logger = logging.getLogger(__name__)


def open_split(cfg: DataConfig, split: str) -> DataSource:
    """Open and check ``cfg.train`` or ``cfg.test`` (``split`` is ``"train"`` or ``"test"``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = cfg.train if split == "train" else cfg.test
    return open_source(spec, cfg.layout, hub_cache_dir=cfg.hub_cache_dir, hub_timeout_s=cfg.hub_timeout_s)


def pixel_budget(cfg: DataConfig) -> PixelBudget:
    """The image pixel bounds of ``cfg``."""
    return PixelBudget(cfg.min_pixels, cfg.max_pixels, cfg.max_decode_pixels)


def prompt_dataset(
    source: DataSource, cfg: DataConfig, *, tokenizer_path: str | os.PathLike, seed: int, epoch: int = 0
) -> ray.data.Dataset:
    """The lazy Ray Dataset of one epoch of prompts from ``source`` (schema: ``mapo_ray.data.rows``)."""
    units = plan_reads(source.files, cfg.rows_per_block, shuffle=cfg.shuffle, seed=seed, epoch=epoch)
    if source.files[0].format == "parquet":
        dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            read_units,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"filesystem": source.filesystem},
            num_cpus=cfg.cpus_per_worker,
        )
    else:
        # JSON lines hold only paths and labels: cheap to read here, and slicing them in the
        # driver spares each read task from parsing the whole file for its few rows.
        tables = {f.path: read_jsonl(source.filesystem, f.path) for f in source.files}
        dataset = ray.data.from_arrow([read_unit(source.filesystem, u, tables[u["path"]]) for u in units])
    return dataset.map_batches(
        PreparePrompts,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_workers),
        num_cpus=cfg.cpus_per_worker,
        fn_constructor_kwargs=dict(
            tokenizer_path=str(tokenizer_path),
            layout=source.layout,
            budget=pixel_budget(cfg),
            filesystem=source.filesystem,
            passthrough=source.passthrough,
            max_prompt_tokens=cfg.max_prompt_tokens,
        ),
    )


def read_units(units: pa.Table, filesystem: pafs.FileSystem) -> pa.Table:
    """Ray Data task: the raw rows of a batch of read units (see ``plan_reads``)."""
    return pa.concat_tables([read_unit(filesystem, unit) for unit in units.to_pylist()])


class PreparePrompts:
    """Ray Data actor: raw rows -> prompt rows. Holds the tokenizer, loaded once per actor."""

    def __init__(
        self,
        *,
        tokenizer_path: str,
        layout: Layout,
        budget: PixelBudget,
        filesystem: pafs.FileSystem,
        passthrough: tuple[str, ...],
        max_prompt_tokens: int | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._render = functools.partial(render_prompt, tokenizer)
        self._count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        self._max_prompt_tokens = max_prompt_tokens
        self._layout = layout
        self._budget = budget
        self._filesystem = filesystem
        self._passthrough = passthrough

    def __call__(self, rows: pa.Table) -> pa.Table:
        return prepare_table(rows, self._prepare, self._passthrough)

    def _prepare(self, row: Mapping[str, Any]) -> Prepared:
        # Image paths in a row are relative to the file the row came from.
        read_file = functools.partial(read_file_bytes, self._filesystem, posixpath.dirname(row[FILE_COLUMN]))
        task_row = emoset_as_geo3k(row) if self._layout == "emoset" else row
        prepared = prepare_row(task_row, render=self._render, budget=self._budget, read_file=read_file)
        return check_prompt_length(prepared, self._count_tokens, self._max_prompt_tokens)


class PromptBatches:
    """Batches of exactly ``batch_size`` usable prompts (the last may be short) from a
    ``Dataset`` or one ``streaming_split`` iterator, counting the rows it drops.

    Each batch is a dict of 1-D numpy arrays with the output schema of
    ``mapo_ray.data.rows`` minus the skip columns. ``metrics()`` gives the counts since
    this object was made.
    """

    def __init__(
        self,
        data: ray.data.Dataset | ray.data.DataIterator,
        batch_size: int,
        *,
        log_first_skips: int = 10,
    ) -> None:
        self._data = data
        self._batch_size = batch_size
        self._log_first_skips = log_first_skips
        self.prompts = 0
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[Batch]:
        upstream = self._data.iter_batches(batch_size=self._batch_size, batch_format="pyarrow")
        for table in rebatch(self._usable(upstream), self._batch_size):
            self.prompts += table.num_rows
            yield to_batch(table)

    def metrics(self) -> dict[str, int]:
        """``data/prompts`` and one ``data/skipped/<reason>`` per reason (zeros included)."""
        return {"data/prompts": self.prompts, **{f"data/skipped/{r}": self.skipped[r] for r in SKIP_REASONS}}

    def _usable(self, upstream: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for table in upstream:
            kept, skipped = drop_skipped(table)
            for reason, uid, detail in skipped:
                if sum(self.skipped.values()) < self._log_first_skips:
                    logger.warning("skipped row %s (%s): %s", uid, reason, detail)
                self.skipped[reason] += 1
            yield kept
