"""The learner under DeepSpeed on CPU, single process: log-probs, updates, checkpoints, export.

Experiences come from real rollouts of the tiny Qwen2.5-VL (``HFEngine``), with real
images; the process is a torch.distributed world of one (gloo).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from mapo_ray.config import Config, load_config
from mapo_ray.learner import Experience, Learner
from mapo_ray.learner.deepspeed_setup import _op_builds_to_log
from mapo_ray.models import tiny_text_path, tiny_vl_path
from mapo_ray.models.tokenizer import IMAGE_PAD
from mapo_ray.rollout import HFEngine
from mapo_ray.types import Prompt, SamplingParams

TEMPERATURE = 0.7


@pytest.fixture(scope="module", autouse=True)
def world(single_process_world):
    yield


def _config(*overrides: str) -> Config:
    base = [f"rollout.temperature={TEMPERATURE}", "learner.lr=1e-3", "learner.updates_per_step=1", "algo.kl_coef=0"]
    return load_config(overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    """Three prompts: two with images of different sizes, one text-only."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path())
    rng = np.random.default_rng(0)

    def prompt(uid: str, question: str, sizes: list[tuple[int, int]]) -> Prompt:
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = tuple(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes)
        return Prompt(uid=uid, text=text, images=images)

    return [
        prompt("a", "How many red cubes are there?", [(56, 84)]),
        prompt("b", "Find x.", [(84, 56), (56, 56)]),
        prompt("c", "What is 3 + 4?", []),
    ]


def _rollouts(prompts: list[Prompt], params: SamplingParams) -> list[Experience]:
    groups = HFEngine(tiny_vl_path()).generate(prompts, params)
    return [
        Experience.from_sample(sample, group_id=g, reward=float(s), success=None, images=prompts[g].images)
        for g, group in enumerate(groups)
        for s, sample in enumerate(group.samples)
    ]


@pytest.fixture(scope="module")
def batch(prompts) -> list[Experience]:
    """Six rollouts, two per prompt, rewarded 0 and 1."""
    return _rollouts(prompts, SamplingParams(n=2, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=10, seed=3))


@pytest.fixture(scope="module")
def frozen_learner() -> Learner:
    """A stage-0 learner that no test updates; small micro-batches so that padding is exercised,
    and log-prob chunks that cut across responses."""
    settings = ("learner.zero_stage=0", "learner.micro_batch_tokens=120", "learner.logprob_chunk_tokens=7")
    return Learner(_config(*settings), tiny_vl_path())


