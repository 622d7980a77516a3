"""The prompt pipeline on a real local Ray cluster: synthetic Geo3K, bad rows, EmoSet JSON lines."""

from __future__ import annotations

import collections
import dataclasses
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mapo_ray.config import DataConfig
from mapo_ray.data.synthetic import write_task

pytestmark = pytest.mark.integration

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def tiny_path():
    from mapo_ray.models.tiny import tiny_vl_path

    return tiny_vl_path()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("synthetic"), train=100, test=20, seed=0)


def config(**overrides) -> DataConfig:
    # One preparation actor: each one imports transformers, which dominates a small run on 2 cores.
    base = DataConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, rows_per_block=32, num_workers=1)
    return dataclasses.replace(base, **overrides)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def consume(dataset, batch_size: int):
    from mapo_ray.data.pipeline import PromptBatches

    batches = PromptBatches(dataset, batch_size)
    return list(batches), batches.metrics()


def test_synthetic_prompts_stream_once_each_with_the_right_answers(ray_cluster, synthetic, tiny_path):
    from mapo_ray.data.pipeline import open_split, prompt_dataset

    train_path, _ = synthetic
    cfg = config(train=str(train_path))
    source = open_split(cfg, "train")
    truth = pq.read_table(train_path).to_pylist()

    epochs = []
    for epoch in (0, 1):
        batches, metrics = consume(prompt_dataset(source, cfg, tokenizer_path=tiny_path, seed=0, epoch=epoch), 16)
        assert [len(b["uid"]) for b in batches] == [16] * 6 + [4]
        assert metrics["data/prompts"] == 100
        assert sum(v for k, v in metrics.items() if k.startswith("data/skipped/")) == 0
        uids = [uid for b in batches for uid in b["uid"]]
        assert sorted(uids) == sorted(f"train.parquet#{i}" for i in range(100))
        epochs.append(uids)
        for batch in batches:
            for uid, prompt, images, answer, kind in zip(
                batch["uid"], batch["prompt"], batch["images"], batch["answer"], batch["kind"]
            ):
                row = truth[int(uid.split("#")[1])]
                assert (answer, kind) == (row["answer"], row["kind"])
                assert prompt.count(VISION) == 1 and row["problem"].replace("<image>", "") in prompt
                [image] = images
                assert image.shape == (168, 168, 3) and image.dtype.name == "uint8"
    # Each epoch reshuffles: same prompts, another order.
    assert epochs[0] != epochs[1]


def test_bad_rows_are_counted_once_across_streaming_split_consumers(ray_cluster, tmp_path, tiny_path):
    import ray

    from mapo_ray.data.pipeline import PromptBatches, open_split, prompt_dataset

    good = {"bytes": png(100, 80), "path": "good.png"}
    rows = [
        ([good], "<image>Find x.", "3"),
        ([{"bytes": b"\x89PNG\r\n\x1a\n broken", "path": "bad.png"}], "<image>Find x.", "1"),
        ([{"bytes": None, "path": None}], "<image>Find x.", "1"),
        ([{"bytes": png(400, 400), "path": "huge.png"}], "<image>Find x.", "1"),
        ([{"bytes": png(420, 2), "path": "sliver.png"}], "<image>Find x.", "1"),
        ([good], "<image>", "1"),
        ([good, good], "<image>Find x.", "1"),
        ([good], "<image>Find x.", None),
    ] + [([good], f"<image>Find y{i}.", str(i)) for i in range(12)]
    table = pa.table(
        {
            "images": pa.array([r[0] for r in rows], pa.list_(IMAGE)),
            "problem": [r[1] for r in rows],
            "answer": [r[2] for r in rows],
            "id": [f"q{i}" for i in range(len(rows))],
        }
    )
    pq.write_table(table, tmp_path / "mixed.parquet", row_group_size=5)
    cfg = config(train=str(tmp_path / "mixed.parquet"), max_decode_pixels=300 * 300, rows_per_block=3)
    dataset = prompt_dataset(open_split(cfg, "train"), cfg, tokenizer_path=tiny_path, seed=1)

    @ray.remote(num_cpus=0)
    def consumer(shard):
        batches = PromptBatches(shard, batch_size=4)
        return [(uid, ident) for b in batches for uid, ident in zip(b["uid"], b["id"])], batches.metrics()

    results = ray.get([consumer.remote(shard) for shard in dataset.streaming_split(2)], timeout=120)
    totals = collections.Counter()
    for _, metrics in results:
        totals.update(metrics)
    expected = dict.fromkeys(
        ["corrupt_image", "missing_image", "image_too_large", "image_aspect_ratio", "empty_problem",
         "placeholder_mismatch", "missing_answer"],
        1,
    )
    assert {k.split("/")[-1]: v for k, v in totals.items() if k.startswith("data/skipped/") and v} == expected
    assert totals["data/prompts"] == 13
    kept = sorted(pair for pairs, _ in results for pair in pairs)
    assert kept == sorted([("mixed.parquet#0", "q0")] + [(f"mixed.parquet#{i}", f"q{i}") for i in range(8, 20)])


