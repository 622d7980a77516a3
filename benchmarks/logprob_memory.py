"""Peak memory and time of token log-probs, chunked against the full-logits computation.

    python benchmarks/logprob_memory.py [--lengths 512,1024,2048] [--chunk 512] [--repeats 2]

The output head of a Qwen2.5-0.5B-width model (hidden 896, vocabulary 151,936, float32
on CPU) scores one response of each length, forward and backward, at temperature 1.0:

- ``full``: the learner's computation before chunking, kept here as the baseline: the
  logits of every position, divided by the temperature, then ``gather - logsumexp``;
  autograd keeps its (tokens x vocabulary) tensors for the backward.
- ``chunked``: ``mapo_ray.learner.logprobs.chunked_token_logprobs`` with
  ``--chunk`` tokens per chunk (the default of ``learner.logprob_chunk_tokens``).

Each (variant, length) runs in a fresh process. Memory is the peak resident size of
its first forward and backward above what the process held before (the head weight
and the hidden states): the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``), which on CPU sees every allocation, torch's or not. It is
given twice: all of it, and without the head weight's gradient, the (vocabulary x
hidden) buffer that both variants must write (545 MB here). Time is the median of
``--repeats`` further runs, in wall and in CPU seconds of the process (which another
load on the machine moves less). Prints a table, then one JSON line with ``memory_ratio``
(full over chunked peak at the longest length, without the weight gradient),
``memory_ratio_with_weight_grad``, ``time_ratio`` (chunked over full wall seconds) and
``cpu_time_ratio``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mapo_ray.config import LearnerConfig
from mapo_ray.learner.logprobs import chunked_token_logprobs

HIDDEN, VOCAB = 896, 151_936
TEMPERATURE = 1.0
MIB = 2**20


def full_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(T,) log-probs from the (T, V) logits at once: the computation before chunking."""
    scaled = F.linear(hidden, weight).float() / TEMPERATURE
    return scaled.gather(-1, targets[:, None]).squeeze(-1) - scaled.logsumexp(-1)


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_one(variant: str, length: int, chunk: int, repeats: int) -> dict[str, float]:
    """Peak bytes of the first forward+backward above the inputs, and median seconds of ``repeats`` more."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.02)
    hidden = torch.randn(length, HIDDEN, generator=g).requires_grad_()
    targets = torch.randint(0, VOCAB, (length,), generator=g)
    upstream = torch.randn(length, generator=g)  # a loss that weights each token differently

    def step() -> None:
        weight.grad = hidden.grad = None
        if variant == "full":
            log_probs = full_logprobs(hidden, weight, targets)
        else:
            log_probs, _ = chunked_token_logprobs(hidden, weight, targets, TEMPERATURE, chunk)
        (log_probs * upstream).sum().backward()

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _proc_status("VmRSS")
    step()
    peak = _proc_status("VmHWM") - before
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    grad_bytes = weight.numel() * weight.element_size()
    return {
        "peak_bytes": peak,
        "peak_without_grad_bytes": peak - grad_bytes,
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
    }


def run_child(variant: str, length: int, chunk: int, repeats: int) -> dict[str, float]:
    """``measure_one`` in a fresh interpreter, so that no earlier run's memory is counted or reused."""
    command = [sys.executable, __file__, "--child", variant, "--lengths", str(length), "--chunk", str(chunk)]
    out = subprocess.run([*command, "--repeats", str(repeats)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048", help="response lengths, comma-separated")
    parser.add_argument("--chunk", type=int, default=LearnerConfig().logprob_chunk_tokens)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(measure_one(args.child, lengths[0], args.chunk, args.repeats)))
        return

    print(f"output head {VOCAB} x {HIDDEN} float32 on CPU, {torch.get_num_threads()} threads, chunk {args.chunk}")
    header = f"{'tokens':>6} | {'variant':>7} | {'peak MiB':>8} | {'no w.grad':>9} | {'seconds':>7} | {'CPU s':>6}"
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for length in lengths:
        for variant in ("full", "chunked"):
            result = rows[variant, length] = run_child(variant, length, args.chunk, args.repeats)
            print(
                f"{length:>6} | {variant:>7} | {result['peak_bytes'] / MIB:>8.0f} | "
                f"{result['peak_without_grad_bytes'] / MIB:>9.0f} | {result['seconds']:>7.2f} | "
                f"{result['cpu_seconds']:>6.2f}",
                flush=True,
            )
    longest = lengths[-1]
    full, chunked = rows["full", longest], rows["chunked", longest]
    print(
        json.dumps(
            {
                "benchmark": "logprob_memory",
                "tokens": longest,
                "chunk_tokens": args.chunk,
                "memory_ratio": round(full["peak_without_grad_bytes"] / chunked["peak_without_grad_bytes"], 2),
                "memory_ratio_with_weight_grad": round(full["peak_bytes"] / chunked["peak_bytes"], 2),
                "time_ratio": round(chunked["seconds"] / full["seconds"], 3),
                "cpu_time_ratio": round(chunked["cpu_seconds"] / full["cpu_seconds"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
