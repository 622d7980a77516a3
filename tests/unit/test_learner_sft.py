"""The supervised warm-start: targets the grader accepts, examples as the rollout engine
tokenizes them, and steps that learn without moving the RL schedule.

Prompts are real synthetic-task rows (PIL drawings through the data package's row
preparation); the learner runs under DeepSpeed on CPU in a world of one, and the last
test runs two ranks in a Ray Train ``TorchTrainer``.
"""

from __future__ import annotations

import math
import sys

import pytest
import ray
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mapo_ray.config import Config, ConfigError, SFTConfig, from_dict, load_config, to_dict
from mapo_ray.data import PixelBudget, prepare_row, render_prompt
from mapo_ray.data.synthetic import KINDS, examples_table
from mapo_ray.learner import Experience, Learner
from mapo_ray.learner.sft import sft_examples, sft_target, warm_start
from mapo_ray.models import tiny_vl_path
from mapo_ray.reward import score_math
from mapo_ray.rollout import HFEngine
from mapo_ray.types import Prompt, SamplingParams

# Ray workers cannot import a pytest module by name, so the two-rank loop travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The cpu-tiny image bounds: each 168 px drawing stays 168 px, 36 merged vision tokens.
BUDGET = PixelBudget(28 * 28 * 4, 28 * 28 * 64, 89_478_485)
FULL_MARKS = {"overall": 1.0, "format": 1.0, "accuracy": 1.0}


@pytest.fixture(scope="module", autouse=True)
def world(single_process_world):
    yield


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_vl_path())


def synthetic_prompts(tokenizer, count: int, split: str = "train") -> list[Prompt]:
    """The first ``count`` rows of the synthetic task as rollout prompts (kinds cycle in ``KINDS`` order)."""
    prompts = []
    for index, row in enumerate(examples_table(0, split, count).to_pylist()):
        text, images, answer = prepare_row(row, render=lambda p: render_prompt(tokenizer, p), budget=BUDGET)
        prompts.append(Prompt(f"{split}#{index}", text, tuple(images), answer))
    return prompts


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[Prompt]:
    return synthetic_prompts(tokenizer, len(KINDS))


def _config(*overrides: str) -> Config:
    base = ["rollout.temperature=1.0", "learner.lr=1e-6", "learner.updates_per_step=1", "algo.kl_coef=0"]
    return load_config(overrides=[*base, *overrides])


def _target_log_prob(learner: Learner, examples: list[Experience]) -> float:
    log_probs, _ = learner.compute_log_probs(examples)
    return float(log_probs.sum())


def _params(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in learner.named_parameters_for_sync()}


# ------------------------------------------------------------------- targets and examples


@pytest.mark.parametrize("kind", KINDS)
def test_the_target_gets_full_marks_for_every_kind(kind, tokenizer):
    rows = [r for r in examples_table(0, "train", len(KINDS) * 8).to_pylist() if r["kind"] == kind]
    assert len(rows) == 8
    for row in rows:
        target = sft_target(row["answer"])
        assert score_math(target, row["answer"]) == FULL_MARKS, target
        # As the rollout engine hands it to the grader: token ids decoded without special tokens.
        decoded = tokenizer.decode(tokenizer(target, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        assert score_math(decoded, row["answer"]) == FULL_MARKS, decoded


def test_a_wrong_answer_in_the_target_scores_format_only():
    assert score_math(sft_target("7"), "8") == {"overall": pytest.approx(0.1), "format": 1.0, "accuracy": 0.0}
    with pytest.raises(ValueError, match="the answer is empty"):
        sft_target("  ")


def test_examples_are_the_prompts_the_rollout_engine_sees(prompts, tokenizer):
    processor = AutoImageProcessor.from_pretrained(tiny_vl_path())
    examples = sft_examples(prompts, tokenizer, processor)
    groups = HFEngine(tiny_vl_path()).generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=1))
    for index, (example, group, prompt) in enumerate(zip(examples, groups, prompts)):
        assert example.prompt_ids == group.samples[0].prompt_ids, prompt.uid
        assert example.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(example.response_ids[:-1]) == sft_target(prompt.answer)
        assert len(example.response_logprobs) == len(example.response_ids)
        assert example.group_id == index and example.images is prompt.images


