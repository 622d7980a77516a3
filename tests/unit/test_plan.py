"""The memory plan (``mapo_ray.plan``): against DeepSpeed's estimator, against a measured CPU
update of a widened tiny Qwen2.5-VL, part by part, and as a CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mapo_ray.config import load_config
from mapo_ray.learner import Experience, Learner
from mapo_ray.models import tiny_vl_path
from mapo_ray.plan import (
    GIB,
    build_plan,
    layer_activation_bytes,
    load_shape,
    model_shape,
    model_states,
    plan_to_dict,
)

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def shape_7b():
    return load_shape(SEVEN_B)


def _plan(preset: str, *overrides: str, shape=None):
    return build_plan(load_config(preset=preset, overrides=list(overrides)), shape=shape)


# ------------------------------------------------------------------- model shapes


def test_the_builtin_7b_config_has_the_published_parameter_count(shape_7b):
    assert shape_7b.total_params == 8_292_166_656
    assert shape_7b.vision_params == 676_550_144
    # The untied output embedding, ZeRO-3's largest gathered module.
    assert shape_7b.largest_module_params == 152064 * 3584


def test_an_unknown_model_names_itself_and_the_fix():
    with pytest.raises(ValueError, match="no-such/model.*download it.*folder"):
        load_shape("no-such/model")


# ------------------------------------------------------------------- DeepSpeed's estimator


def _deepspeed_gpu_gib(estimate, *args) -> float:
    """Per-GPU GiB of the no-offload line that DeepSpeed's ``*_all_cold`` estimator prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate(*args)
    line = next(line for line in out.getvalue().splitlines() if "offload_optimizer=none" in line)
    return float(line.split("|")[1].strip().removesuffix("GB"))


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_agree_with_deepspeeds_estimator(shape_7b, stage):
    """Within 2%: at ZeRO-2 both count 2 + 18/N bytes per parameter; at ZeRO-3 DeepSpeed
    counts 18/N, the plan 16/N plus the fp32 gradient of one 1e9-element sub-group."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    s = shape_7b
    if stage == 3:
        expected = _deepspeed_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold, s.total_params, s.largest_module_params, 4, 1)
    else:
        expected = _deepspeed_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, s.total_params, 4, 1)
    ours = model_states(
        s.total_params, s.total_params, s.largest_module_params, zero_stage=stage, world_size=4, bf16=True
    ).total / GIB
    assert ours == pytest.approx(expected, rel=0.02)


# ------------------------------------------------------------------- measured on CPU


@pytest.fixture(scope="module")
def wide_vl(tmp_path_factory):
    """The tiny Qwen2.5-VL widened (hidden 512, 4 layers, 8 heads over 2 KV heads, 8192
    words: 16.6M parameters) so that model states and activations are hundreds of MB,
    well above allocator noise. Random weights, built offline in seconds."""
    source = tiny_vl_path()
    config = AutoConfig.from_pretrained(source).to_dict()
    config["text_config"].update(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192
    )
    config["text_config"].pop("layer_types", None)  # sized for the old layer count
    config["vision_config"]["out_hidden_size"] = 512
    folder = tmp_path_factory.mktemp("wide-vl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config)).save_pretrained(folder)
    for item in source.iterdir():
        if item.is_file() and not item.name.startswith("model") and item.name != "config.json":
            shutil.copy(item, folder / item.name)
    return folder


def _peak_bytes_during(fn) -> int:
    """Peak of the running sum of every CPU allocation and free while ``fn`` runs (bytes above the start).

    Kineto records each allocator event with its size and time; the profiler's
    per-op view would fold the allocations inside an op into that op.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_a_measured_cpu_update_is_within_30_percent_of_the_plan(single_process_world, wide_vl):
    """One fp32 ZeRO-0 update of 8 text samples (96 + 32 tokens) in one micro-batch.

    The first update allocates AdamW's moments; the second is measured, so the peak
    above its start is what an update adds to the resident weights and moments:
    gradients, activations and logits (the plan sums them, although gradients grow as
    activations are freed, so it is an upper bound).
    """
    rows, prompt, response = 8, 96, 32
    config = load_config(
        preset="cpu-tiny",
        overrides=[
            "learner.updates_per_step=1",
            f"learner.micro_batch_tokens={rows * (prompt + response)}",
            # Every response token's logits at once: as the unchunked and the one-chunk code hold them.
            f"learner.logprob_chunk_tokens={rows * response}",
            f"rollout.max_model_len={prompt + response}",
            # Text-only samples: the tower sees a blank 2x2-patch image.
            "data.min_pixels=784",
            "data.max_pixels=784",
        ],
    )
    generator = torch.Generator().manual_seed(0)
    batch = [
        Experience(
            torch.randint(10, 1000, (prompt,), generator=generator).tolist(),
            torch.randint(10, 1000, (response,), generator=generator).tolist(),
            [-1.0] * response,
            group_id=i // 2,
            reward=float(i % 2),
            success=None,
            weight_version=0,
        )
        for i in range(rows)
    ]
    learner = Learner(config, wide_vl)
    advantages = learner.advantages(batch)
    learner.update(batch, advantages)
    measured = _peak_bytes_during(lambda: learner.update(batch, advantages))

    shape = model_shape(AutoConfig.from_pretrained(wide_vl), "wide-vl", "test")
    parts = build_plan(config, shape=shape).learner.parts
    planned = parts["gradients"] + parts["activations"] + parts["logprob_chunks"]
    assert planned > 100 * 2**20
    assert measured == pytest.approx(planned, rel=0.30)
    # The resident part is exact: fp32 weights and AdamW's two moments.
    resident = sum(p.numel() * 4 for p in learner.engine.module.parameters())
    resident += sum(t.numel() * t.element_size() for s in learner.engine.optimizer.state.values() for t in s.values() if t.dim())
    assert parts["weights"] + parts["optimizer"] == pytest.approx(resident, rel=0.01)


