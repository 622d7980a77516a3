"""A test double of a rollout engine, for the coordinator's tests (``test_coordinator.py``).

It answers from a script instead of a model, so a test of the coordinator runs in
seconds; the real engines are tested in ``tests/integration``. Ray workers import it by
name (``tests.integration.scripted_engine``), as the rollout actors' ``engine_factory``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from mapo_ray.sync import GroupAddress, SyncPlan, WeightReceiver
from mapo_ray.types import Group, Prompt, Sample, SamplingParams


class ScriptedEngine:
    """A test double of a rollout engine: answers from a script, without a model.

    A prompt whose uid hashes to 0 (mod 3) is always answered right, 1 always wrong, 2
    right on the even samples: so some groups are uninformative for DAPO's filter. Each
    sample carries the weight version last received; updates arrive over a real
    weight-sync group (``WeightReceiver``) and are counted, not loaded.
    """

    sync_ranks = 1

    def __init__(self, cfg, model_path: str, seed: int) -> None:
        self._version: int | None = 0
        self._receiver: WeightReceiver | None = None

    @property
    def weight_version(self) -> int | None:
        return self._version

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        groups = []
        for prompt in prompts:
            kind = zlib.crc32(prompt.uid.encode()) % 3
            samples = []
            for i in range(params.n):
                right = kind == 0 or (kind == 2 and i % 2 == 0)
                text = f"<think>look</think> \\boxed{{{prompt.answer if right else 'nothing'}}}"
                n = 3 + i
                ids = [5] * (8 + len(prompt.images))
                samples.append(Sample(prompt.uid, ids, [7] * n, [-0.25] * n, text, "stop", self._version))
            groups.append(Group(prompt.uid, prompt.answer, samples))
        return groups

    def load_weights(self, weights, version: int) -> None:
        for _ in weights:
            pass
        self._version = version

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        self._receiver = WeightReceiver.join(address, first_rank, torch.device("cpu"))

    def receive_weights(self, plan: SyncPlan) -> int:
        assert self._receiver is not None
        return self._receiver.receive(plan, lambda weights: self.load_weights(weights, plan.version))


def scripted_engine(cfg, model_path: str, seed: int) -> ScriptedEngine:
    """The rollout actors' ``engine_factory`` for ``ScriptedEngine``."""
    return ScriptedEngine(cfg, model_path, seed)
