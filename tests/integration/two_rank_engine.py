"""A test double: an HF rollout engine that holds two ranks of the weight-sync group.

Why it exists: a vLLM engine with ``tensor_parallel_size=2`` holds two sync ranks (one
per worker process, ``mapo_ray.rollout.vllm_worker``), but vLLM tensor parallelism
cannot run on this project's CPU-only test machines. This double lets the CPU suite
check the multi-rank side of ``RayWeightSync.connect(actors, ranks_per_actor)`` (rank
layout, group size, both ranks receiving every update) over gloo. It does not test
vLLM's sharded weight loaders: the real two-rank path (``VLLMEngine`` with
``tensor_parallel_size=2``, ``WeightSyncExtension`` in each worker) needs two GPUs, and
the vLLM tests (``tests/integration/test_vllm_engine.py``, ``tests/gpu/``) run it with
one worker, one rank.

``TwoRankHFEngine`` wraps a real ``HFEngine`` (rank ``first_rank``, loading into the HF
model exactly as ``HFEngine`` does) and adds a second receiving rank that loads into a
"shadow" copy of the weights, as a second tensor-parallel worker would load its own
copy. Both ranks join and receive concurrently, in two threads of this one process
(each join blocks until every rank of the group has joined). An update counts only
when both ranks loaded the same version and the shadow equals the model for every
received name.

``two_rank_engine(cfg, model_path, seed)`` builds one; it has the signature of the
rollout actors' ``engine_factory`` and is imported by name
(``tests.integration.two_rank_engine``) in Ray workers, which start in the repo root.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from mapo_ray.rollout.hf_engine import HFEngine
from mapo_ray.types import Group, Prompt, SamplingParams
from mapo_ray.sync import GroupAddress, SyncPlan, WeightReceiver, WeightSyncError

if TYPE_CHECKING:
    from mapo_ray.config import RolloutConfig

T = TypeVar("T")


def _in_thread(fn: Callable[[], T], name: str) -> Callable[[], T]:
    """Start ``fn`` in a thread now; the returned callable joins it and returns or raises its result."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the joining thread
            box["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def join() -> T:
        thread.join()  # bounded: every wait inside has the group's time-out
        if "error" in box:
            raise box["error"]
        return box["value"]

    return join


def _call(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """``fn()``'s result and None, or None and what it raised."""
    try:
        return fn(), None
    except BaseException as err:
        return None, err


class TwoRankHFEngine:
    """An ``HFEngine`` plus a shadow weight copy: two sync ranks, like vLLM with tensor_parallel_size=2."""

    sync_ranks = 2

    def __init__(
        self, model_path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.inner = HFEngine(model_path, device=device, dtype=dtype)
        # The shadow keeps the model's aliasing: a tied lm_head is the embedding's tensor there too.
        clones: dict[int, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        for name, tensor in self.inner.model.state_dict().items():
            key = tensor.data_ptr()
            if key not in clones:
                clones[key] = tensor.detach().clone()
            self.shadow[name] = clones[key]
        self._shadow_receiver: WeightReceiver | None = None
        self._version: int | None = self.inner.weight_version

    @property
    def weight_version(self) -> int | None:
        """The version both ranks loaded; None while an update is incomplete or the ranks disagree."""
        return self._version if self.inner.weight_version == self._version else None

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        if self.weight_version is None:
            raise RuntimeError("the last weight update failed on one rank or both; a full update must load first")
        return self.inner.generate(prompts, params)

    @torch.no_grad()
    def _load_shadow(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy each pair into the shadow (the second rank's loader); returns the names loaded."""
        names = []
        for name, tensor in weights:
            target = self.shadow.get(name)
            if target is None:
                raise ValueError(f"shadow rank: the model has no parameter or buffer {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"shadow rank: {name!r} has shape {list(target.shape)}, the update gives {list(tensor.shape)}"
                )
            target.copy_(tensor)
            names.append(name)
        return names

    def _check(self, version: int, versions: tuple[int | None, int | None], names: Iterable[str]) -> None:
        """Raise unless both ranks loaded ``version`` and the shadow equals the model for ``names``."""
        if versions[0] != versions[1] or versions[0] != version:
            raise WeightSyncError(
                f"weight update v{version}: the two ranks loaded versions {versions[0]} and {versions[1]}"
            )
        differ = self.shadow_mismatches(names)
        if differ:
            raise WeightSyncError(
                f"weight update v{version}: the shadow rank's copy differs from the model in {len(differ)} "
                f"tensor(s), first {differ[0]!r}"
            )
        self._version = version

    def shadow_mismatches(self, names: Iterable[str] | None = None) -> list[str]:
        """The names (default: all) whose shadow tensor is not bit-for-bit the model's."""
        model = self.inner.model.state_dict()
        return [n for n in (self.shadow if names is None else names) if not torch.equal(self.shadow[n], model[n])]

    def shadow_matches(self) -> bool:
        """Whether the shadow rank's copy equals the HF model's weights, every tensor bit for bit."""
        return not self.shadow_mismatches()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load the same pairs on both "ranks" (no group involved)."""
        self._version = None
        weights = list(weights)
        self.inner.load_weights(weights, version)
        names = self._load_shadow(weights)
        self._check(version, (self.inner.weight_version, version), names)

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        """Join as ranks ``first_rank`` (the HF model) and ``first_rank + 1`` (the shadow), concurrently.

        Refuses at once, before joining either, when the two ranks do not fit in the
        group: a group sized for one rank per actor must not hang this engine.
        """
        last = first_rank + self.sync_ranks - 1
        if first_rank < 1 or last >= address.world_size:
            raise WeightSyncError(
                f"this engine holds {self.sync_ranks} ranks, {first_rank}..{last}, but the group at "
                f"{address.host}:{address.port} has ranks 1..{address.world_size - 1} for receivers; "
                f"connect with ranks_per_actor={self.sync_ranks}"
            )
        if self._shadow_receiver is not None:
            self._shadow_receiver.close()  # a group is rebuilt after a failure; leave the old one first
            self._shadow_receiver = None
        shadow = _in_thread(lambda: WeightReceiver.join(address, first_rank + 1), "join-shadow-rank")
        first_error = _call(lambda: self.inner.join_weight_sync(address, first_rank))[1]
        self._shadow_receiver, second_error = _call(shadow)
        if first_error is not None or second_error is not None:
            if self._shadow_receiver is not None:
                self._shadow_receiver.close()
                self._shadow_receiver = None
            raise first_error or second_error

    def receive_weights(self, plan: SyncPlan) -> int:
        """Receive ``plan`` on both ranks concurrently; returns its version once both agree."""
        if self._shadow_receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        self._version = None
        loaded: list[str] = []
        receiver = self._shadow_receiver
        shadow = _in_thread(
            lambda: receiver.receive(plan, lambda weights: loaded.extend(self._load_shadow(weights))), "shadow-rank"
        )
        first, first_error = _call(lambda: self.inner.receive_weights(plan))
        # On a failure of either rank the group is closed, so the other fails too (within the time-out).
        second, second_error = _call(shadow)
        if first_error is not None or second_error is not None:
            raise first_error or second_error
        self._check(plan.version, (first, second), loaded)
        return plan.version


def two_rank_engine(cfg: RolloutConfig, model_path: str | os.PathLike, seed: int) -> TwoRankHFEngine:
    """An ``engine_factory`` for rollout actors: a ``TwoRankHFEngine`` on ``cfg.device`` in ``cfg.dtype``.

    ``seed`` is unused, as by ``make_engine`` for the HF engine (its sampling takes the seed per call).
    """
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return TwoRankHFEngine(model_path, device=cfg.device, dtype=dtype)
