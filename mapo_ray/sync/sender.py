"""The learner rank 0 side: pack named tensors into buckets and broadcast them.

No Ray here. ``RayWeightSync`` (``mapo_ray.sync.ray_sync``) drives it from inside a
Ray Train worker; anything else that can deliver the plan to the receivers can too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from mapo_ray.sync.errors import WeightSyncError
from mapo_ray.sync.group import Backend, GroupAddress, SyncGroup
from mapo_ray.sync.plan import SyncPlan, TensorSpec, check_slot, plan_buckets, slot_view


class WeightSender:
    """Rank 0 of a weight-sync group of ``world_size`` ranks.

    Usage: construct (starts the rendezvous store), send ``address`` to the receivers
    over an authenticated channel (it carries the group's secret; ``RayWeightSync``
    uses a Ray actor call) and have them ``WeightReceiver.join`` it, call ``connect``; then per update
    ``plan = sender.plan(specs)``, give ``plan`` to every receiver, ``sender.send(plan, tensors)``.
    """

    def __init__(
        self,
        world_size: int,
        bucket_bytes: int,
        *,
        backend: Backend = "gloo",
        timeout_s: float = 300.0,
        host: str = "127.0.0.1",
        device: torch.device | None = None,
        version: int = 0,
    ) -> None:
        self.bucket_bytes = bucket_bytes
        # The version of the last plan made: 0 is the checkpoint everyone started from;
        # a group rebuilt after a failure passes the old sender's version on.
        self.version = version
        self._group = SyncGroup.host(world_size, backend, timeout_s, host=host, device=device)

    @property
    def address(self) -> GroupAddress:
        return self._group.address

    def connect(self, member_names: dict[int, str] | None = None) -> None:
        """Wait for all receivers to join; ``member_names`` (rank -> name) make errors readable."""
        self._group.connect(member_names or {})

    def plan(self, specs: Iterable[TensorSpec], version: int | None = None) -> SyncPlan:
        """The next update's plan. Each call takes a new, larger version number, unless
        ``version`` names one (weights sent again under the number they already have)."""
        plan = plan_buckets(specs, self.bucket_bytes, self.version + 1 if version is None else version)
        self.version = plan.version
        return plan

    def send(self, plan: SyncPlan, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Broadcast ``named_tensors`` (full tensors, in plan order) bucket by bucket.

        ``named_tensors`` is consumed lazily, one bucket at a time, so a generator may
        gather ZeRO-3 partitions just ahead of packing (``named_parameters_for_sync``).
        Two buffers alternate: bucket k+1 is packed while bucket k is on the wire.
        Any failure closes the group (receivers then fail at once instead of at their
        time-out) and raises ``WeightSyncError``; a new group is needed afterwards.
        """
        device = self._group.device
        stream = iter(named_tensors)
        buffers: list[torch.Tensor | None] = [None, None]
        in_flight: list[tuple[int, str] | None] = [None, None]  # (ticket, what) per buffer
        index = 0
        try:
            for b, bucket in enumerate(plan.buckets):
                side = b % 2
                if in_flight[side] is not None:
                    self._group.wait(*in_flight[side])
                buffer = buffers[side]
                if buffer is None or buffer.numel() < bucket.nbytes:
                    buffer = buffers[side] = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
                flat = buffer[: bucket.nbytes]
                for slot in bucket.slots:
                    item = next(stream, None)
                    if item is None:
                        raise WeightSyncError(
                            f"weight update v{plan.version}: the weights ended after {index} tensors; "
                            f"the plan has {plan.num_tensors} (next: {slot.spec.name!r})"
                        )
                    check_slot(slot, item[0], item[1], index)
                    slot_view(flat, slot).copy_(item[1])
                    index += 1
                if b == len(plan.buckets) - 1:
                    _expect_end(stream, plan)  # before the last broadcast: no receiver completes a bad update
                what = f"weight update v{plan.version}: broadcast of bucket {b + 1}/{len(plan.buckets)}"
                in_flight[side] = (self._group.broadcast(flat), what)
            if not plan.buckets:
                _expect_end(stream, plan)
            for pending in in_flight:
                if pending is not None:
                    self._group.wait(*pending)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._group.close()


def _expect_end(stream: Iterator[tuple[str, torch.Tensor]], plan: SyncPlan) -> None:
    extra = next(stream, None)
    if extra is not None:
        raise WeightSyncError(
            f"weight update v{plan.version}: the weights go on past the plan's {plan.num_tensors} tensors "
            f"(first extra: {extra[0]!r})"
        )
