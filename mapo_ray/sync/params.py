"""What the learner sends: a model's parameters, with ZeRO-3 partitions gathered chunk by chunk.

Under DeepSpeed ZeRO-3 each rank holds a slice of every parameter (``p.ds_id`` is
set, ``p.data`` is empty, ``p.ds_shape`` is the full shape). Gathering is a
collective over the learner's own group, so **every learner rank** must iterate
``named_parameters_for_sync`` with the same arguments, in step: rank 0 feeds it to
the sender, the other ranks drain it. ZeRO stages 0-2 keep full parameters on every
rank, and a plain module has nothing to gather; both are read as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mapo_ray.sync.plan import TensorSpec, dtype_name


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if _is_zero3(param) else tuple(param.shape)


def _selected(model: torch.nn.Module, trainable_only: bool) -> list[tuple[str, torch.nn.Parameter]]:
    # named_parameters() lists a tied weight once, under its first name, on both ends.
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]


def parameter_specs(model: torch.nn.Module, trainable_only: bool = False) -> list[TensorSpec]:
    """Full name, shape and dtype of each parameter to sync, without gathering anything."""
    return [TensorSpec(n, _full_shape(p), dtype_name(p.dtype)) for n, p in _selected(model, trainable_only)]


def named_parameters_for_sync(
    model: torch.nn.Module, gather_bytes: int, trainable_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` in ``parameter_specs`` order.

    ZeRO-3 parameters are gathered in chunks of about ``gather_bytes`` (full size)
    and released when the iteration moves past the chunk, so the caller must copy a
    tensor before asking for the next chunk (``WeightSender.send`` does). Peak extra
    memory is one chunk (or the largest parameter, if bigger).
    """
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in _selected(model, trainable_only):
        nbytes = torch.Size(_full_shape(param)).numel() * param.dtype.itemsize
        if chunk and size + nbytes > gather_bytes:
            yield from _gathered(chunk)
            chunk, size = [], 0
        chunk.append((name, param))
        size += nbytes
    if chunk:
        yield from _gathered(chunk)


def _gathered(chunk: list[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    partitioned = [p for _, p in chunk if _is_zero3(p)]
    if partitioned:
        import deepspeed  # only a ZeRO-3 model needs it, and it is slow to import

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather, torch.no_grad():
        for name, param in chunk:
            yield name, param.detach()
