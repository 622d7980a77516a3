"""Weight sync on a local Ray cluster, over gloo, with the tiny Qwen2.5-VL.

The rollout actor here is a stand-in for the rollout package's (which is built
later): an HF model plus the two methods ``RayWeightSync`` calls, loading with the
``load_weights(iterable of (name, tensor))`` contract of ``mapo_ray.sync.receiver``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import pytest
import ray
import torch

from mapo_ray.config import SyncConfig
from mapo_ray.models.tiny import tiny_vl_path
from mapo_ray.sync import SyncPlan, WeightReceiver, WeightSyncError, named_parameters_for_sync
from mapo_ray.sync.group import GroupAddress
from mapo_ray.sync.ray_sync import RayWeightSync

pytestmark = pytest.mark.integration

# Ray workers cannot import a pytest module by name, so the actor classes below travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Short, so that the failure tests stay fast; the tiny model syncs in well under it.
TIMEOUT_S = 4.0
# Small buckets: the tiny model (~2 MB in float32) goes out in several of them.
CONFIG = SyncConfig(backend="gloo", bucket_mb=0.25, timeout_s=TIMEOUT_S)


def checksums(model: torch.nn.Module) -> dict[str, str]:
    """A digest of every parameter's raw bytes: equal digests mean bit-for-bit equal tensors."""
    return {
        name: hashlib.blake2b(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters()
    }


def load_tiny_vl() -> torch.nn.Module:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vl_path())


# Two threads: ``loaded`` answers while ``receive_weights`` is blocked in a stalled load.
@ray.remote(num_cpus=0.1, max_concurrency=2)
class Rollout:
    def __init__(self, stall_after: int | None = None) -> None:
        self.model = load_tiny_vl()
        self.receiver: WeightReceiver | None = None
        self.stall_after = stall_after
        self.count = 0

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        if self.receiver is not None:
            self.receiver.close()  # a new group replaces the old one
        self.receiver = WeightReceiver.join(address, first_rank)

    def receive_weights(self, plan: SyncPlan) -> int:
        return self.receiver.receive(plan, self.load_weights)

    def load_weights(self, weights) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                self.count += 1
                if self.count == self.stall_after:
                    threading.Event().wait()  # a hung engine: only ray.kill ends it

    def loaded(self) -> int:
        return self.count

    def version(self) -> int | None:
        return self.receiver.version

    def checksums(self) -> dict[str, str]:
        return checksums(self.model)

    def default_group_initialized(self) -> bool:
        return torch.distributed.is_initialized()


@ray.remote(num_cpus=0.1)
class Hung:
    """A rollout actor whose engine hangs before it joins: it never reaches the group."""

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        threading.Event().wait()


@ray.remote(num_cpus=0.1)
class Learner:
    """Learner rank 0 without a learner group of its own: a plain HF model."""

    def __init__(self) -> None:
        self.model = load_tiny_vl()
        self.sync = RayWeightSync(CONFIG)

    def perturb(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)

    def connect(self, actors: dict) -> None:
        self.sync.connect(actors)

    def sync_weights(self) -> int:
        return self.sync.sync_model(self.model)

    def checksums(self) -> dict[str, str]:
        return checksums(self.model)


@ray.remote(num_cpus=0.1)
class ZeroLearner:
    """One rank of a 2-rank DeepSpeed ZeRO-3 learner; DeepSpeed creates the default group."""

    def __init__(self, rank: int, port: int) -> None:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        self.rank = rank
        self.model = load_tiny_vl()
        self.sync = RayWeightSync(CONFIG) if rank == 0 else None

    def initialize(self) -> bool:
        """Both ranks at once: DeepSpeed forms the default group and partitions collectively.

        Returns whether every parameter is now a ZeRO-3 partition (empty outside a gather).
        """
        import deepspeed

        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        self.engine = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)[0]
        return all(hasattr(p, "ds_id") and p.numel() == 0 for p in self.engine.module.parameters())

    def connect(self, actors: dict) -> None:
        self.sync.connect(actors)

    def sync_weights(self) -> int | None:
        if self.sync is not None:
            return self.sync.sync_model(self.engine.module)
        # Other ranks take part in each chunk's gather and throw the tensors away.
        for _ in named_parameters_for_sync(self.engine.module, CONFIG.bucket_bytes):
            pass
        return None

    def gathered_checksums(self) -> dict[str, str]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            return checksums(self.engine.module)

    def train_step(self) -> float:
        """One optimizer step through the default group (ZeRO-3 reduce-scatter and gathers)."""
        ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(self.rank))
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        total = torch.ones(1)
        torch.distributed.all_reduce(total)
        assert torch.distributed.get_world_size() == 2 and total.item() == 2.0
        return loss.item()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def learner(ray_cluster):
    actor = Learner.remote()
    ray.get(actor.checksums.remote())
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="module")
def rollouts(ray_cluster):
    """Two rollout actors shared by the tests; each test connects the ones it needs."""
    actors = {f"rollout-{i}": Rollout.remote() for i in range(2)}
    ray.get([a.loaded.remote() for a in actors.values()])  # constructed, so joining is quick
    yield actors
    for actor in actors.values():
        ray.kill(actor)