# ------------------------------------------------------------------- the parts


def test_each_zero_stage_shards_what_it_should():
    p, n = 1_000_000, 4
    stages = [model_states(p, p, 0, zero_stage=s, world_size=n, bf16=True) for s in range(4)]
    assert stages[0] == model_states(p, p, 0, zero_stage=0, world_size=1, bf16=True)  # nothing sharded
    assert (stages[0].weights, stages[0].gradients, stages[0].optimizer) == (2 * p, 6 * p, 12 * p)
    assert stages[1].optimizer == 12 * p // n and stages[1].gradients == 2 * p + 4 * p // n
    assert stages[2].gradients == 6 * p // n and stages[2].weights == 2 * p
    assert stages[3].weights == 2 * p // n
    assert [s.total for s in stages] == sorted((s.total for s in stages), reverse=True)


def test_checkpointing_lowers_activations(shape_7b):
    on = _plan("geo3k-qwen25vl-7b", "learner.gradient_checkpointing=true", shape=shape_7b).learner
    off = _plan("geo3k-qwen25vl-7b", "learner.gradient_checkpointing=false", shape=shape_7b).learner
    assert on.parts["activations"] < off.parts["activations"] / 10
    # Both numbers are shown whichever is configured.
    assert on.details["activations_without_checkpointing_gib"] == off.details["activations_without_checkpointing_gib"]


def test_the_activation_formula_counts_each_saved_tensor():
    # bf16: norms 2 * 6h, attention 10h, SwiGLU 8i.
    assert layer_activation_bytes(3584, 3584, 18944, 2) == 22 * 3584 + 8 * 18944


def test_a_frozen_vision_tower_has_no_gradients_or_optimizer_states(shape_7b):
    base = ("learner.zero_stage=0", "trainer.num_learners=1")
    trained = _plan("geo3k-qwen25vl-7b", *base, shape=shape_7b).learner.parts
    frozen = _plan("geo3k-qwen25vl-7b", *base, "learner.freeze_vision_tower=true", shape=shape_7b).learner.parts
    vision = shape_7b.vision_params
    assert trained["gradients"] - frozen["gradients"] == 6 * vision
    assert trained["optimizer"] - frozen["optimizer"] == 12 * vision
    assert trained["weights"] == frozen["weights"]


