"""Rollout actors on a local Ray cluster with the tiny Qwen2.5-VL and the HF engine:
groups from handed batches and from shares of the prompt reader, weight updates through
``RayWeightSync``, and failures that name the actor."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from mapo_ray.config import RolloutConfig, SyncConfig
from mapo_ray.data.prompts import render_prompt
from mapo_ray.models import tiny_vl_path
from mapo_ray.rollout import HFEngine
from mapo_ray.rollout.actor import RolloutError, collect, create_rollout_actors
from mapo_ray.sync.ray_sync import RayWeightSync
from mapo_ray.types import Prompt, SamplingParams, count_tokens

pytestmark = pytest.mark.integration

# Half a CPU each leaves the 4-CPU test cluster room for Ray Data's tasks and actors.
CFG = RolloutConfig(num_actors=2, num_cpus_per_actor=0.5, group_size=2, max_new_tokens=8, top_p=1.0)
TIMEOUT_S = 120.0
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def actors(ray_cluster):
    handles = create_rollout_actors(CFG, tiny_vl_path())
    yield handles
    for handle in handles.values():
        ray.kill(handle)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    tokenizer = HFEngine(tiny_vl_path()).tokenizer
    problems = ["<image>Find x. AB = 3 and BC = 4.", "How many red cubes are in <image>?", "What is 2 + 2?"]
    sizes = [(112, 84), (56, 140), None]
    return [
        Prompt(f"p{i}", render_prompt(tokenizer, problem), (Image.new("RGB", size, "red"),) if size else (), str(i))
        for i, (problem, size) in enumerate(zip(problems, sizes))
    ]


def on_each(actors, method: str, *args) -> dict:
    return collect({getattr(a, method).remote(*args): name for name, a in actors.items()}, method, TIMEOUT_S)


def test_actors_return_groups_and_tokens_per_second(actors, prompts):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    results = on_each(actors, "generate", prompts, params)
    for groups in results.values():
        assert [g.uid for g in groups] == ["p0", "p1", "p2"] and [g.answer for g in groups] == ["0", "1", "2"]
        assert all(len(g.samples) == 2 and all(s.weight_version == 0 for s in g.samples) for g in groups)
    # Same seed and weights: the two actors sample the same responses.
    first, second = results.values()
    assert [s.response_ids for g in first for s in g.samples] == [s.response_ids for g in second for s in g.samples]
    metrics = on_each(actors, "metrics")
    for name, m in metrics.items():
        assert m["rollout/generated_tokens"] >= count_tokens(results[name]) > 0
        assert m["rollout/tokens_per_s"] > 0 and m["rollout/last_tokens_per_s"] > 0


def test_weight_updates_over_the_sync_group_change_generation(actors, prompts):
    before = on_each(actors, "generate", prompts, GREEDY)
    learner = HFEngine(tiny_vl_path())  # stands in for learner rank 0's model
    ranks = set(on_each(actors, "sync_ranks").values())
    sync = RayWeightSync(SyncConfig(backend="gloo", bucket_mb=0.25, timeout_s=60.0))
    try:
        sync.connect(actors, ranks_per_actor=ranks.pop())
        generator = torch.Generator().manual_seed(0)
        for version in (1, 2):
            with torch.no_grad():
                for param in learner.model.parameters():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
            assert sync.sync_model(learner.model) == version
            assert set(on_each(actors, "weight_version").values()) == {version}
    finally:
        sync.close()
    after = on_each(actors, "generate", prompts, GREEDY)
    expected = [g.samples[0].response_ids for g in learner.generate(prompts, GREEDY)]
    for name in actors:
        assert [g.samples[0].weight_version for g in after[name]] == [2, 2, 2]
        assert [g.samples[0].response_ids for g in after[name]] != [g.samples[0].response_ids for g in before[name]]
        assert [g.samples[0].response_ids for g in after[name]] == expected


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rollout_reads_its_share_from_the_object_store_and_leaves_its_groups_there(actors, tmp_path):
    """The production data path: Ray Data -> PromptReader -> one object per share -> ``rollout``."""
    from mapo_ray.config import load_config
    from mapo_ray.data.stream import DataPosition, PromptReader, Taken
    from mapo_ray.rollout.actor import rollout_returns

    good = {"bytes": _png(90, 70), "path": "good.png"}
    broken = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": "broken.png"}
    images = [[good]] * 3 + [[broken]] + [[good]] * 3
    table = pa.table(
        {
            "images": pa.array(images, pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
            "problem": [f"<image>Find x{i}." for i in range(len(images))],
            "answer": [str(i) for i in range(len(images))],
        }
    )
    pq.write_table(table, tmp_path / "rows.parquet")
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"data.train={tmp_path / 'rows.parquet'}",
            f"data.test={tmp_path / 'rows.parquet'}",
            "data.shuffle=false",
            "data.num_workers=1",
            "data.rows_per_block=2",
            "trainer.eval_every=0",
        ],
    )
    reader = PromptReader.remote(cfg, str(tiny_vl_path()), DataPosition())
    try:
        taken_ref, first, second = reader.take.options(num_returns=3).remote([3, 3])
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=1)
        calls = {
            name: actors[name].rollout.options(num_returns=rollout_returns(3)).remote(share, params)
            for name, share in zip(actors, (first, second))
        }
        uids = [f"rows.parquet#{i}" for i in range(7) if i != 3]
        taken: Taken = ray.get(taken_ref, timeout=TIMEOUT_S)
        assert taken.uids == uids and taken.epochs == [0] * 6 and taken.position == DataPosition()
        for name, (summaries, *rest) in zip(actors, calls.values()):
            summaries = ray.get(summaries, timeout=TIMEOUT_S)
            requests, payloads = ray.get(rest[:3], timeout=TIMEOUT_S), ray.get(rest[3:], timeout=TIMEOUT_S)
            assert [s.uid for s in summaries] == [r.uid for r in requests] == [p.group.uid for p in payloads]
            for summary, request, payload in zip(summaries, requests, payloads):
                samples = payload.group.samples
                assert summary.response_lengths == [len(s.response_ids) for s in samples]
                assert summary.prompt_length == len(samples[0].prompt_ids) and summary.size == 2
                assert list(request.responses) == [s.response_text for s in samples]
                assert request.answer == payload.group.answer == summary.uid.rsplit("#", 1)[1]
                (image,) = payload.images  # the prompt's image, resized, rides with the group
                assert image.shape[2] == 3 and image.dtype.name == "uint8"
        metrics = ray.get(reader.metrics.remote(), timeout=TIMEOUT_S)
        assert metrics["data/prompts"] >= 6 and metrics["data/skipped/corrupt_image"] == 1
        assert ray.get(reader.position.remote(), timeout=TIMEOUT_S) == DataPosition(0, 6)
    finally:
        ray.kill(reader)


def test_failures_name_the_actor(ray_cluster, actors, prompts):
    name, actor = next(iter(actors.items()))
    wrong = Prompt("bad#0", prompts[0].text, ())  # one <|image_pad|>, no image
    named = rf"'{name}' raised .*'{name}': generating for 1 prompt\(s\) \(bad#0\) failed: ValueError"
    with pytest.raises(RolloutError, match=named):
        collect({actor.generate.remote([wrong], GREEDY): name}, "generate", TIMEOUT_S)
    # The actor survives its engine's error.
    assert collect({actor.weight_version.remote(): name}, "weight_version", TIMEOUT_S) == {name: 2}

    broken = create_rollout_actors(CFG, "/nonexistent/model", prefix="broken")
    with pytest.raises(RolloutError, match="'broken-0' died: .*'broken-1' died: "):
        collect({a.metrics.remote(): n for n, a in broken.items()}, "metrics", TIMEOUT_S)

    doomed = create_rollout_actors(RolloutConfig(num_actors=1, num_cpus_per_actor=0.5), tiny_vl_path(), prefix="doomed")
    ray.get(doomed["doomed-0"].metrics.remote(), timeout=TIMEOUT_S)
    ray.kill(doomed["doomed-0"])
    with pytest.raises(RolloutError, match="generate failed: 'doomed-0' died"):
        collect({doomed["doomed-0"].generate.remote(prompts, GREEDY): "doomed-0"}, "generate", TIMEOUT_S)