def test_emoset_jsonl_becomes_emotion_prompts(ray_cluster, tmp_path, tiny_path):
    from mapo_ray.data.pipeline import open_split, prompt_dataset

    (tmp_path / "images").mkdir()
    labels = ["awe", "fear", "sadness", "Amusement", "boredom", "anger"]
    for i in range(len(labels)):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(90 + i, 90))
    lines = [{"image": f"images/{i}.png", "emotion": label, "id": i} for i, label in enumerate(labels)]
    lines.append({"image": "images/missing.png", "emotion": "awe", "id": 99})
    (tmp_path / "emoset.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    cfg = config(layout="emoset", test=str(tmp_path / "emoset.jsonl"), rows_per_block=2, shuffle=False)

    batches, metrics = consume(prompt_dataset(open_split(cfg, "test"), cfg, tokenizer_path=tiny_path, seed=0), 8)
    [batch] = batches
    got = dict(zip(batch["id"], batch["answer"]))
    assert got == {0: "awe", 1: "fear", 2: "sadness", 3: "amusement", 5: "anger"}
    assert all("Which emotion" in p and p.count(VISION) == 1 for p in batch["prompt"])
    assert metrics["data/skipped/unknown_label"] == 1 and metrics["data/skipped/missing_image"] == 1


def test_evaluation_prompts_count_their_skips_and_an_unusable_test_split_is_named(ray_cluster, tmp_path, tiny_path):
    from mapo_ray.config import load_config
    from mapo_ray.data import DataError
    from mapo_ray.data.stream import load_eval_prompts

    good = {"bytes": png(100, 80), "path": "good.png"}
    broken = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": "bad.png"}
    raw = pa.array([b"3", b"\xff4", b"5"], pa.binary())
    # A string column whose bytes Arrow never checked (one cell is not UTF-8), as another tool may write.
    answers = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
    images = pa.array([[good], [good], [broken]], pa.list_(IMAGE))
    table = pa.table({"images": images, "problem": ["<image>Find x."] * 3, "answer": answers})
    pq.write_table(table, tmp_path / "mixed.parquet")
    pq.write_table(table.slice(1), tmp_path / "unusable.parquet")

    def settings(test):
        return load_config(preset="cpu-tiny", overrides=[f"data.test={tmp_path / test}", "data.num_workers=1"])

    prompts, skipped = load_eval_prompts(settings("mixed.parquet"), tiny_path)
    assert [p.answer for p in prompts] == ["3"]
    assert skipped == {"invalid_text": 1, "corrupt_image": 1}
    with pytest.raises(DataError, match=r"unusable\.parquet has no usable row \(rows skipped: 1 corrupt_image, 1 invalid_text\)"):
        load_eval_prompts(settings("unusable.parquet"), tiny_path)
