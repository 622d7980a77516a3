"""The plan of one weight update: which tensors go in which flat bucket, at which byte offset.

Pure functions, no process group: the sender builds a ``SyncPlan`` from the tensors'
names, shapes and dtypes, every receiver gets the same plan, and both sides cut the
same typed views out of a bucket's flat ``uint8`` buffer with ``slot_view``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mapo_ray.sync.errors import WeightSyncError

# Every tensor starts at a multiple of this many bytes inside its bucket, so that a
# byte view can be reinterpreted as any dtype (the largest itemsize is 16) and copies
# start on cache-line and GPU-transaction boundaries.
ALIGN_BYTES = 256


@dataclass(frozen=True)
class TensorSpec:
    """Name, full shape and dtype of one tensor; ``dtype`` is the torch name, e.g. ``"bfloat16"``."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside its bucket: ``offset`` is in bytes."""

    spec: TensorSpec
    offset: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer of ``nbytes`` bytes holding ``slots`` in order."""

    nbytes: int
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class SyncPlan:
    """The one metadata message of weight update ``version``: its buckets in send order."""

    version: int
    buckets: tuple[Bucket, ...]

    @property
    def num_tensors(self) -> int:
        return sum(len(b.slots) for b in self.buckets)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire, alignment padding included."""
        return sum(b.nbytes for b in self.buckets)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; raises ``WeightSyncError`` for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown tensor dtype {name!r} in weight-sync plan")
    return dtype


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype))


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int, version: int) -> SyncPlan:
    """Pack ``specs``, in order, greedily into buckets of at most ``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own (tensors are never
    split), so the largest bucket is ``max(bucket_bytes, largest tensor)``.
    Raises ``WeightSyncError`` on a repeated name.
    """
    if bucket_bytes <= 0:
        raise WeightSyncError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise WeightSyncError(f"tensor {spec.name!r} appears twice in one weight update")
        seen.add(spec.name)
        start = -(-end // ALIGN_BYTES) * ALIGN_BYTES
        if slots and start + spec.nbytes > bucket_bytes:
            buckets.append(Bucket(end, tuple(slots)))
            slots, start = [], 0
        slots.append(Slot(spec, start))
        end = start + spec.nbytes
    if slots:
        buckets.append(Bucket(end, tuple(slots)))
    return SyncPlan(version, tuple(buckets))


def slot_view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The tensor of ``slot`` as a view into a bucket's flat buffer.

    Args:
        buffer: ``(bucket.nbytes,)`` uint8, contiguous.
    Returns:
        ``slot.spec.shape`` tensor of ``slot.spec.dtype`` sharing ``buffer``'s memory.
    """
    spec = slot.spec
    return buffer[slot.offset : slot.offset + spec.nbytes].view(spec.torch_dtype).view(spec.shape)


def check_slot(slot: Slot, name: str, tensor: torch.Tensor, index: int) -> None:
    """Raise ``WeightSyncError`` unless ``(name, tensor)`` is what the plan expects at ``index``."""
    got = tensor_spec(name, tensor)
    if got != slot.spec:
        raise WeightSyncError(
            f"weight update tensor #{index}: the plan expects {slot.spec.name!r} "
            f"{list(slot.spec.shape)} {slot.spec.dtype}, the weights gave {name!r} {list(got.shape)} {got.dtype}"
        )