def test_the_one_gpu_preset_sums_the_shared_gpu():
    plan = _plan("geo3k-qwen25vl-3b-1gpu")
    assert plan.shared is not None and plan.fits
    learner, rollout = plan.learner, plan.rollout
    # vLLM sleeps while the learner trains; a rollout meets the learner's resident states.
    assert plan.shared.phases["update"] == learner.total + rollout.resident
    assert plan.shared.phases["rollout"] == rollout.total + learner.resident
    # A weight sync wakes vLLM's weights alone: below the rollout phase by the KV cache.
    assert plan.shared.phases["sync"] == rollout.resident + rollout.parts["weights"] + learner.resident
    assert plan.shared.phases["sync"] < plan.shared.phases["rollout"] - rollout.parts["kv_cache"] + 1
    assert rollout.resident < rollout.total and learner.resident < learner.total
    awake = _plan("geo3k-qwen25vl-3b-1gpu", "rollout.sleep_between_rollouts=false", shape=plan.shape)
    assert awake.shared.phases["update"] == awake.learner.total + awake.rollout.total


def test_the_8_gpu_preset_fits_on_separate_gpus(shape_7b):
    plan = _plan("geo3k-qwen25vl-7b", shape=shape_7b)
    assert plan.fits and plan.shared is None and plan.advice == ()
    assert plan.rollout.details["starts"]


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (("learner.gradient_checkpointing=false",), "set learner.gradient_checkpointing=true"),
        # An image is at most what a 2,048-token prompt holds (data.max_prompt_tokens), not
        # the 21k patches of a 4.2 MP image (data.max_pixels): ZeRO-1 and 32k-token
        # micro-batches fit.
        (("learner.zero_stage=0", "algo.kl_coef=0"), "set learner.zero_stage=1"),
        (("learner.micro_batch_tokens=131072",), "set learner.micro_batch_tokens=32768"),
    ],
)
def test_a_plan_that_does_not_fit_names_the_setting_to_change(shape_7b, overrides, fix):
    plan = _plan("geo3k-qwen25vl-7b", *overrides, shape=shape_7b)
    assert not plan.fits and not plan.learner.fits
    assert fix in plan.advice


def test_a_shared_gpu_that_does_not_fit_names_the_vllm_fraction():
    plan = _plan("geo3k-qwen25vl-3b-1gpu", "rollout.gpu_memory_utilization=0.6")
    assert plan.learner.fits and plan.rollout.fits and not plan.shared.fits
    assert any(a.startswith("set rollout.gpu_memory_utilization=0.") for a in plan.advice)


def test_a_kv_cache_below_one_sequence_does_not_start(shape_7b):
    plan = _plan("geo3k-qwen25vl-7b", "rollout.gpu_memory_utilization=0.25", shape=shape_7b)
    assert not plan.rollout.details["starts"] and not plan.rollout.fits
    assert any("rollout.gpu_memory_utilization" in a for a in plan.advice)


def test_cpu_components_report_host_memory():
    plan = _plan("cpu-tiny")
    assert plan.learner.capacity is None and plan.learner.details["device"] == "host"
    assert plan.rollout.capacity is None and plan.fits
    assert plan.learner.parts["cuda_allowance"] == 0 and plan.learner.parts["weights"] > 0


def test_the_json_form_has_the_stated_keys(shape_7b):
    data = json.loads(json.dumps(plan_to_dict(_plan("geo3k-qwen25vl-7b", shape=shape_7b))))
    assert {"gpu_memory_gib", "learner", "rollout", "shared_gpu", "fits", "advice"} <= data.keys()
    for name in ("learner", "rollout"):
        part = data[name]
        assert {"parts_gib", "total_gib", "checked_against_gib", "fits"} <= part.keys()
        assert part["total_gib"] == pytest.approx(sum(part["parts_gib"].values()), abs=0.01)
    assert {"weights", "gradients", "optimizer", "reference", "activations", "logprob_chunks"} <= data["learner"]["parts_gib"].keys()
    assert {"weights", "kv_cache"} <= data["rollout"]["parts_gib"].keys()


# ------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapo_ray.plan", *args], capture_output=True, text=True, timeout=120)


def test_the_cli_exits_0_when_it_fits_and_1_when_it_does_not():
    fits = _cli("--preset", "geo3k-qwen25vl-7b")
    assert fits.returncode == 0, fits.stderr
    assert "Learner: 4 rank(s), ZeRO-3" in fits.stdout and "Fits." in fits.stdout
    too_big = _cli("--preset", "geo3k-qwen25vl-7b", "--set", "learner.gradient_checkpointing=false", "--json")
    assert too_big.returncode == 1, too_big.stderr
    data = json.loads(too_big.stdout)
    assert data["fits"] is False and data["learner"]["fits"] is False
    assert "set learner.gradient_checkpointing=true" in data["advice"]