def _plain_hf_log_probs(model, image_processor, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of one sample by an unpadded forward of the HF model."""
    ids = torch.tensor([exp.prompt_ids + exp.response_ids])
    kwargs = {}
    if exp.images:
        kwargs = dict(image_processor(images=list(exp.images), return_tensors="pt"))
        image_pad = model.config.image_token_id
        kwargs["mm_token_type_ids"] = (ids == image_pad).int() * (torch.arange(ids.shape[1]) < len(exp.prompt_ids))
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0, len(exp.prompt_ids) - 1 : -1].float() / TEMPERATURE
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, torch.tensor(exp.response_ids)[:, None]).squeeze(-1), entropy


def _params(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in learner.named_parameters_for_sync()}


def _response_log_prob(learner: Learner, exp: Experience) -> float:
    log_probs, _ = learner.compute_log_probs([exp])
    return float(log_probs.sum())


# ------------------------------------------------------------------- log-probs


def test_log_probs_equal_a_plain_hf_forward_and_the_sampler(frozen_learner, batch):
    path = tiny_vl_path()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    image_processor = AutoImageProcessor.from_pretrained(path)
    log_probs, entropy = frozen_learner.compute_log_probs(batch)
    assert log_probs.shape == (6, max(len(e.response_ids) for e in batch))
    for row, exp in enumerate(batch):
        n = len(exp.response_ids)
        expected, expected_entropy = _plain_hf_log_probs(model, image_processor, exp)
        torch.testing.assert_close(log_probs[row, :n], expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(entropy[row, :n], expected_entropy, atol=2e-5, rtol=0)
        # The sampler reports the same quantity (temperature TEMPERATURE, no top-p cut).
        torch.testing.assert_close(log_probs[row, :n], torch.tensor(exp.response_logprobs), atol=2e-5, rtol=0)
        assert not log_probs[row, n:].any() and not entropy[row, n:].any()


def test_log_probs_equal_the_sampler_under_top_p(frozen_learner, prompts):
    """Tokens drawn from a top-p 0.7 nucleus carry the untruncated temperature-scaled
    log-prob, the learner's: at equal weights the two agree to float precision, and so
    ``actor/rollout_logprob_abs_diff`` of an update is 0."""
    nucleus = _rollouts(prompts, SamplingParams(n=2, temperature=TEMPERATURE, top_p=0.7, max_new_tokens=10, seed=5))
    log_probs, _ = frozen_learner.compute_log_probs(nucleus)
    for row, exp in enumerate(nucleus):
        n = len(exp.response_ids)
        torch.testing.assert_close(log_probs[row, :n], torch.tensor(exp.response_logprobs), atol=2e-5, rtol=0)
    learner = Learner(_config("learner.zero_stage=0", "rollout.top_p=0.7"), tiny_vl_path())
    metrics = learner.update(nucleus, torch.tensor([1.0, -1.0] * 3))
    assert metrics["actor/rollout_logprob_abs_diff"] < 1e-5


def test_log_probs_equal_the_greedy_sampler(prompts):
    greedy = _rollouts(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6))
    # Greedy decoding records the plain softmax, the learner's at temperature 1 (which is
    # also what it reads 0 as). Greedy training is no config: a group of one has no advantage.
    learner = Learner(_config("learner.zero_stage=0", "rollout.temperature=1"), tiny_vl_path())
    log_probs, _ = learner.compute_log_probs(greedy)
    for row, exp in enumerate(greedy):
        expected = torch.tensor(exp.response_logprobs)
        torch.testing.assert_close(log_probs[row, : len(exp.response_ids)], expected, atol=2e-5, rtol=0)


def test_a_sampled_image_pad_in_a_response_is_text(frozen_learner, batch):
    """Equal to token-by-token decoding, which is how the sampler saw such a response."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_path()).eval()
    image_pad = model.config.image_token_id
    source = batch[0]
    exp = Experience(
        source.prompt_ids, [17, image_pad, 23, image_pad], [0.0] * 4, 0, 0.0, None, 0, images=source.images
    )
    vision = dict(AutoImageProcessor.from_pretrained(tiny_vl_path())(images=list(exp.images), return_tensors="pt"))
    prompt = torch.tensor([exp.prompt_ids])
    with torch.no_grad():
        out = model(input_ids=prompt, mm_token_type_ids=(prompt == image_pad).int(), use_cache=True, **vision)
        steps = [out.logits[0, -1]]
        for token in exp.response_ids[:-1]:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
    expected = (torch.stack(steps).float() / TEMPERATURE).log_softmax(-1)
    expected = expected.gather(-1, torch.tensor(exp.response_ids)[:, None]).squeeze(-1)
    log_probs, _ = frozen_learner.compute_log_probs([exp])
    torch.testing.assert_close(log_probs[0], expected, atol=2e-5, rtol=0)


def _text_experiences(path, questions: list[str], responses: list[list[int]]) -> list[Experience]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for question, response in zip(questions, responses):
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(Experience(tokenizer(text)["input_ids"], response, [0.0] * len(response), 0, 0.0, None, 0))
    return out


# Prompts of different lengths, so that one micro-batch left-pads the shorter.
QUESTIONS = ["What is 3 + 4?", "Find the perimeter of the rectangle with sides 3 and 5, in centimetres."]


def test_left_padded_text_rows_of_a_vision_language_policy(frozen_learner):
    exps = _text_experiences(tiny_vl_path(), QUESTIONS, [[5, 9, 2], [44]])
    assert len(exps[0].prompt_ids) != len(exps[1].prompt_ids)
    log_probs, _ = frozen_learner.compute_log_probs(exps)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_path()).eval()
    for row, exp in enumerate(exps):
        expected, _ = _plain_hf_log_probs(model, None, exp)
        torch.testing.assert_close(log_probs[row, : len(exp.response_ids)], expected, atol=2e-5, rtol=0)


