"""Supervised warm-start (SFT) of the policy before RL: teach the answer format on the train split.

A policy that never writes ``<think>...</think> ... \\boxed{}`` gets reward 0 on every
rollout, and RL then has no signal (every group's advantage is 0). A few hundred
supervised steps on the training prompts, each paired with a reference response
built from its answer (``sft_target``), teach the format and whatever part of the
answers the policy can pick up in that time::

    rank 0:  prompts ─► sft_examples (tokenize) ─► shards ─┐ scatter
    all:     Learner.sft_step (token-mean cross-entropy) ◄─┘  × sft.steps

The loss runs through the RL engine and optimizer (``Learner.sft_step``), so ZeRO
sharding, gradient clipping and checkpoints work unchanged; only the lr is its own.
Examples are ``Experience`` rows (reward and log-probs unused), so the learner's
image encoding, collation and micro-batching apply as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.distributed as dist
from transformers import AutoTokenizer, BaseImageProcessor, PreTrainedTokenizerBase

from mapo_ray.config import SFTConfig
from mapo_ray.learner.experience import Experience, shard_by_group
from mapo_ray.learner.learner import Learner
from mapo_ray.models import prepare_inputs
from mapo_ray.models.tokenizer import THINK_END, THINK_START
from mapo_ray.types import Prompt, pil_image

# Deliberately content-free: the synthetic rows carry no worked solution, and a short
# fixed phrase costs the tiny policy a few tokens to learn, leaving the answer to RL.
REASONING = "I read the figure."


def sft_target(answer: str, reasoning: str = REASONING) -> str:
    """The reference response for ``answer``: ``<think>{reasoning}</think> The answer is \\boxed{answer}.``

    ``mapo_ray.reward.score_math`` gives it full marks (format and accuracy).
    """
    if not answer.strip():
        raise ValueError("sft_target: the answer is empty")
    return f"{THINK_START}{reasoning}{THINK_END} The answer is \\boxed{{{answer.strip()}}}."


def sft_examples(
    prompts: Sequence[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    image_processor: BaseImageProcessor | None,
) -> list[Experience]:
    """One ``Experience`` per prompt whose response is ``sft_target(prompt.answer)`` then eos.

    ``prompt_ids`` are tokenized exactly as the rollout engine does (each image pad
    widened to the image's merged patches), so the learner sees the prompt it will
    later sample from. Example i gets ``group_id`` i; reward and log-probs are 0.

    Raises:
        ValueError: naming the prompt's uid when its answer is empty, or it carries
            images but the model has no image processor.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("sft_examples: the tokenizer has no eos token to end the target with")
    examples = []
    for index, prompt in enumerate(prompts):
        if not prompt.answer.strip():
            raise ValueError(f"sft_examples: prompt {prompt.uid!r} has an empty answer")
        if prompt.images and image_processor is None:
            raise ValueError(f"sft_examples: prompt {prompt.uid!r} carries images, but the model has no vision tower")
        images = [pil_image(im, f"prompt {prompt.uid!r} image {j}") for j, im in enumerate(prompt.images)]
        encoded = prepare_inputs(tokenizer, image_processor, [prompt.text], [images])
        target = tokenizer(sft_target(prompt.answer), add_special_tokens=False)["input_ids"] + [eos]
        examples.append(
            Experience(
                prompt_ids=encoded["input_ids"][0].tolist(),
                response_ids=target,
                response_logprobs=[0.0] * len(target),
                group_id=index,
                reward=0.0,
                success=None,
                weight_version=0,
                images=prompt.images,
            )
        )
    return examples


@dataclass(frozen=True)
class WarmStartResult:
    """What ``warm_start`` did: one metrics dict per step (``sft/loss``, ``sft/tokens``) and its wall time."""

    steps: list[dict[str, float]]
    seconds: float

    def summary(self) -> dict[str, float]:
        """``sft/steps``, ``sft/loss_first``, ``sft/loss_last`` and ``time/sft_s`` (empty without steps)."""
        if not self.steps:
            return {}
        return {
            "sft/steps": float(len(self.steps)),
            "sft/loss_first": self.steps[0]["sft/loss"],
            "sft/loss_last": self.steps[-1]["sft/loss"],
            "time/sft_s": self.seconds,
        }


def warm_start(
    learner: Learner,
    cfg: SFTConfig,
    take: Callable[[int], Sequence[Prompt]] | None,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> WarmStartResult:
    """Run ``cfg.steps`` SFT steps of ``cfg.batch_size`` prompts on every learner rank (collective).

    Args:
        learner: this rank's learner; the warm-start leaves its RL step count and lr
            schedule where they were.
        cfg: the ``sft`` section.
        take: on rank 0, where prompts come from (in a run, ``RolloutCoordinator.take_prompts``);
            None on the other ranks. Rank 0 builds each batch and sends every rank its
            share, whole examples balanced by tokens.
        log: called on rank 0 as ``log(step, metrics)`` after each step (steps from 1).

    Returns:
        The per-step metrics, equal on every rank, and the wall time.

    Raises:
        ValueError: when ``cfg.batch_size`` is below the number of ranks (one would idle).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if cfg.batch_size < world_size:
        raise ValueError(f"sft.batch_size ({cfg.batch_size}) must be at least the {world_size} learner ranks")
    if rank == 0 and take is None:
        raise ValueError("warm_start: rank 0 needs a prompt source (take)")
    tokenizer = AutoTokenizer.from_pretrained(learner.model_path) if rank == 0 else None
    started = time.perf_counter()
    steps = []
    for step in range(1, cfg.steps + 1):
        shards = None
        if rank == 0:
            batch = sft_examples(take(cfg.batch_size), tokenizer, learner.image_processor)
            owners = shard_by_group([e.group_id for e in batch], [e.num_tokens for e in batch], world_size)
            shards = [[batch[i] for i in owned] for owned in owners]
        metrics = learner.sft_step(_scatter(shards), cfg.lr)
        steps.append(metrics)
        if log is not None and rank == 0:
            log(step, metrics)
    return WarmStartResult(steps, time.perf_counter() - started)


def _scatter(shards: list[list[Experience]] | None) -> list[Experience]:
    """This rank's shard of rank 0's ``shards`` (one list per rank; None on the other ranks)."""
    if dist.get_world_size() == 1:
        assert shards is not None
        return shards[0]
    mine: list[list[Experience] | None] = [None]
    dist.scatter_object_list(mine, shards, src=0)
    assert mine[0] is not None
    return mine[0]
