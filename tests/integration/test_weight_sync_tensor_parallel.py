"""Weight sync to rollout engines that hold two ranks each (as vLLM with tensor_parallel_size=2
does), on a local Ray cluster over gloo, with the tiny Qwen2.5-VL.

The engine is the test double ``tests.integration.two_rank_engine.TwoRankHFEngine``
(vLLM tensor parallelism cannot run on CPU): its first rank loads into an HF model, its
second into a shadow copy of the weights. The learner is this test process.
"""

from __future__ import annotations

import hashlib
import sys
import time

import pytest
import ray
import torch

from mapo_ray.config import RolloutConfig, SyncConfig
from mapo_ray.models.tiny import tiny_vl_path
from mapo_ray.rollout.engine import make_engine
from mapo_ray.sync import GroupAddress, SyncPlan, WeightSyncError
from mapo_ray.sync.ray_sync import RayWeightSync
from tests.integration.two_rank_engine import two_rank_engine

pytestmark = pytest.mark.integration

# Ray workers cannot import a pytest module by name, so the actor class below travels by
# value; ``two_rank_engine`` is imported by name in the worker.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Joining and each bucket take well under a second; a wrong-size group must fail within this.
TIMEOUT_S = 10.0
CONFIG = SyncConfig(backend="gloo", bucket_mb=0.25, timeout_s=TIMEOUT_S)  # several buckets


def digests(tensors) -> dict[str, str]:
    """A digest of each ``(name, tensor)``'s raw bytes: equal digests mean bit-for-bit equal tensors."""
    return {
        name: hashlib.blake2b(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, t in tensors
    }


@ray.remote(num_cpus=0.1)
class EngineActor:
    """A rollout actor reduced to weight sync: a two-rank engine, or an ordinary HF engine."""

    def __init__(self, two_ranks: bool) -> None:
        cfg = RolloutConfig()
        factory = two_rank_engine if two_ranks else make_engine
        self.engine = factory(cfg, str(tiny_vl_path()), 0)

    def sync_ranks(self) -> int:
        return self.engine.sync_ranks

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        self.engine.join_weight_sync(address, first_rank)

    def receive_weights(self, plan: SyncPlan) -> int:
        return self.engine.receive_weights(plan)

    def weight_version(self) -> int | None:
        return self.engine.weight_version

    def model_digests(self) -> dict[str, str]:
        model = getattr(self.engine, "inner", self.engine).model
        return digests(model.named_parameters())

    def shadow_digests(self) -> dict[str, str]:
        return digests(self.engine.shadow.items())

    def shadow_matches(self) -> bool:
        return self.engine.shadow_matches()


@pytest.fixture(scope="module")
def learner() -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl_path())


@pytest.fixture(scope="module")
def two_rank_actors(ray_cluster):
    actors = {f"tp-{i}": EngineActor.remote(True) for i in range(2)}
    assert ray.get([a.sync_ranks.remote() for a in actors.values()]) == [2, 2]  # constructed, so joins are quick
    yield actors
    for actor in actors.values():
        ray.kill(actor)


def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)


def test_both_ranks_of_each_actor_load_every_update(learner, two_rank_actors):
    sync = RayWeightSync(CONFIG)
    try:
        sync.connect(two_rank_actors, ranks_per_actor=2)  # world size 5: learner, then ranks 1-2 and 3-4
        before = digests(learner.named_parameters())
        for version, seed in ((1, 1), (2, 2)):
            perturb(learner, seed)
            want = digests(learner.named_parameters())
            assert all(want[n] != before[n] for n in want)  # every tensor changed, so equality means it moved
            assert sync.sync_model(learner) == version
            for actor in two_rank_actors.values():
                assert ray.get(actor.weight_version.remote()) == version
                assert ray.get(actor.model_digests.remote()) == want
                shadow = ray.get(actor.shadow_digests.remote())
                assert {n: shadow[n] for n in want} == want  # the second rank's copy, by the learner's names
                assert ray.get(actor.shadow_matches.remote())  # and every alias (the tied lm_head) with it
            before = want
    finally:
        sync.close()


def test_a_group_sized_for_one_rank_per_actor_is_refused_at_once(learner, two_rank_actors):
    sync = RayWeightSync(CONFIG)
    try:
        # World size 3: tp-0 would take ranks 1-2 (it fits), tp-1 ranks 2-3 (rank 3 does not exist).
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as excinfo:
            sync.connect(two_rank_actors, ranks_per_actor=1)
        elapsed = time.monotonic() - start
        message = str(excinfo.value)
        assert "joining the weight-sync group failed: 'tp-1' raised " in message
        assert "this engine holds 2 ranks, 2..3" in message and "connect with ranks_per_actor=2" in message
        assert elapsed < TIMEOUT_S  # refused before joining anything, not after a time-out
        # The actors recover: a group of the right size works.
        sync.connect(two_rank_actors, ranks_per_actor=2)
        perturb(learner, 3)
        version = sync.sync_model(learner)
        want = digests(learner.named_parameters())
        for actor in two_rank_actors.values():
            assert ray.get(actor.weight_version.remote()) == version
            assert ray.get(actor.model_digests.remote()) == want
            assert ray.get(actor.shadow_matches.remote())
    finally:
        sync.close()


def test_one_rank_count_for_all_cannot_mix_engines(two_rank_actors):
    """``connect`` gives every actor the same number of ranks: an ordinary one-rank actor
    next to a two-rank one leaves a rank empty, and the learner names it after the time-out."""
    plain = EngineActor.remote(False)
    assert ray.get(plain.sync_ranks.remote()) == 1
    sync = RayWeightSync(CONFIG)
    try:
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as excinfo:
            sync.connect({"tp-0": two_rank_actors["tp-0"], "plain": plain}, ranks_per_actor=2)
        elapsed = time.monotonic() - start
        assert f"'plain' rank 4 did not join within {TIMEOUT_S:g}s" in str(excinfo.value)
        assert elapsed < 3 * TIMEOUT_S  # a failure, not a hang
    finally:
        sync.close()
        ray.kill(plain)
