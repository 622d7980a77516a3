"""Prompt preparation on Ray Data against the same work in one plain process.

    python benchmarks/data_pipeline.py [--rows 4000] [--image-size 672] [--workers 2]

Writes a Geo3K-layout parquet file of synthetic figures, enlarged to
``--image-size`` px and stored as JPEG so that each row carries photo-sized decoding
and resizing work, then runs the per-row work (read, decode, resize to the tiny
model's budget, chat templating, handing numpy batches to a consumer) two ways:

- ours: ``prompt_dataset`` + ``PromptBatches`` on a local Ray cluster, timed from
  building the dataset to the last batch, so actor start-up (each actor imports
  transformers and loads the tokenizer) is included;
- baseline: a single-process loop over the same read units calling the same
  functions, timed from loading the tokenizer (transformers already imported).

``ray.init`` is outside both timings. Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mapo_ray.config import DataConfig
from mapo_ray.data import drop_skipped, open_source, plan_reads, read_unit, to_batch
from mapo_ray.data.pipeline import PreparePrompts, PromptBatches, pixel_budget, prompt_dataset
from mapo_ray.data.synthetic import ROW_GROUP_ROWS, SCHEMA, examples_table
from mapo_ray.job import start_local_ray
from mapo_ray.models.tiny import MAX_PIXELS, MIN_PIXELS, tiny_vl_path

# Distinct figures; rows beyond this repeat them (the per-row work is the same).
UNIQUE_FIGURES = 256


def write_source(path: Path, rows: int, image_size: int, seed: int) -> None:
    """``rows`` Geo3K rows whose figures are enlarged to ``image_size`` px JPEGs."""
    figures = examples_table(seed, "train", min(rows, UNIQUE_FIGURES)).to_pylist()
    for row in figures:
        figure = Image.open(io.BytesIO(row["images"][0]["bytes"])).resize((image_size, image_size), Image.BICUBIC)
        buffer = io.BytesIO()
        figure.save(buffer, format="JPEG", quality=90)
        row["images"][0]["bytes"] = buffer.getvalue()
    table = pa.Table.from_pylist([figures[i % len(figures)] for i in range(rows)], schema=SCHEMA)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)


def run_ours(cfg: DataConfig, seed: int, batch_size: int) -> tuple[float, float, int]:
    """Seconds to the first batch, seconds in all, rows."""
    start = time.perf_counter()
    source = open_source(cfg.train, cfg.layout)
    batches = PromptBatches(prompt_dataset(source, cfg, tokenizer_path=tiny_vl_path(), seed=seed), batch_size)
    first, rows = None, 0
    for batch in batches:
        first = first or time.perf_counter() - start
        rows += len(batch["uid"])
    return first, time.perf_counter() - start, rows


def run_baseline(cfg: DataConfig, seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    source = open_source(cfg.train, cfg.layout)
    prepare = PreparePrompts(
        tokenizer_path=str(tiny_vl_path()),
        layout=source.layout,
        budget=pixel_budget(cfg),
        filesystem=source.filesystem,
        passthrough=source.passthrough,
    )
    rows = 0
    for unit in plan_reads(source.files, cfg.rows_per_block, shuffle=cfg.shuffle, seed=seed, epoch=0):
        kept, _ = drop_skipped(prepare(read_unit(source.filesystem, unit)))
        rows += len(to_batch(kept)["uid"])
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=672, help="side of the stored JPEG figures, px")
    parser.add_argument("--workers", type=int, default=2, help="Ray Data preparation actors")
    parser.add_argument("--rows-per-block", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per consumer batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    start_local_ray(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        write_source(path, args.rows, args.image_size, args.seed)
        cfg = DataConfig(
            train=str(path),
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            rows_per_block=args.rows_per_block,
            num_workers=args.workers,
        )
        baseline_s, baseline_rows = run_baseline(cfg, args.seed)
        first_s, ours_s, ours_rows = run_ours(cfg, args.seed, args.batch_size)
    ray.shutdown()
    if baseline_rows != args.rows or ours_rows != args.rows:
        raise SystemExit(f"row counts differ: baseline {baseline_rows}, ours {ours_rows}, expected {args.rows}")

    cpus = os.cpu_count()
    print(
        f"{args.rows} rows, {args.image_size}px JPEG -> <= {MAX_PIXELS} px, "
        f"{args.workers} actors, {cpus} CPUs, {args.rows_per_block} rows per block"
    )
    print(f"{'method':<44}{'seconds':>10}{'rows/s':>10}")
    print(f"{'ours: Ray Data pipeline':<44}{ours_s:>10.2f}{args.rows / ours_s:>10.0f}")
    steady = (args.rows - args.batch_size) / (ours_s - first_s)
    print(f"{'  of which start-up, to the first batch':<44}{first_s:>10.2f}{'':>10}")
    print(f"{'  after the first batch':<44}{ours_s - first_s:>10.2f}{steady:>10.0f}")
    print(f"{'baseline: single-process loop':<44}{baseline_s:>10.2f}{args.rows / baseline_s:>10.0f}")
    result = {
        "benchmark": "data_pipeline",
        "ours_s": round(ours_s, 3),
        "baseline_s": round(baseline_s, 3),
        "speedup": round(baseline_s / ours_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
