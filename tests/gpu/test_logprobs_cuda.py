"""Chunked token log-probs on a CUDA device: bf16 values and gradients, and the memory they save."""

from __future__ import annotations

import pytest
import torch

from mapo_ray.learner.logprobs import chunked_token_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]

# Qwen2.5-VL-7B's output head, one 2,048-token response, in bf16 as the learner runs it.
HIDDEN, VOCAB, TOKENS = 3584, 152_064, 2048


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, device="cuda") * 0.02).bfloat16().requires_grad_()
    hidden = torch.randn(TOKENS, HIDDEN, generator=g, device="cuda").bfloat16().requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g, device="cuda")
    upstream = torch.randn(TOKENS, generator=g, device="cuda")
    return hidden, weight, targets, upstream


def _full(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _peak_above_start(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def test_chunked_equals_full_in_bf16_and_holds_a_fraction_of_its_memory():
    hidden, weight, targets, upstream = _inputs()
    results, peaks = {}, {}
    for name, fn in (
        ("full", lambda: _full(hidden, weight, targets)),
        ("chunked", lambda: chunked_token_logprobs(hidden, weight, targets, 1.0, 512)[0]),
    ):

        def step(fn=fn, name=name):
            log_probs = fn()
            grads = torch.autograd.grad((log_probs * upstream).sum(), (hidden, weight))
            results[name] = (log_probs.detach(), *grads)

        peaks[name] = _peak_above_start(step)
    full, chunked = results["full"], results["chunked"]
    torch.testing.assert_close(chunked[0], full[0], rtol=0, atol=1e-3)
    for got, want in zip(chunked[1:], full[1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-3)
    # The full path holds several (2048 x 152k) float32 tensors (1.2 GB each); the chunked one
    # holds 512-row chunks beside the two gradients both must return.
    assert peaks["chunked"] * 2 < peaks["full"], peaks