def test_text_only_policy(batch):
    path = tiny_text_path()
    exps = _text_experiences(path, QUESTIONS, [[5, 9, 2], [44]])
    learner = Learner(_config("learner.zero_stage=0"), path)
    log_probs, _ = learner.compute_log_probs(exps)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for row, exp in enumerate(exps):
        expected, _ = _plain_hf_log_probs(model, None, exp)
        torch.testing.assert_close(log_probs[row, : len(exp.response_ids)], expected, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="carries 2 image\\(s\\), but the model has no vision tower"):
        learner.compute_log_probs([batch[2]])


# ------------------------------------------------------------------- updates


@pytest.mark.parametrize("stage", [0, 3])
def test_update_follows_the_sign_of_the_advantage(stage, batch):
    learner = Learner(_config(f"learner.zero_stage={stage}"), tiny_vl_path())
    up, down = batch[0], batch[2]
    before = _response_log_prob(learner, up)
    metrics = learner.update([up], torch.tensor([1.0]))
    assert _response_log_prob(learner, up) > before + 0.05
    assert metrics["actor/pg_loss"] == pytest.approx(-1.0)  # -A * ratio at ratio 1
    before = _response_log_prob(learner, down)
    learner.update([down], torch.tensor([-1.0]))
    assert _response_log_prob(learner, down) < before - 0.05
    assert learner.step == 2


