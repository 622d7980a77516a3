"""The learner: the policy under DeepSpeed, log-prob recomputation and the PPO/MAPO update.

- ``experience``: ``Experience`` (one scored response) and how a rollout batch is split
  across ranks, into mini-batches and into token-budget micro-batches (pure)
- ``collate``: images and token lists to padded model inputs (pure torch)
- ``logprobs``: ``ResponseLogProbs``, the forward that gives response log-probs and entropy
- ``deepspeed_setup``: process group, DeepSpeed config, model loading, engines, lr schedule
- ``learner``: ``Learner``, the per-rank state holder used inside a Ray Train worker
"""

import os

import torch

# DeepSpeed picks its accelerator when imported and warns when it falls back to the CPU; where
# torch sees no GPU, name the CPU first (a DS_ACCELERATOR already set is kept).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mapo_ray.learner.collate import PolicyInputs, VisionInput, collate, encode_images
from mapo_ray.learner.deepspeed_setup import deepspeed_config, init_single_process, lr_factor
from mapo_ray.learner.experience import (
    Experience,
    shard_by_group,
    split_minibatches,
    token_budget_micro_batches,
)
from mapo_ray.learner.learner import Learner, batch_advantages
from mapo_ray.learner.logprobs import ResponseLogProbs

__all__ = [
    "Experience",
    "Learner",
    "PolicyInputs",
    "ResponseLogProbs",
    "VisionInput",
    "batch_advantages",
    "collate",
    "deepspeed_config",
    "encode_images",
    "init_single_process",
    "lr_factor",
    "shard_by_group",
    "split_minibatches",
    "token_budget_micro_batches",
]
