"""Bucket planning and the typed views cut from a bucket's flat bytes (no process group)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapo_ray.sync import TensorSpec, WeightSyncError, plan_buckets, slot_view, tensor_spec
from mapo_ray.sync.plan import ALIGN_BYTES, check_slot, dtype_from_name

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]


def _random_tensor(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    # Random bytes, so NaN payloads, -0.0 and subnormals all occur and must survive.
    n = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).view(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _pack(plan, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    buffers = []
    for bucket in plan.buckets:
        buffer = torch.zeros(bucket.nbytes, dtype=torch.uint8)
        for slot in bucket.slots:
            slot_view(buffer, slot).copy_(tensors[slot.spec.name])
        buffers.append(buffer)
    return buffers


def test_greedy_buckets_keep_order_alignment_and_limit():
    specs = [TensorSpec(f"t{i}", (100,), "float32") for i in range(10)]  # 400 bytes each
    plan = plan_buckets(specs, bucket_bytes=1024, version=3)
    assert plan.version == 3
    # 400 -> aligned 512 + 400 = 912 fits; a third would start at 1024 and end past it.
    assert [len(b.slots) for b in plan.buckets] == [2, 2, 2, 2, 2]
    assert [s.offset for s in plan.buckets[0].slots] == [0, 512]
    assert plan.buckets[0].nbytes == 912
    assert [s.spec.name for b in plan.buckets for s in b.slots] == [s.name for s in specs]
    assert plan.num_tensors == 10 and plan.nbytes == 5 * 912


def test_oversized_tensor_gets_its_own_bucket():
    specs = [
        TensorSpec("small", (4,), "float32"),
        TensorSpec("big", (1000,), "float32"),
        TensorSpec("tail", (2,), "int64"),
    ]
    plan = plan_buckets(specs, bucket_bytes=512, version=1)
    assert [[s.spec.name for s in b.slots] for b in plan.buckets] == [["small"], ["big"], ["tail"]]
    assert plan.buckets[1].nbytes == 4000


def test_empty_update_has_no_buckets():
    plan = plan_buckets([], bucket_bytes=1024, version=1)
    assert plan.buckets == () and plan.num_tensors == 0


@pytest.mark.parametrize(
    ("specs", "bucket_bytes", "message"),
    [
        ([TensorSpec("a", (1,), "float32")], 0, r"bucket_bytes must be positive, got 0"),
        ([TensorSpec("a", (1,), "float32"), TensorSpec("a", (2,), "float32")], 64, r"tensor 'a' appears twice"),
        ([TensorSpec("a", (1,), "float33")], 64, r"unknown tensor dtype 'float33'"),
        ([TensorSpec("a", (1,), "Tensor")], 64, r"unknown tensor dtype 'Tensor'"),
    ],
)
def test_bad_plans_are_named(specs, bucket_bytes, message):
    with pytest.raises(WeightSyncError, match=message):
        plan_buckets(specs, bucket_bytes, version=1)


def test_check_slot_names_expected_and_given():
    plan = plan_buckets([TensorSpec("w", (2, 3), "bfloat16")], 1024, version=1)
    slot = plan.buckets[0].slots[0]
    check_slot(slot, "w", torch.zeros(2, 3, dtype=torch.bfloat16), 0)
    expected = r"#0: the plan expects 'w' \[2, 3\] bfloat16, the weights gave 'w' \[3, 2\] bfloat16"
    with pytest.raises(WeightSyncError, match=expected):
        check_slot(slot, "w", torch.zeros(3, 2, dtype=torch.bfloat16), 0)
    with pytest.raises(WeightSyncError, match=r"gave 'v' \[2, 3\] float32"):
        check_slot(slot, "v", torch.zeros(2, 3), 0)


def test_dtype_names_round_trip():
    for dtype in DTYPES:
        assert dtype_from_name(tensor_spec("x", torch.zeros(1, dtype=dtype)).dtype) is dtype


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=12),
    dtype_ids=st.lists(st.integers(0, len(DTYPES) - 1), min_size=12, max_size=12),
    bucket_bytes=st.integers(1, 2048),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_and_unpack_is_bit_exact(shapes, dtype_ids, bucket_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"p{i}": _random_tensor(tuple(shape), DTYPES[dtype_ids[i]], g) for i, shape in enumerate(shapes)
    }
    plan = plan_buckets([tensor_spec(n, t) for n, t in tensors.items()], bucket_bytes, version=1)
    for bucket in plan.buckets:
        ends = 0
        for slot in bucket.slots:
            assert slot.offset % ALIGN_BYTES == 0 and slot.offset >= ends  # aligned, no overlap
            ends = slot.offset + slot.spec.nbytes
        assert ends == bucket.nbytes
        assert bucket.nbytes <= bucket_bytes or len(bucket.slots) == 1
    # Both ends cut their views from identical bytes: what the receiver reads is what was packed.
    buffers = [b.clone() for b in _pack(plan, tensors)]
    received = {
        slot.spec.name: slot_view(buffer, slot)
        for bucket, buffer in zip(plan.buckets, buffers)
        for slot in bucket.slots
    }
    assert list(received) == list(tensors)
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
        assert _bits(received[name]) == _bits(tensor), name


def test_views_accept_non_contiguous_sources():
    source = torch.arange(12, dtype=torch.float32).view(3, 4).t()  # transposed: not contiguous
    plan = plan_buckets([tensor_spec("t", source)], 4096, version=1)
    (buffer,) = _pack(plan, {"t": source})
    assert torch.equal(slot_view(buffer, plan.buckets[0].slots[0]), source)
