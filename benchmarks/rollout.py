"""Generated tokens per second of the rollout engines on a fixed batch of the tiny models.

    python benchmarks/rollout.py [--model vl|text] [--prompts 8] [--group 4] [--max-new-tokens 32]
                                 [--repeats 3] [--device cpu|cuda] [--vllm]

ours: ``HFEngine.generate`` on the whole batch, B prompts x G samples in one call (left
padding, one vision pass per prompt). baseline: the same B x G responses one sequence
per call, the way a naive rollout loop samples. ``--vllm`` adds ``VLLMEngine`` on the
same batch where vLLM is installed (in this repo: ``.venv-vllm``, text model, CPU):

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/rollout.py --model text --vllm

The random tiny models almost never emit eos, so nearly every response runs to
``--max-new-tokens``; each row reports the tokens it actually generated. Prints a table
and ends with one JSON line (``ours_s`` / ``baseline_s``: seconds per batch, median).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch
from PIL import Image

from mapo_ray.models import tiny_text_path, tiny_vl_path
from mapo_ray.rollout import HFEngine
from mapo_ray.types import Group, Prompt, SamplingParams, count_tokens, derive_seed

QUESTIONS = (
    "Find x. In \\triangle ABC, AB = 3 and BC = 4.",
    "How many red cubes are there?",
    "Find the perimeter of the rectangle with sides 5 and 7.",
    "What colour is the large sphere? Answer with a single word.",
)


def make_prompts(engine: HFEngine, count: int, with_images: bool) -> list[Prompt]:
    """``count`` chat prompts; with images, each gets one of a few sizes (so the batch is padded)."""
    prompts = []
    for i in range(count):
        content = [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        images: tuple[Image.Image, ...] = ()
        if with_images:
            content.insert(0, {"type": "image"})
            images = (Image.new("RGB", (56 + 28 * (i % 4), 84), (40 * i % 256, 90, 160)),)
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(Prompt(f"bench#{i}", text, images))
    return prompts


def timed(fn: Callable[[], list[Group]], repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, and the tokens of the last run."""
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        groups = fn()
        times.append(time.perf_counter() - start)
        tokens = count_tokens(groups)
    return statistics.median(times), tokens


def one_at_a_time(engine, prompts: list[Prompt], params: SamplingParams) -> list[Group]:
    """The baseline: every response of every prompt from its own generate call."""
    groups = []
    for i, prompt in enumerate(prompts):
        samples = []
        for g in range(params.n):
            single = dataclasses.replace(params, n=1, seed=derive_seed(params.seed, i * params.n + g))
            samples += engine.generate([prompt], single)[0].samples
        groups.append(Group(prompt.uid, prompt.answer, samples))
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("vl", "text"), default="vl")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vllm", action="store_true", help="also time VLLMEngine (needs vLLM installed)")
    args = parser.parse_args()

    path = tiny_vl_path() if args.model == "vl" else tiny_text_path()
    hf = HFEngine(path, device=args.device)
    prompts = make_prompts(hf, args.prompts, with_images=args.model == "vl")
    params = SamplingParams(n=args.group, temperature=1.0, top_p=0.99, max_new_tokens=args.max_new_tokens, seed=0)
    print(
        f"model: tiny {args.model}  device: {args.device}  batch: {args.prompts} prompts x G={args.group}, "
        f"{args.max_new_tokens} new tokens  torch threads {torch.get_num_threads()}"
    )

    rows = []
    t_ours, tokens = timed(lambda: hf.generate(prompts, params), args.repeats)
    rows.append(("HFEngine, whole batch per call (ours)", t_ours, tokens))
    t_base, tokens = timed(lambda: one_at_a_time(hf, prompts, params), max(1, args.repeats // 2))
    rows.append(("HFEngine, one sequence per call (baseline)", t_base, tokens))
    if args.vllm:
        from mapo_ray.rollout import VLLMEngine

        engine = VLLMEngine(path, dtype="float32", max_model_len=1024, enforce_eager=args.device == "cpu")
        t_vllm, tokens = timed(lambda: engine.generate(prompts, params), args.repeats)
        rows.append(("VLLMEngine, whole batch per call", t_vllm, tokens))

    print()
    print(f"{'engine':<44} {'s / batch':>10} {'tokens':>8} {'tokens/s':>10}")
    for name, seconds, count in rows:
        print(f"{name:<44} {seconds:>10.3f} {count:>8d} {count / seconds:>10.1f}")
    print(json.dumps({"benchmark": "rollout", "ours_s": t_ours, "baseline_s": t_base, "speedup": t_base / t_ours}))


if __name__ == "__main__":
    main()
