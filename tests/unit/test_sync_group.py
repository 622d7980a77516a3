"""Sender and receivers over a real gloo group, each rank on its own thread of this process.

Gloo groups are plain objects here (no default group), so several ranks can share a
process; the Ray-hosted version of these paths is in tests/integration/test_weight_sync.py.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from mapo_ray.sync import SyncGroup, WeightReceiver, WeightSender, WeightSyncError, tensor_spec

TIMEOUT_S = 3.0


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layer.norm": torch.randn(16, generator=g).to(torch.bfloat16),
        "layer.step": torch.randint(0, 100, (), generator=g),
        "head.weight": torch.randn(300, 16, generator=g).to(torch.float16),
    }


class _Rank(threading.Thread):
    """Runs ``fn()`` on a thread and keeps its result or exception for the test to inspect."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.error = err

    def outcome(self):
        self.join(4 * TIMEOUT_S)
        assert not self.is_alive(), "rank thread still blocked"
        return self.result, self.error


def _connected(receivers: int, bucket_bytes: int = 2048) -> tuple[WeightSender, list[WeightReceiver]]:
    sender = WeightSender(1 + receivers, bucket_bytes, timeout_s=TIMEOUT_S)
    joins = [_Rank(lambda r=r: WeightReceiver.join(sender.address, r)) for r in range(1, 1 + receivers)]
    sender.connect({r: f"rollout-{r}" for r in range(1, 1 + receivers)})
    return sender, [j.outcome()[0] for j in joins]


def _copy_into(store: dict[str, torch.Tensor]):
    def load_weights(weights):
        for name, tensor in weights:
            store[name] = tensor.clone()

    return load_weights


def test_updates_arrive_bit_exact_and_versions_advance():
    # Other tests of the session may have made a default group; whatever it is, it must stay.
    default_before = dist.group.WORLD if dist.is_initialized() else None
    sender, receivers = _connected(2)
    loaded = [{}, {}]
    for expected_version, seed in ((1, 11), (2, 12)):
        weights = _weights(seed)
        plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
        assert plan.version == expected_version and len(plan.buckets) > 1
        ranks = [_Rank(lambda r=r: r.receive(plan, _copy_into(loaded[i]))) for i, r in enumerate(receivers)]
        sender.send(plan, weights.items())
        assert [rank.outcome() for rank in ranks] == [(expected_version, None)] * 2
        for store in loaded:
            assert list(store) == list(weights)
            for name, tensor in weights.items():
                assert store[name].dtype == tensor.dtype and torch.equal(store[name], tensor), name
        assert [r.version for r in receivers] == [expected_version] * 2
    # The group never became (or replaced) torch.distributed's default group.
    assert (dist.group.WORLD if dist.is_initialized() else None) is default_before
    sender.close()
    for r in receivers:
        r.close()


def test_a_rank_that_never_joins_is_named():
    sender = WeightSender(3, 2048, timeout_s=1.0)
    joined = _Rank(lambda: WeightReceiver.join(sender.address, 1))
    with pytest.raises(WeightSyncError, match=r"'rollout-b' rank 2 did not join within 1s"):
        sender.connect({1: "'rollout-a' rank 1", 2: "'rollout-b' rank 2"})
    sender.close()
    _, error = joined.outcome()  # the rank that did join is released, not left hanging
    assert isinstance(error, WeightSyncError) and "rank 1: connecting the weight-sync group" in str(error)


def test_weights_that_disagree_with_the_plan_fail_both_ends():
    sender, (receiver,) = _connected(1)
    weights = _weights(0)
    plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
    rank = _Rank(lambda: receiver.receive(plan, _copy_into({})))
    wrong = dict(weights, **{"layer.norm": weights["layer.norm"].float()})
    expected = r"#1: the plan expects 'layer.norm' \[16\] bfloat16, the weights gave 'layer.norm' \[16\] float32"
    with pytest.raises(WeightSyncError, match=expected):
        sender.send(plan, wrong.items())
    _, error = rank.outcome()
    assert isinstance(error, WeightSyncError) and "rank 1: weight update v1" in str(error)
    assert receiver.version is None


def test_weights_that_end_early_or_run_on_fail_both_ends():
    weights = _weights(0)
    for given, message in (
        (list(weights.items())[:-1], r"the weights ended after 3 tensors; the plan has 4 \(next: 'head.weight'\)"),
        ([*weights.items(), ("extra", torch.zeros(1))], r"go on past the plan's 4 tensors \(first extra: 'extra'\)"),
    ):
        sender, (receiver,) = _connected(1)
        plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
        rank = _Rank(lambda: receiver.receive(plan, _copy_into({})))
        with pytest.raises(WeightSyncError, match=message):
            sender.send(plan, given)
        # Caught before the last bucket went out, so no receiver completes a bad update.
        _, error = rank.outcome()
        assert isinstance(error, WeightSyncError) and receiver.version is None


def test_a_loader_that_stops_early_or_raises_fails_the_update():
    def take_one(weights):
        next(iter(weights))

    def reject(weights):
        for name, _ in weights:
            raise KeyError(f"engine has no parameter {name!r}")

    for load_weights, message in (
        (take_one, r"^rank 1: weight update v1: load_weights returned after taking 1 of 4 tensors"),
        (reject, r"^rank 1: weight update v1: load_weights raised KeyError: \"engine has no parameter 'embed.weight"),
    ):
        sender, (receiver,) = _connected(1, bucket_bytes=256)
        weights = _weights(0)
        plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
        rank = _Rank(lambda lw=load_weights: receiver.receive(plan, lw))
        # The sender fails too once the receiver closes its end, unless the small buckets
        # were already all in the socket buffers; either way it returns.
        try:
            sender.send(plan, weights.items())
        except WeightSyncError as err:
            assert "rank 0: weight update v1: broadcast of bucket" in str(err)
        _, error = rank.outcome()
        assert isinstance(error, WeightSyncError) and re.search(message, str(error)), error
        assert receiver.version is None
        sender.close()


def test_join_errors_name_the_rank_and_address():
    sender = WeightSender(2, 2048, timeout_s=TIMEOUT_S)
    with pytest.raises(WeightSyncError, match=r"receiver rank 2 is outside 1..1"):
        WeightReceiver.join(sender.address, 2)
    sender.close()
    gone = sender.address
    with pytest.raises(WeightSyncError, match=rf"rank 1: cannot reach the weight-sync store at 127.0.0.1:{gone.port}"):
        SyncGroup.join(type(gone)(gone.host, gone.port, 2, "gloo", 0.5), 1)
    with pytest.raises(WeightSyncError, match=r"at least one receiver; world_size=1"):
        WeightSender(1, 2048)
