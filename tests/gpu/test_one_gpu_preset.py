"""The 1-GPU preset (``geo3k-qwen25vl-3b-1gpu``) runs the training job for a few steps on one GPU.

The learner and the vLLM rollout actor share the device (fractional Ray GPUs, vLLM sleeping
while the learner trains, weight sync over gloo). The preset's model comes from the local
Hugging Face cache when it is there, else from ``MAPO_RAY_GPU_MODEL`` (a model folder); a
machine with neither (no hub is reachable from the test machines) runs the same preset on
the tiny Qwen2.5-VL, which still takes every GPU path: vLLM on CUDA with images, bf16
DeepSpeed, the shared GPU and the sync into a sleeping engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mapo_ray.config import load_config
from mapo_ray.telemetry.records import METRICS_FILE, read_metrics

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device; none is visible", allow_module_level=True)
pytest.importorskip("vllm", reason="needs vLLM: pip install -c constraints/gpu.txt -e '.[vllm]'")

ROOT = Path(__file__).resolve().parents[2]
PRESET = "geo3k-qwen25vl-3b-1gpu"
STEPS = 3
JOB_TIMEOUT_S = 1800


def preset_model() -> str:
    """The preset's hub model if cached here, else ``MAPO_RAY_GPU_MODEL``, else the tiny policy."""
    from huggingface_hub import try_to_load_from_cache

    model = load_config(preset=PRESET).trainer.model
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return model
    return os.environ.get("MAPO_RAY_GPU_MODEL", "tiny-vl")


def test_one_gpu_preset_trains_a_few_steps(tmp_path):
    run_dir = tmp_path / "run"
    model = preset_model()
    overrides = [
        f"trainer.model={model}",
        f"trainer.total_steps={STEPS}",
        "trainer.prompts_per_step=8",
        "trainer.eval_every=3",
        "trainer.eval_prompts=8",
        "trainer.checkpoint_every=3",
        "rollout.max_new_tokens=64",
        "sft.steps=0",
        "data.train=synthetic",
        "data.test=synthetic",
        "data.synthetic_train=64",
        "data.synthetic_test=16",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, with this machine's one GPU
    args = [sys.executable, "jobs/train_geo3k.py", "--preset", PRESET, "--output", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    job = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-6000:]

    history = read_metrics(run_dir / METRICS_FILE)
    assert sorted(history.train) == list(range(1, STEPS + 1))
    for step, record in history.train.items():
        # The step's weights reached the (sleeping) vLLM actor.
        assert record["weight_version"] == step
        for key in ("actor/pg_loss", "actor/grad_norm", "reward/mean"):
            assert record[key] is not None, f"step {step}: {key} is NaN or infinite"  # written as null
    assert history.evals[STEPS]["eval/accuracy"] is not None
    assert (run_dir / "policy" / "config.json").exists()
