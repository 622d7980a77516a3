"""A process group of its own for weight sync: a TCP store and one backend object.

The group is built from ``torch.distributed``'s building blocks (``TCPStore`` and a
``ProcessGroupGloo`` / ``ProcessGroupNCCL`` constructed directly) and is never
registered with ``torch.distributed``: a learner's default group (Ray Train,
DeepSpeed) is left as it was, and a process that had no default group still has
none. Rank 0 hosts the store and sends; ranks 1.. receive.

Joining has two steps so that a rank that never shows up is named: each receiver
first writes its member key into the store, and the host waits for all keys (with
the group's time-out), then admits them, before any rank enters the backend's own
all-to-all connect.

Closed to strangers, as far as torch lets it be:

- The store listens on ``GroupAddress.host`` alone. Given a port, torch 2.13's
  ``TCPStore`` listens on every interface (``::``) whatever its host name; handed a
  socket bound here (``master_listen_fd``), it listens on that socket only.
- Each group has a random secret, created by the host and carried to the receivers
  inside ``GroupAddress`` (on a Ray actor call, authenticated while Ray's token
  authentication is on). Every store value, member keys and the backend's own
  rendezvous (gloo's addresses, NCCL's unique id) included, is sealed with it
  (``SealedStore``). A member key without it is
  refused with a warning and the host keeps waiting for the member's; a joiner without
  it never sees the host's admission, so it fails at its time-out and touches none of
  the backend's keys.
- gloo's ranks connect to each other at the addresses they bind to, by default whatever
  the machine's hostname resolves to: often a loopback address (Debian's ``/etc/hosts``,
  many containers), which a rank on another machine cannot dial, and which is not the
  address the store is on. So rank 0 binds to the group's host, and each receiver to its
  own address on the route to that host (``GLOO_SOCKET_IFNAME``, when set, chooses the
  interfaces instead).

Open still: anyone who reaches the store can connect, list the key names and delete or
overwrite keys, which can make a join fail (not succeed) at its time-out; gloo's and
NCCL's own connections are not authenticated (a peer that finds their ports while the
group connects could race a member); nothing is encrypted on the wire after the
rendezvous, so the weights travel in clear.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch._C._distributed_c10d import BroadcastOptions

from mapo_ray.sync.errors import WeightSyncError, first_line
from mapo_ray.sync.sealed import POLL_S, SealedStore

Backend = Literal["gloo", "nccl"]


@dataclass(frozen=True)
class GroupAddress:
    """How to reach and join one weight-sync group; small and picklable (it rides on a Ray call)."""

    host: str
    port: int
    world_size: int
    backend: Backend
    timeout_s: float
    # The group's key (32 random bytes): sealing store values with it is how a member
    # proves it belongs. Out of repr, so that no error or log that prints an address leaks it.
    secret: bytes = field(repr=False)

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)


_ADMITTED = "mapo_ray/sync/admitted"


def _member_key(rank: int) -> str:
    return f"mapo_ray/sync/member/{rank}"


def _store_on(host: str, timeout: timedelta) -> dist.TCPStore:
    """A store server listening on ``host`` alone, at a free port."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            None,
            True,
            timeout,
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except (OSError, RuntimeError) as err:
        sock.close()
        raise WeightSyncError(f"cannot open the weight-sync store on {host}: {first_line(err)}") from err
    sock.detach()  # the store's libuv server owns the socket now, and closes it when it goes
    return store