def test_rollouts_match_the_learner_bit_for_bit_and_versions_advance(learner, rollouts):
    ray.get(learner.connect.remote(rollouts))
    before = ray.get(learner.checksums.remote())
    assert len(before) > 50  # every tensor of the tiny VL, vision tower included
    first = ray.get(learner.sync_weights.remote())
    for expected_version, seed in ((first + 1, 1), (first + 2, 2)):
        ray.get(learner.perturb.remote(seed))
        want = ray.get(learner.checksums.remote())
        assert all(want[name] != before[name] for name in want)  # every tensor changed, so equality means it moved
        assert ray.get(learner.sync_weights.remote()) == expected_version
        for rollout in rollouts.values():
            assert ray.get(rollout.checksums.remote()) == want
            assert ray.get(rollout.version.remote()) == expected_version
        before = want
    # The sync group never became a default group in the rollout processes.
    assert ray.get([r.default_group_initialized.remote() for r in rollouts.values()]) == [False, False]


def test_zero3_learner_gathers_and_keeps_its_default_group(rollouts):
    port = _free_port()
    ranks = [ZeroLearner.remote(rank, port) for rank in range(2)]
    rollout = rollouts["rollout-0"]
    assert ray.get([r.initialize.remote() for r in ranks]) == [True, True]
    ray.get(ranks[0].connect.remote({"rollout-0": rollout}))
    previous = ray.get(rollout.checksums.remote())
    for expected_version in (1, 2):
        assert ray.get([r.sync_weights.remote() for r in ranks]) == [expected_version, None]
        want, _ = ray.get([r.gathered_checksums.remote() for r in ranks])
        assert ray.get(rollout.checksums.remote()) == want
        assert want != previous
        previous = want
        # The learner's own group still trains after the sync group exists.
        ray.get([r.train_step.remote() for r in ranks])
    for actor in ranks:
        ray.kill(actor)


def test_a_rollout_killed_during_sync_is_named(learner, rollouts):
    survivor, victim = rollouts["rollout-0"], Rollout.remote(stall_after=3)
    ray.get(victim.loaded.remote())
    ray.get(learner.connect.remote({"rollout-0": survivor, "victim": victim}))
    ray.get(learner.perturb.remote(3))
    update = learner.sync_weights.remote()
    deadline = time.monotonic() + 60
    while ray.get(victim.loaded.remote()) < 3:  # the victim is now mid-update, stuck in its loader
        assert time.monotonic() < deadline, "the victim never started loading"
        time.sleep(0.05)
    ray.kill(victim)
    with pytest.raises(WeightSyncError, match=r"weight update v\d+ failed: 'victim' died \(ActorDiedError\)"):
        ray.get(update, timeout=6 * TIMEOUT_S)  # the guard against a hang, not a timing claim
    # The survivor's half-loaded update is no version; a group without the victim works again.
    assert ray.get(survivor.version.remote()) is None
    ray.get(learner.connect.remote({"rollout-0": survivor}))
    ray.get(learner.sync_weights.remote())
    assert ray.get(survivor.checksums.remote()) == ray.get(learner.checksums.remote())


def test_a_rollout_that_never_joins_is_named(learner, rollouts):
    hung = Hung.remote()
    with pytest.raises(WeightSyncError) as excinfo:
        ray.get(learner.connect.remote({"rollout-0": rollouts["rollout-0"], "hung": hung}), timeout=6 * TIMEOUT_S)
    message = str(excinfo.value)
    assert f"'hung' rank 2 did not join within {TIMEOUT_S:g}s" in message
    assert f"'hung' did not answer within {TIMEOUT_S:g}s" in message
    assert "'rollout-0' raised" in message  # released from its half-made group, not left hanging
    ray.kill(hung)
