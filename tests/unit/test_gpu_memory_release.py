"""Releasing GPU memory between phases on a shared GPU, without a GPU: the learner's cache
after each update and warm-start step, and vLLM's sleep tags around a weight sync."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mapo_ray.learner.learner import Learner
from mapo_ray.rollout.vllm_engine import VLLMEngine
from mapo_ray.types import Prompt, SamplingParams


@pytest.mark.parametrize(("device", "calls"), [("cpu", 0), ("cuda", 1)])
def test_the_learner_empties_the_cuda_cache_only_on_cuda(monkeypatch, device, calls):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    Learner.release_cached_memory(SimpleNamespace(device=torch.device(device)))
    assert len(emptied) == calls


class FakeLLM:
    """Records the sleep-mode calls VLLMEngine makes on vllm.LLM."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))

    def collective_rpc(self, method, args=()) -> None:
        self.calls.append(("rpc", method))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate",))
        return []


def _sleeping_engine() -> tuple[VLLMEngine, FakeLLM]:
    engine = VLLMEngine.__new__(VLLMEngine)
    llm = FakeLLM()
    engine._llm, engine._vllm = llm, SimpleNamespace(SamplingParams=lambda **kw: kw)
    engine._sleep_between_rollouts, engine._asleep, engine._weight_version = True, set(), 0
    engine.sleep()
    llm.calls.clear()
    return engine, llm


def test_a_weight_sync_wakes_the_weights_alone_and_generation_the_kv_cache():
    engine, llm = _sleeping_engine()
    engine._update(1, "mapo_receive_weights", b"")
    assert llm.calls == [("wake_up", ("weights",)), ("rpc", "mapo_receive_weights"), ("reset_prefix_cache",)]
    llm.calls.clear()
    engine._update(2, "mapo_receive_weights", b"")  # weights already awake: no second wake
    assert llm.calls[0] == ("rpc", "mapo_receive_weights")
    llm.calls.clear()
    engine.generate([Prompt(uid="p", text="hi")], SamplingParams(n=1, temperature=0.0, max_new_tokens=2))
    assert llm.calls == [("wake_up", ("kv_cache",)), ("generate",), ("sleep", 1)]


def test_sleep_wakes_a_half_awake_engine_first_and_generate_wakes_weights_before_the_cache():
    engine, llm = _sleeping_engine()
    engine.wake_up(["weights"])
    engine.sleep()
    assert llm.calls == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("sleep", 1)]
    llm.calls.clear()
    engine.generate([Prompt(uid="p", text="hi")], SamplingParams(n=1, temperature=0.0, max_new_tokens=2))
    assert llm.calls == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("generate",), ("sleep", 1)]