def default_device(backend: Backend) -> torch.device:
    """CPU for gloo, the current CUDA device for NCCL."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (an IP address): the one a process
    there can reach it at. No packet is sent."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # a UDP "connect" only picks the route and the local address
        return probe.getsockname()[0]


def _new_backend(
    store: dist.Store, rank: int, address: GroupAddress, device: torch.device
) -> C10dBackend:
    """Construct the backend directly: no ``init_process_group``, no ``new_group``."""
    if address.backend == "gloo":
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            # The operator chose the interfaces; this constructor reads GLOO_SOCKET_IFNAME like init_process_group does.
            return dist.ProcessGroupGloo(store, rank, address.world_size, address.timeout)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = address.timeout
        bind = address.host if rank == 0 else local_address_towards(address.host)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
        return dist.ProcessGroupGloo(store, rank, address.world_size, options)
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise WeightSyncError("weight sync backend 'nccl' needs a CUDA build of torch; use 'gloo'")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = address.timeout
    backend = dist.ProcessGroupNCCL(store, rank, address.world_size, options)
    # Connect now, inside the join time-out, rather than lazily on the first broadcast.
    backend.eager_connect_single_device(device)
    return backend


class SyncGroup:
    """One rank's end of a weight-sync group. Create with ``host`` (rank 0) or ``join`` (ranks 1..)."""

    def __init__(self, store: dist.TCPStore, rank: int, address: GroupAddress, device: torch.device | None) -> None:
        self.rank = rank
        self.address = address
        self.device = device if device is not None else default_device(address.backend)
        where = f"weight-sync store {address.host}:{address.port} (rank {rank})"
        self._store: SealedStore | None = SealedStore(store, address.secret, where, address.timeout)
        self._backend: C10dBackend | None = None
        # Works in flight, by ticket. Only the group holds them: a live gloo work keeps
        # its connections open, and ``close`` must be able to hang up on the peers.
        self._works: dict[int, dist.Work] = {}
        self._tickets = itertools.count()

    @classmethod
    def host(
        cls,
        world_size: int,
        backend: Backend,
        timeout_s: float,
        host: str = "127.0.0.1",
        device: torch.device | None = None,
    ) -> SyncGroup:
        """Start the store on a free port of ``host`` (the address receivers will dial), listening there only."""
        if world_size < 2:
            raise WeightSyncError(
                f"a weight-sync group needs a sender and at least one receiver; world_size={world_size}"
            )
        timeout = timedelta(seconds=timeout_s)
        store = _store_on(host, timeout)
        address = GroupAddress(host, store.port, world_size, backend, timeout_s, secrets.token_bytes(32))
        return cls(store, 0, address, device)

    def connect(self, member_names: dict[int, str]) -> None:
        """Rank 0: wait for every receiver's member key, sealed with the secret, then admit them and connect.

        ``member_names`` maps rank -> a human name used in errors ("rollout-1 rank 2").
        Raises ``WeightSyncError`` naming the ranks that did not join within the time-out.
        A member key without the secret is refused (logged) and the wait goes on.
        """
        deadline = time.monotonic() + self.address.timeout_s
        missing = list(range(1, self.address.world_size))
        while True:
            missing = [r for r in missing if self._store.peek(_member_key(r)) is None]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        if missing:
            names = ", ".join(member_names.get(r, f"rank {r}") for r in missing)
            raise WeightSyncError(
                f"weight-sync group {self.address.host}:{self.address.port}: {names} did not join "
                f"within {self.address.timeout_s:g}s"
            )
        self._store.set(_ADMITTED, b"1")
        self._connect_backend()

    @classmethod
    def join(cls, address: GroupAddress, rank: int, device: torch.device | None = None) -> SyncGroup:
        """Ranks 1..: dial the host's store, announce this rank, connect the backend once the host
        admits (blocks until all have). With a wrong secret the admission never opens: the join
        fails at the time-out."""
        if not 1 <= rank < address.world_size:
            raise WeightSyncError(f"receiver rank {rank} is outside 1..{address.world_size - 1}")
        try:
            store = dist.TCPStore(address.host, address.port, None, False, address.timeout)
        except RuntimeError as err:  # gloo, NCCL and the store all raise RuntimeError subclasses
            raise WeightSyncError(
                f"rank {rank}: cannot reach the weight-sync store at {address.host}:{address.port}: {first_line(err)}"
            ) from err
        group = cls(store, rank, address, device)
        group._store.set(_member_key(rank), b"1")
        group._connect_backend()
        return group

    def _connect_backend(self) -> None:
        try:
            if self.rank > 0:
                self._store.get(_ADMITTED)
            self._backend = _new_backend(self._store, self.rank, self.address, self.device)
        except RuntimeError as err:
            raise WeightSyncError(
                f"rank {self.rank}: connecting the weight-sync group {self.address.host}:{self.address.port} "
                f"failed: {first_line(err)}"
            ) from err

    def broadcast(self, buffer: torch.Tensor) -> int:
        """Start broadcasting ``buffer`` from rank 0 into every other rank's ``buffer``.

        Returns a ticket for ``wait``.
        """
        if self._backend is None:
            raise WeightSyncError(f"rank {self.rank}: the weight-sync group is closed or was never connected")
        options = BroadcastOptions()
        options.rootRank = 0
        ticket = next(self._tickets)
        self._works[ticket] = self._backend.broadcast([buffer], options)
        return ticket

    def wait(self, ticket: int, what: str) -> None:
        """Block until broadcast ``ticket`` is done, at most the group's time-out.

        Raises ``WeightSyncError`` naming this rank and ``what``.
        """
        error = self._wait(ticket)
        if error is not None:
            raise WeightSyncError(f"rank {self.rank}: {what} failed: {error}")

    def _wait(self, ticket: int) -> str | None:
        # Returns the error instead of raising it, so that no traceback keeps this
        # frame, and with it the work and its connections, alive.
        work = self._works.pop(ticket, None)
        if work is None:
            return "the group was closed"
        try:
            work.wait(self.address.timeout)
        except RuntimeError as err:
            return first_line(err)
        return None

    def close(self) -> None:
        """Tear the group down; peers still inside a collective with this rank get an error at once."""
        self._works.clear()
        backend, self._backend = self._backend, None
        if backend is not None:
            if self.address.backend == "nccl":
                backend.abort()  # never blocks; shutdown would wait on kernels stuck after a failure
            else:
                backend.shutdown()
        self._store = None
