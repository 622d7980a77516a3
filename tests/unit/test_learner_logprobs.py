"""Chunked token log-probs: value, entropy and gradient equal the unchunked computation."""

from __future__ import annotations

import pytest
import torch

from mapo_ray.algo import entropy_from_logits
from mapo_ray.learner.logprobs import TokenLogProbHead, chunked_token_logprobs


def _full(hidden, weight, targets, temperature):
    """The unchunked definition, written independently: log_softmax of all logits at once."""
    logits = hidden @ weight.T / (temperature if temperature > 0 else 1.0)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), entropy_from_logits(logits)


def _inputs(tokens=37, hidden=16, vocab=101, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    upstream = torch.randn(tokens, generator=g, dtype=dtype)  # a loss that weights each token differently
    return h, w, y, upstream


@pytest.mark.parametrize("chunk", [1, 5, 16, 36, 37, 1000])  # 5 and 16 do not divide 37; 1000 > T
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_value_entropy_and_gradient_equal_the_unchunked_float64(chunk, temperature):
    h, w, y, upstream = _inputs()
    expected, expected_entropy = _full(h, w, y, temperature)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (h, w))

    lp, ent = chunked_token_logprobs(h, w, y, temperature, chunk, with_entropy=True)
    grads = torch.autograd.grad((lp * upstream).sum(), (h, w))

    assert lp.dtype == torch.float64 and lp.shape == (37,)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, expected_entropy.detach(), rtol=0, atol=1e-12)
    assert not ent.requires_grad
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunking_does_not_change_the_result():
    """Every chunk size gives the same float32 values and gradients (to rounding in the adds)."""
    h, w, y, upstream = _inputs(tokens=50, dtype=torch.float32, seed=1)
    results = []
    for chunk in (1, 7, 50):
        lp, _ = chunked_token_logprobs(h, w, y, 1.0, chunk)
        results.append((lp, *torch.autograd.grad((lp * upstream).sum(), (h, w))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_weights_match_the_bf16_head_then_float32_softmax():
    """A bf16 model: logits come out of the head in bf16 and the softmax runs in float32."""
    h, w, y, upstream = _inputs(tokens=20, hidden=32, vocab=64, dtype=torch.bfloat16, seed=2)
    logits = (h @ w.T).float()
    expected = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    expected_grads = torch.autograd.grad((expected * upstream.float()).sum(), (h, w))
    lp, _ = chunked_token_logprobs(h, w, y, 1.0, 6)
    grads = torch.autograd.grad((lp * upstream.float()).sum(), (h, w))
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_only_the_inputs_that_need_a_gradient_get_one():
    h, w, y, _ = _inputs()
    frozen = w.detach()
    lp, _ = chunked_token_logprobs(h, frozen, y, 1.0, 8)
    (grad_h,) = torch.autograd.grad(lp.sum(), (h,))
    expected, _ = _full(h, frozen, y, 1.0)
    torch.testing.assert_close(grad_h, torch.autograd.grad(expected.sum(), (h,))[0], rtol=0, atol=1e-12)


def test_no_token_still_gives_a_zero_weight_gradient():
    h, w, y, _ = _inputs()
    lp, _ = chunked_token_logprobs(h[:0], w, y[:0], 1.0, 8)
    (grad_w,) = torch.autograd.grad(lp.sum(), (w,))
    assert lp.shape == (0,) and grad_w.shape == w.shape and not grad_w.any()


def test_a_bad_chunk_size_or_a_head_with_bias_is_refused():
    h, w, y, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_token_logprobs(h, w, y, 1.0, 0)
    with pytest.raises(ValueError, match="learner.logprob_chunk_tokens"):
        TokenLogProbHead(torch.nn.Linear(4, 8, bias=False), 0)
    with pytest.raises(ValueError, match="without bias"):
        TokenLogProbHead(torch.nn.Linear(4, 8, bias=True), 16)
