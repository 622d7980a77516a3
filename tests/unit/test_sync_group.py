"""Sender and receivers over a real gloo group, each rank on its own thread of this process.

Gloo groups are plain objects here (no default group), so several ranks can share a
process; the Ray-hosted version of these paths is in tests/integration/test_weight_sync.py.
The strangers are real store clients on the group's port: a raw ``TCPStore`` client and
a ``SyncGroup.join`` with a secret of its own.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import psutil
import pytest
import torch
import torch.distributed as dist

from mapo_ray.sync import SyncGroup, WeightReceiver, WeightSender, WeightSyncError, tensor_spec
from mapo_ray.sync.group import local_address_towards

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
        SyncGroup.join(replace(gone, world_size=2, timeout_s=0.5), 1)
    with pytest.raises(WeightSyncError, match=r"at least one receiver; world_size=1"):
        WeightSender(1, 2048)


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"}


def test_the_store_and_gloo_listen_on_the_group_host_only():
    before = _listening()
    sender, (receiver,) = _connected(1)
    opened = _listening() - before
    # torch's own choice would be the store on "::" (every interface) and gloo on the host name's address.
    assert ("127.0.0.1", sender.address.port) in opened
    assert len(opened) >= 3 and {ip for ip, _ in opened} == {"127.0.0.1"}, opened  # the store and each rank's gloo
    sender.close()
    receiver.close()


def _refused(caplog: pytest.LogCaptureFixture, key: str) -> bool:
    return any(f"(rank 0): refused the value of '{key}'" in r.getMessage() for r in caplog.records)


def test_strangers_without_the_secret_are_refused_and_logged_and_the_group_still_forms(caplog):
    caplog.set_level(logging.WARNING, logger="mapo_ray.sync.sealed")
    sender = WeightSender(3, 2048, timeout_s=TIMEOUT_S)
    address = sender.address
    host = _Rank(lambda: sender.connect({1: "rollout-1", 2: "rollout-2"}))
    # A raw client claims rank 1; a joiner that has the address but another secret claims rank 2.
    raw = dist.TCPStore(address.host, address.port, None, False, address.timeout)
    raw.set("mapo_ray/sync/member/1", b"1")
    impostor = _Rank(lambda: SyncGroup.join(replace(address, secret=os.urandom(32)), 2))
    deadline = time.monotonic() + 4 * TIMEOUT_S
    while not all(_refused(caplog, f"mapo_ray/sync/member/{r}") for r in (1, 2)):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.05)
    joins = [_Rank(lambda r=r: WeightReceiver.join(address, r)) for r in (1, 2)]
    assert host.outcome() == (None, None)
    receivers = [j.outcome()[0] for j in joins]

    weights = _weights(7)
    plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
    loaded = [{}, {}]
    ranks = [_Rank(lambda r=r, i=i: r.receive(plan, _copy_into(loaded[i]))) for i, r in enumerate(receivers)]
    sender.send(plan, weights.items())
    assert [rank.outcome() for rank in ranks] == [(1, None)] * 2
    for store in loaded:
        assert all(torch.equal(store[name], tensor) for name, tensor in weights.items())

    _, error = impostor.outcome()  # never admitted, so it never reached gloo's keys
    assert isinstance(error, WeightSyncError), error
    assert "rank 2: connecting the weight-sync group" in str(error)
    assert "no value of 'mapo_ray/sync/admitted' sealed with this group's secret" in str(error)
    # The raw client sees the key names but no value in clear.
    assert "mapo_ray/sync/member/1" in raw.list_keys() and raw.get("mapo_ray/sync/member/1") != b"1"
    sender.close()
    for r in receivers:
        r.close()

def _tcp_links() -> set[tuple[str, int, str, int]]:
    """This process's established TCP connections, (local ip, port, remote ip, port), IPv4-mapped
    addresses written as IPv4."""
    plain = lambda ip: ip.removeprefix("::ffff:")  # noqa: E731
    return {
        (plain(c.laddr.ip), c.laddr.port, plain(c.raddr.ip), c.raddr.port)
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED
    }


def test_gloo_ranks_connect_at_the_group_host_not_at_what_the_hostname_resolves_to():
    # Where the hostname resolves to 127.0.x.x (as on this machine), gloo's default device
    # would connect the ranks over loopback, which no rank on another machine can reach.
    try:
        host = local_address_towards("192.0.2.1")  # TEST-NET-1: only the route is looked up
    except OSError:
        pytest.skip("this machine has no route off loopback")
    if host.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    before = _tcp_links()
    sender = WeightSender(2, 2048, timeout_s=TIMEOUT_S, host=host)
    joined = _Rank(lambda: WeightReceiver.join(sender.address, 1))
    sender.connect({1: "rollout-1"})
    receiver, error = joined.outcome()
    assert error is None
    weights = _weights(3)
    plan = sender.plan(tensor_spec(n, t) for n, t in weights.items())
    loaded: dict[str, torch.Tensor] = {}
    rank = _Rank(lambda: receiver.receive(plan, _copy_into(loaded)))
    sender.send(plan, weights.items())
    assert rank.outcome() == (1, None) and torch.equal(loaded["embed.weight"], weights["embed.weight"])
    links = _tcp_links() - before
    # The store's connection and gloo's pair (both ends of each, this process being both ranks).
    assert len(links) >= 4
    assert {ip for local_ip, _, remote_ip, _ in links for ip in (local_ip, remote_ip)} == {host}
    sender.close()
    receiver.close()
