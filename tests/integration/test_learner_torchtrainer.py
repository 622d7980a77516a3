"""The learner inside Ray Train: a ``TorchTrainer`` with two CPU workers under ZeRO-2 and ZeRO-3.

The rollout batch is real (the tiny Qwen2.5-VL sampled by ``HFEngine`` in the driver)
and travels to the workers in ``train_loop_config``, as the loop's actor handles will.
Each worker computes advantages over the whole batch, trains on its shard of whole
groups, and writes its final weights; the driver checks that both ranks agree and that
the first step's gradient is the one a single plain-HF process computes on the whole batch.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mapo_ray.algo import compute_advantages, compute_policy_loss, expand_to_tokens
from mapo_ray.config import Config, from_dict, load_config, to_dict
from mapo_ray.learner import Experience, shard_by_group
from mapo_ray.models import tiny_vl_path
from mapo_ray.rollout import HFEngine
from mapo_ray.types import Prompt, SamplingParams

pytestmark = pytest.mark.integration

# Ray workers cannot import a pytest module by name, so the loop below travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TEMPERATURE = 1.0
UPDATES = 2


def train_loop_per_worker(loop_config: dict) -> dict[str, float]:
    import ray.train

    from mapo_ray.learner import Learner

    config = from_dict(Config, loop_config["config"])
    batch: list[Experience] = loop_config["batch"]
    learner = Learner(config, loop_config["model_path"])
    assert (learner.rank, learner.world_size) == (ray.train.get_context().get_world_rank(), 2)
    mine = shard_by_group([e.group_id for e in batch], [e.num_tokens for e in batch], learner.world_size)[learner.rank]
    metrics = {}
    for update in range(UPDATES):
        advantages = learner.advantages(batch)
        step_metrics = learner.update([batch[i] for i in mine], advantages[mine])
        ray.train.report(step_metrics)
        metrics.update({f"update{update}/{name}": value for name, value in step_metrics.items()})
    weights = {name: tensor.clone() for name, tensor in learner.named_parameters_for_sync()}
    out = Path(loop_config["out"]) / f"rank{learner.rank}.pt"
    torch.save({"weights": weights, "metrics": metrics, "shard_size": len(mine)}, out)
    return metrics  # Ray Train V2 hands rank 0's return value to the driver


def _rollout_batch(config: Config) -> list[Experience]:
    """Three prompts (one without image) x two samples, with rewards that give every group a spread."""
    path = tiny_vl_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(1)

    def prompt(uid: str, question: str, sizes: list[tuple[int, int]]) -> Prompt:
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = tuple(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes)
        return Prompt(uid=uid, text=text, images=images)

    prompts = [prompt("a", "Find x.", [(56, 84)]), prompt("b", "How many cubes?", [(84, 56)]), prompt("c", "3+4?", [])]
    params = SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=config.rollout.max_new_tokens, seed=5)
    groups = HFEngine(path).generate(prompts, params)
    return [
        Experience.from_sample(sample, group_id=g, reward=[0.2, 1.0][s], success=None, images=prompts[g].images)
        for g, group in enumerate(groups)
        for s, sample in enumerate(group.samples)
    ]


def _reference_grad_norm(config: Config, batch: list[Experience], advantages: torch.Tensor) -> float:
    """Gradient norm of the first update's loss over the whole batch, by plain HF forwards in one process."""
    path = tiny_vl_path()
    model = AutoModelForImageTextToText.from_pretrained(path).train()
    image_processor = AutoImageProcessor.from_pretrained(path)
    width = max(len(e.response_ids) for e in batch)
    rows = []
    for exp in batch:
        ids = torch.tensor([exp.prompt_ids + exp.response_ids])
        kwargs = {}
        if exp.images:
            kwargs = dict(image_processor(images=list(exp.images), return_tensors="pt"))
            kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        logits = model(input_ids=ids, **kwargs).logits[0, len(exp.prompt_ids) - 1 : -1] / TEMPERATURE
        log_probs = logits.log_softmax(-1).gather(-1, torch.tensor(exp.response_ids)[:, None]).squeeze(-1)
        rows.append(torch.nn.functional.pad(log_probs, (0, width - len(exp.response_ids))))
    log_probs = torch.stack(rows)
    mask = torch.stack([torch.arange(width) < len(e.response_ids) for e in batch])
    # At the first step the old and reference policies are the current one.
    loss, _ = compute_policy_loss(
        config.algo,
        log_probs,
        log_probs.detach(),
        expand_to_tokens(advantages, mask),
        mask,
        log_probs.detach(),
        norm_length=config.rollout.max_new_tokens,
    )
    loss.backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


# ZeRO-3 with log-prob chunks of 5 tokens: each rank gathers the sharded LM head for every chunk.
@pytest.mark.parametrize("stage, chunk", [(2, 512), (3, 5)])
def test_two_workers_train_in_step(ray_cluster, tmp_path, stage, chunk):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = load_config(
        overrides=[
            f"learner.zero_stage={stage}",
            f"learner.logprob_chunk_tokens={chunk}",
            "learner.lr=1e-3",
            "learner.updates_per_step=1",
            # Below any sample: one micro-batch each, so the ranks (2 and 4 samples) must
            # agree on a count and the smaller shard runs zero-weight padding passes.
            "learner.micro_batch_tokens=1",
            "algo.kl_coef=0.01",
            f"rollout.temperature={TEMPERATURE}",
            "rollout.max_new_tokens=8",
        ]
    )
    batch = _rollout_batch(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "model_path": str(tiny_vl_path()),
            "batch": batch,
            "out": str(tmp_path),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="learner"),
    )
    result = trainer.fit()
    assert result.error is None

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert sorted(r["shard_size"] for r in ranks) == [2, 4]
    # Metrics are reduced over the ranks, so they are equal on both.
    metrics = result.return_value
    assert metrics == ranks[0]["metrics"] == ranks[1]["metrics"]
    assert len(metrics) == UPDATES * 9 and all(math.isfinite(v) for v in metrics.values())

    initial = dict(AutoModelForImageTextToText.from_pretrained(tiny_vl_path()).named_parameters())
    weights = [r["weights"] for r in ranks]
    assert weights[0].keys() == weights[1].keys() == initial.keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in initial)
    assert any(not torch.equal(weights[0][n], initial[n].detach()) for n in initial)

    # The first step's gradient is that of the loss over the whole batch: each rank's
    # share of the global token count, times the world size that DeepSpeed averages over.
    advantages = compute_advantages(
        torch.tensor([e.reward for e in batch], dtype=torch.float64),
        torch.tensor([e.group_id for e in batch]),
        config.algo.estimator,
    )
    expected = _reference_grad_norm(config, batch, advantages)
    assert metrics["update0/actor/grad_norm"] == pytest.approx(expected, rel=1e-4)
