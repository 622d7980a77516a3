"""Real vLLM (the CPU build, in its own venv): ``VLLMEngine`` loads the tiny text Qwen2,
generates, takes a weight update through the weight-sync group, and then decodes greedily
exactly as ``HFEngine`` does with the same updated weights.

The venv is built and cached by ``vllm_venv.py`` (about 2 minutes, once); a failed build
fails this test. The vLLM part runs as one subprocess (``vllm_check.py``) with a time limit.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from mapo_ray.models import tiny_text_path
from mapo_ray.rollout import HFEngine, token_logprobs
from mapo_ray.types import Prompt, SamplingParams
from vllm_venv import ROOT, ensure_vllm_venv

pytestmark = pytest.mark.integration

CHECK = Path(__file__).with_name("vllm_check.py")
CHECK_TIMEOUT_S = 600
QUESTIONS = ("Find x. In \\triangle ABC, AB = 3 and BC = 4.", "How many red cubes are there?", "What is 2 + 2?")


def perturbed(weights: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A stand-in for a training step: seeded noise on every matrix. It moves the random
    tiny model's near-uniform logits far enough apart that greedy decoding changes and
    no argmax is a near tie."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: w + scale * torch.randn(w.shape, generator=generator) if w.ndim == 2 else w.clone()
        for name, w in weights.items()
    }


def hf_greedy(engine: HFEngine, prompts: list[Prompt]) -> list:
    return [g.samples[0] for g in engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=16))]


def test_vllm_engine_takes_a_synced_update_and_matches_hf_greedy(tmp_path):
    python = ensure_vllm_venv()
    model = tiny_text_path()
    update = perturbed(load_file(model / "model.safetensors"), scale=0.1, seed=1)
    save_file(update, tmp_path / "update.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(texts))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    argv = [python, CHECK, "--model", model, "--update", tmp_path / "update.safetensors"]
    argv += ["--prompts", tmp_path / "prompts.json", "--out", tmp_path / "out.json"]
    try:
        proc = subprocess.run(
            [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, cwd=ROOT
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"vllm_check.py ran past {CHECK_TIMEOUT_S}s:\n{(err.stderr or '')[-4000:]}")
    assert proc.returncode == 0, f"vllm_check.py failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    result = json.loads((tmp_path / "out.json").read_text())

    # The update arrived over the sync group, in several buckets, and advanced the version.
    assert result["sync_ranks"] == 1 and result["sender_exitcode"] == 0
    assert result["buckets"] > 1
    assert (result["version_before"], result["received_version"], result["version_after"]) == (0, 1, 1)
    assert all(s["weight_version"] == 1 for s in result["after"])

    # Seeded sampling repeats itself; the G samples of a prompt still differ from each other.
    first, second = result["sampled"]
    assert first == second
    assert all(len({tuple(s) for s in group}) > 1 for group in first)

    prompts = [Prompt(uid=f"p{i}", text=t) for i, t in enumerate(texts)]
    hf = HFEngine(model)
    assert result["before"] == [s.response_ids for s in hf_greedy(hf, prompts)]
    hf.load_weights(update.items(), version=1)
    expected = hf_greedy(hf, prompts)

    vllm_after = [s["response_ids"] for s in result["after"]]
    assert vllm_after != result["before"], "the weight update did not change vLLM's greedy output"
    for got, want in zip(result["after"], expected):
        assert got["prompt_ids"] == want.prompt_ids
        assert got["response_ids"] == want.response_ids
        assert got["finish_reason"] == want.finish_reason
        torch.testing.assert_close(
            torch.tensor(got["response_logprobs"]), torch.tensor(want.response_logprobs), atol=1e-4, rtol=0
        )

    # Sampled from a top-p 0.5 nucleus, each token still records its log-prob under the
    # whole temperature-1 softmax: the learner's definition (mapo_ray.rollout.sampling).
    for sample in result["nucleus"]:
        ids = torch.tensor([sample["prompt_ids"] + sample["response_ids"]])
        with torch.no_grad():
            logits = hf.model(input_ids=ids).logits[:, len(sample["prompt_ids"]) - 1 : -1]
        expected = token_logprobs(logits, torch.tensor([sample["response_ids"]]), 1.0)[0]
        torch.testing.assert_close(torch.tensor(sample["response_logprobs"]), expected, atol=1e-4, rtol=0)
