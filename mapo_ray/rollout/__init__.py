"""Rollout: engines that sample G responses per prompt, and the Ray actors that own them.

The dataclasses that go in and come out (``Prompt``, ``SamplingParams``, ``Sample``,
``Group``) live in ``mapo_ray.types``, shared with the learner and the reward.

- ``sampling``: the sampling distribution and log-probs (shared with the learner), response ends
- ``engine``: the ``RolloutEngine`` protocol, ``make_engine`` and ``sampling_params`` from config
- ``hf_engine`` / ``vllm_engine`` (+ ``vllm_worker``): the two engines
- ``actor``: ``RolloutActor``, ``create_rollout_actors``, ``collect``, ``RolloutError``

This package imports neither Ray nor vLLM: ``mapo_ray.rollout.actor`` needs Ray, and
``VLLMEngine`` imports vLLM when it is built, so the engines also run in the vLLM-only venv.
"""

from mapo_ray.rollout.engine import RolloutEngine, make_engine, sampling_params
from mapo_ray.rollout.hf_engine import HFEngine
from mapo_ray.rollout.sampling import (
    behaviour_logits,
    response_end,
    sampling_logits,
    token_logprobs,
    vllm_logprobs_mode,
)
from mapo_ray.rollout.vllm_engine import VLLMEngine

__all__ = [
    "HFEngine",
    "RolloutEngine",
    "VLLMEngine",
    "make_engine",
    "response_end",
    "behaviour_logits",
    "sampling_logits",
    "sampling_params",
    "token_logprobs",
    "vllm_logprobs_mode",
]
