"""A real HF rollout engine whose process crashes while it loads chosen weight versions.

For the fault and chaos tests: an actor killed from outside lands wherever it happens
to be, mostly generating, so a crash in the middle of a weight sync needs this. Ray
workers import it by name (``tests.integration.crashing_engine``) as the rollout actors'
``engine_factory``, e.g. ``functools.partial(crashing_engine.make, crashes={2: 1},
marker_dir=...)``. Everything but the crash is ``HFEngine``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mapo_ray.config import RolloutConfig
from mapo_ray.rollout.hf_engine import HFEngine


class CrashingHFEngine(HFEngine):
    """``HFEngine`` that exits at once (``os._exit``, as a segfault would) part-way through
    loading version v, when ``crashes[v]`` is its seed; once per version, so that the
    process Ray restarts loads it."""

    def __init__(
        self, cfg: RolloutConfig, model_path: str, seed: int, crashes: Mapping[int, int], marker_dir: str
    ) -> None:
        super().__init__(model_path, device=cfg.device, dtype=None if cfg.dtype == "auto" else getattr(torch, cfg.dtype))
        self._seed, self._crashes, self._markers = seed, dict(crashes), Path(marker_dir)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self._crashes.get(version) == self._seed and self._first_crash(version):
            for i, _ in enumerate(weights):
                if i == 1:  # a tensor in: the update is half-loaded when the process goes
                    os._exit(1)
        super().load_weights(weights, version)

    def _first_crash(self, version: int) -> bool:
        """True once per version (a marker file, created atomically, outlives the process)."""
        self._markers.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self._markers / f"crashed-v{version}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True


def make(cfg: RolloutConfig, model_path: str, seed: int, *, crashes: Mapping[int, int], marker_dir: str) -> HFEngine:
    """An ``EngineFactory``: ``crashes`` maps a weight version to the seed of the actor that crashes loading it."""
    return CrashingHFEngine(cfg, model_path, seed, crashes, marker_dir)


def crashed_versions(marker_dir: str | os.PathLike) -> list[int]:
    """The versions whose crash happened, from the markers."""
    return sorted(int(p.name.removeprefix("crashed-v")) for p in Path(marker_dir).glob("crashed-v*"))