def test_examples_name_the_prompt_at_fault(prompts, tokenizer):
    processor = AutoImageProcessor.from_pretrained(tiny_vl_path())
    blank = Prompt("train#9", prompts[0].text, prompts[0].images, answer=" ")
    with pytest.raises(ValueError, match="prompt 'train#9' has an empty answer"):
        sft_examples([prompts[0], blank], tokenizer, processor)
    with pytest.raises(ValueError, match="prompt 'train#0' carries images, but the model has no vision tower"):
        sft_examples(prompts[:1], tokenizer, None)


# ------------------------------------------------------------------- steps


@pytest.mark.parametrize("stage", [0, 3])
def test_sft_steps_lower_the_loss_and_leave_the_rl_schedule(stage, prompts, tokenizer):
    learner = Learner(_config(f"learner.zero_stage={stage}", "learner.lr_warmup_steps=4"), tiny_vl_path())
    examples = sft_examples(prompts, tokenizer, learner.image_processor)
    before = _target_log_prob(learner, examples)
    lr, schedule = learner.engine.get_lr(), learner.engine.lr_scheduler.state_dict()

    losses = [learner.sft_step(examples, lr=3e-3)["sft/loss"] for _ in range(4)]

    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert _target_log_prob(learner, examples) > before + 10.0
    # The RL side is where it was: no RL update counted, warm-up not advanced, lr restored.
    assert learner.step == 0
    assert learner.engine.get_lr() == lr == [pytest.approx(1e-6 / 4)]
    assert learner.engine.lr_scheduler.state_dict() == schedule


def test_sft_loss_is_the_token_mean_cross_entropy_at_temperature_one(prompts, tokenizer):
    # Sampling temperature 0.7 must not leak into the loss; one example per micro-batch.
    learner = Learner(_config("rollout.temperature=0.7", "learner.micro_batch_tokens=1"), tiny_vl_path())
    examples = sft_examples(prompts, tokenizer, learner.image_processor)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_path()).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_vl_path())
    nll, tokens = 0.0, 0
    for exp in examples:
        ids = torch.tensor([exp.prompt_ids + exp.response_ids])
        vision = dict(processor(images=list(exp.images), return_tensors="pt"))
        mm_token_type_ids = (ids == model.config.image_token_id).int()
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=mm_token_type_ids, **vision).logits[0]
        log_probs = logits[len(exp.prompt_ids) - 1 : -1].float().log_softmax(-1)
        nll -= float(log_probs.gather(-1, torch.tensor(exp.response_ids)[:, None]).sum())
        tokens += len(exp.response_ids)

    metrics = learner.sft_step(examples, lr=1e-3)

    assert metrics == {"sft/loss": pytest.approx(nll / tokens, rel=1e-5), "sft/tokens": float(tokens)}
    assert learner.engine.module.temperature == 0.7


def test_a_non_finite_loss_stops_before_the_step(prompts, tokenizer):
    learner = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    examples = sft_examples(prompts[:2], tokenizer, learner.image_processor)
    with torch.no_grad():
        learner.policy.model.language_model.norm.weight[0] = float("nan")
    before = _params(learner)
    with pytest.raises(FloatingPointError, match=r"rank 0: non-finite SFT loss in example\(s\) \[0, 1\]"):
        learner.sft_step(examples, lr=1e-3)
    after = _params(learner)
    assert all(torch.equal(before[n], after[n]) for n in before if n != "model.language_model.norm.weight")