@pytest.mark.parametrize("stage", [0, 3])
def test_micro_batching_gives_the_gradient_of_one_big_batch(stage, batch):
    settings = [f"learner.zero_stage={stage}", "learner.updates_per_step=2", "algo.kl_coef=0.05"]
    whole = Learner(_config(*settings, "learner.micro_batch_tokens=100000"), tiny_vl_path())
    # A budget below any sample: one micro-batch per sample.
    pieces = Learner(_config(*settings, "learner.micro_batch_tokens=1"), tiny_vl_path())
    advantages = whole.advantages(batch)
    assert torch.equal(advantages, pieces.advantages(batch))
    metrics_whole = whole.update(batch, advantages)
    metrics_pieces = pieces.update(batch, advantages)
    assert metrics_whole.keys() == metrics_pieces.keys()
    for name, value in metrics_whole.items():
        assert metrics_pieces[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # Clipping at 1.0 only scales; grad_norm above it shows the loss is not trivially small.
    assert metrics_whole["actor/grad_norm"] > 1.0
    # Adam divides by sqrt(v): where a gradient is near 0 it magnifies float summation-order
    # noise, so a few entries may differ by a small part of one step (lr = 1e-3).
    params_whole, params_pieces = _params(whole), _params(pieces)
    for name, value in params_whole.items():
        torch.testing.assert_close(params_pieces[name], value, atol=1e-3 / 20, rtol=0, msg=name)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_single_step_update_takes_its_old_log_probs_from_its_own_forward(stage, batch, monkeypatch):
    """Skipping the separate old-log-prob pass changes neither the step nor its metrics."""
    settings = [f"learner.zero_stage={stage}", "learner.micro_batch_tokens=120"]
    fast, two_pass = (Learner(_config(*settings), tiny_vl_path()) for _ in range(2))
    assert fast.single_step
    advantages = fast.advantages(batch)
    metrics_fast = fast.update(batch, advantages)
    monkeypatch.setattr(Learner, "single_step", property(lambda self: False))
    metrics_two_pass = two_pass.update(batch, advantages)
    assert metrics_fast.keys() == metrics_two_pass.keys()
    for name, value in metrics_two_pass.items():
        assert metrics_fast[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert metrics_fast["actor/entropy"] > 0 and metrics_fast["actor/rollout_logprob_abs_diff"] < 1e-4
    params_fast, params_two_pass = _params(fast), _params(two_pass)
    for name, value in params_two_pass.items():
        torch.testing.assert_close(params_fast[name], value, atol=1e-3 / 20, rtol=0, msg=name)


@pytest.mark.parametrize("stage", [0, 3])
def test_the_log_prob_chunk_size_changes_memory_not_the_update(stage, batch):
    """Chunks of 3 tokens (cutting across responses) against one chunk for the whole micro-batch,
    with a KL reference so that its log-probs are chunked too; ZeRO-3 gathers the head for each."""
    settings = [f"learner.zero_stage={stage}", "algo.kl_coef=0.05"]
    whole = Learner(_config(*settings, "learner.logprob_chunk_tokens=100000"), tiny_vl_path())
    chunked = Learner(_config(*settings, "learner.logprob_chunk_tokens=3"), tiny_vl_path())
    for a, b in zip(whole.compute_log_probs(batch), chunked.compute_log_probs(batch)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    advantages = whole.advantages(batch)
    metrics_whole, metrics_chunked = whole.update(batch, advantages), chunked.update(batch, advantages)
    for name, value in metrics_whole.items():
        assert metrics_chunked[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    params_whole, params_chunked = _params(whole), _params(chunked)
    for name, value in params_whole.items():
        torch.testing.assert_close(params_chunked[name], value, atol=1e-3 / 20, rtol=0, msg=name)


def test_gradient_checkpointing_changes_memory_not_gradients(batch):
    plain = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    checkpointed = Learner(_config("learner.zero_stage=0", "learner.gradient_checkpointing=true"), tiny_vl_path())
    assert checkpointed.policy.is_gradient_checkpointing and not plain.policy.is_gradient_checkpointing
    advantages = plain.advantages(batch)
    expected = plain.update(batch, advantages)
    assert checkpointed.update(batch, advantages) == pytest.approx(expected, rel=1e-5)


def test_frozen_vision_tower_gets_no_updates(batch):
    learner = Learner(_config("learner.zero_stage=2", "learner.freeze_vision_tower=true"), tiny_vl_path())
    before = _params(learner)
    learner.update(batch, learner.advantages(batch))
    after = _params(learner)
    vision = [n for n in before if n.startswith("model.visual.")]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("model.language_model."))


def test_update_rejects_a_bad_batch(frozen_learner, batch):
    with pytest.raises(ValueError, match="6 experiences but advantages of shape \\(5,\\)"):
        frozen_learner.update(batch, torch.zeros(5))
    learner_cfg = frozen_learner.config.learner
    assert learner_cfg.updates_per_step == 1
    with pytest.raises(ValueError, match="learner.freeze_vision_tower is set, but .* has no vision tower"):
        Learner(_config("learner.freeze_vision_tower=true"), tiny_text_path())


def test_a_non_finite_loss_stops_the_update_before_the_step(batch):
    learner = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    with pytest.raises(ValueError, match="advantages must be finite; NaN or inf at positions \\[1\\]"):
        learner.update(batch[:2], torch.tensor([1.0, float("nan")]))
    with torch.no_grad():
        learner.policy.model.language_model.norm.weight[0] = float("nan")  # a model gone bad
    before = _params(learner)
    with pytest.raises(FloatingPointError, match="rank 0, update 0: non-finite policy loss in group\\(s\\) \\[0\\]"):
        learner.update(batch[:2], torch.tensor([1.0, -1.0]))
    after = _params(learner)
    assert all(torch.equal(before[n], after[n]) for n in before if n != "model.language_model.norm.weight")
    assert learner.step == 0


def test_too_few_samples_for_the_mini_batches(batch):
    learner = Learner(_config("learner.zero_stage=0", "learner.updates_per_step=4"), tiny_vl_path())
    with pytest.raises(ValueError, match="3 sample\\(s\\) on this learner rank cannot fill learner.updates_per_step=4"):
        learner.update(batch[:3], torch.zeros(3))
    assert learner.step == 0


# ------------------------------------------------------------------- checkpoints and export


def _assert_equal_nested(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_nested(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. ZeRO's loss scaler, which has no __eq__
        assert type(a) is type(b), where
        _assert_equal_nested(vars(a), vars(b), where)
    else:
        assert a == b, where


@pytest.mark.parametrize("stage", [0, 3])
def test_save_load_round_trip(stage, batch, tmp_path):
    settings = [f"learner.zero_stage={stage}", "learner.updates_per_step=2", "learner.lr_warmup_steps=5"]
    settings.append("algo.kl_coef=0.05")
    trained = Learner(_config(*settings), tiny_vl_path())
    trained.update(batch, trained.advantages(batch))
    trained.save(tmp_path / "ckpt", client_state={"data_position": 7})
    draws_after_save = torch.rand(4)

    resumed = Learner(_config(*settings), tiny_vl_path())
    assert resumed.load(tmp_path / "ckpt") == {"data_position": 7}
    assert torch.equal(torch.rand(4), draws_after_save)  # RNG restored to the moment of saving
    assert resumed.step == trained.step == 1
    _assert_equal_nested(_params(resumed), _params(trained), "params")
    _assert_equal_nested(resumed.engine.optimizer.state_dict(), trained.engine.optimizer.state_dict(), "optimizer")
    assert resumed.engine.lr_scheduler.state_dict() == trained.engine.lr_scheduler.state_dict()
    assert resumed.engine.get_lr() == trained.engine.get_lr() == [pytest.approx(1e-3 * 3 / 5)]  # warm-up step 3 next

    # The next update is identical: weights, moments, schedule and step all carried over.
    metrics_trained = trained.update(batch, trained.advantages(batch))
    metrics_resumed = resumed.update(batch, resumed.advantages(batch))
    assert metrics_resumed == metrics_trained
    _assert_equal_nested(_params(resumed), _params(trained), "params after the next update")


def test_load_names_a_missing_checkpoint(frozen_learner, tmp_path):
    with pytest.raises(FileNotFoundError, match="learner checkpoint .*nowhere: learner is missing \\(rank 0\\)"):
        frozen_learner.load(tmp_path / "nowhere")


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(batch, tmp_path):
    trained = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    trained.save(tmp_path / "older", client_state={"step": 1})
    before = _params(trained)
    trained.update(batch, trained.advantages(batch))
    trained.save(tmp_path / "newer", client_state={"step": 2})
    states = tmp_path / "newer" / "learner" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a crash mid-write

    resumed = Learner(_config("learner.zero_stage=0"), tiny_vl_path())
    folder, state = resumed.load_first_complete([tmp_path / "newer", tmp_path / "older"])
    assert (folder, state) == (tmp_path / "older", {"step": 1})
    _assert_equal_nested(_params(resumed), before, "params")

    with pytest.raises(RuntimeError, match=r"no learner checkpoint could be restored: .*newer: \w+Error"):
        resumed.load_first_complete([tmp_path / "newer"])


def test_export_hf_loads_with_from_pretrained(batch, tmp_path):
    learner = Learner(_config("learner.zero_stage=3"), tiny_vl_path())
    learner.update(batch, learner.advantages(batch))
    learner.export_hf(tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    exported = dict(model.named_parameters())
    trained = _params(learner)
    assert exported.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids(IMAGE_PAD) == model.config.image_token_id
    assert AutoImageProcessor.from_pretrained(tmp_path / "hf").merge_size == 2


# ------------------------------------------------------------------- rollout corrections


def _with_behaviour(batch: list[Experience], log_probs: torch.Tensor, shift: float = 0.0) -> list[Experience]:
    """``batch`` with each response's sampler log-probs replaced by ``log_probs`` (N, L) + ``shift``."""
    return [
        dataclasses.replace(e, response_logprobs=(log_probs[row, : len(e.response_ids)] + shift).tolist())
        for row, e in enumerate(batch)
    ]


@pytest.mark.parametrize("correction", ["tis", "seq_tis", "mask", "decoupled"])
def test_a_correction_with_the_learners_own_behaviour_log_probs_changes_nothing(correction, batch):
    """mu = pi_old: the weights are exactly 1, so the update equals one without correction,
    bit for bit, in the two-pass update (where pi_old comes from the same pass as mu here);
    a behaviour policy that differs does change the step (the term is wired in)."""
    settings = ["learner.zero_stage=0", "learner.updates_per_step=2"]
    plain = Learner(_config(*settings, "algo.rollout_correction=none"), tiny_vl_path())
    corrected = Learner(_config(*settings, f"algo.rollout_correction={correction}"), tiny_vl_path())
    shifted = Learner(_config(*settings, f"algo.rollout_correction={correction}"), tiny_vl_path())
    assert (plain.rollout_correction, corrected.rollout_correction) == ("none", correction)
    own, _ = plain.compute_log_probs(batch)
    same = _with_behaviour(batch, own)
    advantages = plain.advantages(same)
    metrics_plain = plain.update(same, advantages)
    metrics = corrected.update(same, advantages)
    assert metrics["actor/rollout_is_weight_mean"] == 1.0
    assert metrics["actor/rollout_logprob_abs_diff"] == 0.0
    for name, value in metrics_plain.items():
        assert metrics[name] == value, name
    params_plain, params_corrected = _params(plain), _params(corrected)
    for name, value in params_plain.items():
        assert torch.equal(params_corrected[name], value), name
    # The sampler gave every token a log-prob 1.0 higher: pi_old / mu = e^-1, outside the
    # band of cap 2 (mask drops every token; the others weight by e^-1 or less).
    metrics_shifted = shifted.update(_with_behaviour(batch, own, shift=1.0), advantages)
    assert metrics_shifted["actor/rollout_is_weight_mean"] < 0.5
    params_shifted = _params(shifted)
    assert any(not torch.equal(params_shifted[n], params_plain[n]) for n in params_plain)


def test_the_single_step_path_takes_pi_old_from_its_own_forward_with_a_correction(batch):
    """One optimizer step: pi_old is the step's own detached forward; with the learner's own
    log-probs as mu the weights are 1 up to float noise between two forwards."""
    plain = Learner(_config("learner.zero_stage=0", "algo.rollout_correction=none"), tiny_vl_path())
    corrected = Learner(_config("learner.zero_stage=0", "algo.rollout_correction=tis"), tiny_vl_path())
    assert corrected.single_step
    own, _ = plain.compute_log_probs(batch)
    same = _with_behaviour(batch, own)
    advantages = plain.advantages(same)
    plain.update(same, advantages)
    metrics = corrected.update(same, advantages)
    assert metrics["actor/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["actor/rollout_is_truncated_frac"] == 0.0
    params_plain, params_corrected = _params(plain), _params(corrected)
    for name, value in params_plain.items():
        torch.testing.assert_close(params_corrected[name], value, atol=1e-3 / 20, rtol=0, msg=name)


def test_deepspeed_op_build_lines_go_to_the_log_and_other_output_to_the_console(capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="mapo_ray.learner.deepspeed_setup")
    with _op_builds_to_log():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else")
    assert capsys.readouterr().out == "something else\n"
    assert "deepspeed_shm_comm_op built successfully" in caplog.text


def test_deepspeed_op_build_lines_stay_off_the_console_under_ray_trains_print(capsys, caplog, monkeypatch):
    from ray.train.v2._internal.logging.patch_print import redirected_print

    # Ray Train's print logs every line at INFO besides writing it, past any redirect of stdout.
    monkeypatch.setattr(builtins, "print", redirected_print)
    with caplog.at_level(logging.DEBUG):
        with _op_builds_to_log():
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert capsys.readouterr().out == ""
    assert [r.name for r in caplog.records] == ["mapo_ray.learner.deepspeed_setup"]
