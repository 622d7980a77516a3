"""The rollout side: receive an update's buckets and hand the tensors to an engine.

No Ray here, so the same class runs inside a plain Ray rollout actor (HF engine, one
rank) and inside each vLLM worker process (one rank per tensor-parallel worker,
called through a worker extension and ``collective_rpc``).

The ``load_weights`` contract an engine must meet::

    load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> object

- names are the learner's ``named_parameters()`` names; shapes and dtypes are the
  learner's (an engine casts or reshards as it loads, e.g. vLLM's weight loaders);
- tensors are on the group's device (CPU for gloo, the worker's GPU for NCCL) and
  are views into a per-bucket receive buffer that is never reused, so keeping one
  is safe, but an engine should copy and drop them to keep memory at one bucket;
- it must consume the iterable to the end: the next bucket only arrives as the
  iteration advances, and a loader that stops early fails the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from mapo_ray.sync.errors import WeightSyncError
from mapo_ray.sync.group import GroupAddress, SyncGroup
from mapo_ray.sync.plan import Bucket, SyncPlan, slot_view

LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], object]


class WeightReceiver:
    """One receiving rank of a weight-sync group; ``version`` is the last update it loaded in full."""

    def __init__(self, group: SyncGroup) -> None:
        self._group = group
        # None until a first update is loaded in full, and again after a failed one:
        # a half-loaded model is no version at all.
        self.version: int | None = None

    @classmethod
    def join(cls, address: GroupAddress, rank: int, device: torch.device | None = None) -> WeightReceiver:
        """Join the group at ``address`` (with its secret) as ``rank`` (1..world_size-1); blocks until every
        rank has joined."""
        return cls(SyncGroup.join(address, rank, device))

    @property
    def rank(self) -> int:
        return self._group.rank

    def receive(self, plan: SyncPlan, load_weights: LoadWeights) -> int:
        """Receive update ``plan.version`` and feed it to ``load_weights``; returns the version loaded.

        On any failure (a broken group, a loader that raises or stops early) the group
        is closed, so the sender fails at once too, and ``WeightSyncError`` names this rank.
        """
        self.version = None
        taken = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal taken
            for bucket, buffer in self._buckets(plan):
                for slot in bucket.slots:
                    taken += 1
                    yield slot.spec.name, slot_view(buffer, slot)

        where = f"rank {self.rank}: weight update v{plan.version}"
        try:
            try:
                load_weights(weights())
            except WeightSyncError:
                raise
            except Exception as err:
                raise WeightSyncError(f"{where}: load_weights raised {type(err).__name__}: {err}") from err
            if taken < plan.num_tensors:
                raise WeightSyncError(
                    f"{where}: load_weights returned after taking {taken} of {plan.num_tensors} tensors; "
                    "it must consume them all"
                )
        except BaseException:
            self.close()
            raise
        self.version = plan.version
        return plan.version

    def _buckets(self, plan: SyncPlan) -> Iterator[tuple[Bucket, torch.Tensor]]:
        """Yield each bucket with its filled ``(nbytes,)`` uint8 buffer; bucket k+1 is posted before k is yielded."""
        count = len(plan.buckets)

        def post(b: int):
            buffer = torch.empty(plan.buckets[b].nbytes, dtype=torch.uint8, device=self._group.device)
            what = f"weight update v{plan.version}: bucket {b + 1}/{count}"
            return buffer, self._group.broadcast(buffer), what

        pending = post(0) if count else None
        for b in range(count):
            buffer, work, what = pending
            self._group.wait(work, what)
            pending = post(b + 1) if b + 1 < count else None
            yield plan.buckets[b], buffer

    def close(self) -> None:
        self._group.close()