def test_warm_start_takes_a_batch_per_step(prompts):
    learner = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    asked, logged = [], []

    def take(n: int) -> list[Prompt]:
        asked.append(n)
        return [prompts[(len(asked) + i) % len(prompts)] for i in range(n)]

    result = warm_start(learner, SFTConfig(steps=3, batch_size=4, lr=1e-3), take, log=lambda s, m: logged.append(s))
    assert asked == [4, 4, 4] and logged == [1, 2, 3]
    assert len(result.steps) == 3 and all(math.isfinite(m["sft/loss"]) for m in result.steps)
    summary = result.summary()
    assert summary["sft/steps"] == 3.0 and summary["time/sft_s"] > 0
    assert summary["sft/loss_first"] == result.steps[0]["sft/loss"]
    assert summary["sft/loss_last"] == result.steps[-1]["sft/loss"]
    assert warm_start(learner, SFTConfig(steps=0), take).summary() == {}
    with pytest.raises(ValueError, match="rank 0 needs a prompt source"):
        warm_start(learner, SFTConfig(steps=1), None)


# ------------------------------------------------------------------- config


def test_config_section():
    assert Config().sft == SFTConfig(steps=0, batch_size=32, lr=1e-3)
    cfg = load_config(overrides=["sft.steps=150", "sft.lr=5e-3", "sft.batch_size=16"])
    assert (cfg.sft.steps, cfg.sft.lr, cfg.sft.batch_size) == (150, 5e-3, 16)
    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sft.steps=-1", r"sft\.steps must be >= 0, got -1"),
        ("sft.batch_size=0", r"sft\.batch_size must be positive, got 0"),
        ("sft.lr=0", r"sft\.lr must be positive, got 0"),
        ("sft.step=5", r"unknown config key 'sft\.step'; did you mean 'sft\.steps'\?"),
        ("sft.steps=1.5", r"config key 'sft\.steps': value 1\.5 \(float\) is not of type int"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


# ------------------------------------------------------------------- two ranks


def two_rank_loop(loop_config: dict) -> dict:
    from mapo_ray.learner import Learner
    from mapo_ray.learner.sft import warm_start

    config = from_dict(Config, loop_config["config"])
    learner = Learner(config, loop_config["model_path"])
    batches = iter(loop_config["batches"])
    take = (lambda n: next(batches)) if learner.rank == 0 else None
    norms: list[float] = []

    def record_norm(step: int, metrics: dict) -> None:
        norms.append(float(learner.engine.get_global_grad_norm()))

    result = warm_start(learner, config.sft, take, log=record_norm)
    weights = {name: tensor.clone() for name, tensor in learner.named_parameters_for_sync()}
    torch.save(weights, f"{loop_config['out']}/rank{learner.rank}.pt")
    losses, tokens = [m["sft/loss"] for m in result.steps], [m["sft/tokens"] for m in result.steps]
    return {"losses": losses, "tokens": tokens, "grad_norms": norms}


@pytest.mark.integration
def test_two_ranks_take_the_step_of_one(ray_cluster, tokenizer, tmp_path):
    """ZeRO-2 over two Ray Train workers, each on its share of every batch, equals one rank on the whole."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = _config("learner.zero_stage=2", "learner.micro_batch_tokens=300", "sft.steps=2", "sft.batch_size=5")
    pool = synthetic_prompts(tokenizer, 10)
    batches = [pool[:5], pool[5:]]
    trainer = TorchTrainer(
        two_rank_loop,
        train_loop_config={
            "config": to_dict(config),
            "model_path": str(tiny_vl_path()),
            "batches": batches,
            "out": str(tmp_path),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="sft"),
    )
    result = trainer.fit()
    assert result.error is None

    single = Learner(config, tiny_vl_path())
    pending, norms = iter(batches), []

    def record_norm(step: int, metrics: dict) -> None:
        norms.append(float(single.engine.get_global_grad_norm()))

    expected = warm_start(single, config.sft, lambda n: next(pending), log=record_norm)
    two = result.return_value
    assert two["tokens"] == [m["sft/tokens"] for m in expected.steps]
    assert two["losses"] == pytest.approx([m["sft/loss"] for m in expected.steps], rel=1e-5)
    # Adam hides a gradient's scale from the weights; ZeRO-2's global norm shows it.
    assert two["grad_norms"] == pytest.approx(norms, rel=1e-4)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = _params(single)
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        # Adam magnifies float summation-order noise where a gradient is near 0 (lr 1e-3).
        torch.testing.assert_close(ranks[0][name], value, atol=1e-3 / 20, rtol=0, msg=name)
