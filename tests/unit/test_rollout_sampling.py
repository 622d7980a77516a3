"""The sampling distribution, per-token log-probs and response ends (pure functions)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, TemperatureLogitsWarper, TopPLogitsWarper

from mapo_ray.models import tiny_text_path
from mapo_ray.rollout import (
    behaviour_logits,
    response_end,
    sampling_logits,
    token_logprobs,
    vllm_logprobs_mode,
)
from mapo_ray.types import derive_seed


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.99), (0.5, 0.95)])
def test_sampling_logits_equal_hf_warpers(temperature, top_p):
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(sampling_logits(logits, temperature, top_p), expected, rtol=0, atol=0)


def test_greedy_and_full_nucleus_cut_nothing():
    logits = torch.randn(3, 50)
    assert sampling_logits(logits, 0.0, 0.1) is logits  # greedy reports the plain softmax
    assert torch.isfinite(sampling_logits(logits, 1.0, 1.0)).all()


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=30),
    top_p=st.floats(0.01, 0.999),
    temperature=st.floats(0.2, 3.0),
)
def test_nucleus_is_the_smallest_top_set_with_mass_top_p(probs, top_p, temperature):
    logits = torch.tensor(probs, dtype=torch.float64).log()
    kept = torch.isfinite(sampling_logits(logits, temperature, top_p))
    p = (logits / temperature).softmax(-1)
    # Every kept token is at least as likely as every cut one, the kept mass reaches
    # top_p, and without its least likely member it would not.
    assert kept.any()
    if (~kept).any():
        assert p[kept].min() >= p[~kept].max()
    mass = p[kept].sum().item()
    assert mass >= top_p - 1e-9
    assert mass - p[kept].min().item() < top_p + 1e-9


def test_token_logprobs_are_temperature_scaled_and_never_truncated():
    """The recorded log-prob is the learner's: log-softmax of logits / T over the whole
    vocabulary, whatever top-p the token was drawn with."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 40, generator=g)
    tokens = torch.randint(0, 40, (2, 5), generator=g)
    out = token_logprobs(logits, tokens, 0.8)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    full = (logits / 0.8).log_softmax(-1)
    torch.testing.assert_close(out, full.gather(-1, tokens[..., None])[..., 0])
    torch.testing.assert_close(behaviour_logits(logits, 0.8), logits / 0.8)
    assert behaviour_logits(logits, 0.0) is logits  # greedy: the plain softmax
    # A token outside a tight nucleus could never be drawn, but its recorded value is finite,
    # and differs from the truncated distribution's by the log of the nucleus mass.
    assert torch.isfinite(out).all()
    top = logits.argmax(-1)
    truncated = sampling_logits(logits, 0.8, 0.01).log_softmax(-1).gather(-1, top[..., None])[..., 0]
    assert (truncated == 0).all() and (token_logprobs(logits, top, 0.8) < 0).all()


def test_vllm_logprobs_mode_is_exact_where_vllm_allows():
    assert vllm_logprobs_mode(1.0) == "raw_logprobs"  # raw = temperature-scaled at T = 1
    assert vllm_logprobs_mode(0.0) == "raw_logprobs"  # greedy: the plain softmax
    assert vllm_logprobs_mode(0.7) == "processed_logprobs"  # exact at top_p 1 only


# --- response_end ------------------------------------------------------------------

PIECES = {1: "The", 2: " answer", 3: " is", 4: " </", 5: "think", 6: ">", 7: " 42", 8: "!", 9: "<eos>"}


def join(ids) -> str:
    return "".join(PIECES[i] for i in ids)


@pytest.mark.parametrize(
    ("tokens", "stop", "expected"),
    [
        ([1, 2, 3, 7], (), (4, "length")),
        ([1, 2, 9, 3, 9], (), (3, "stop")),  # the first eos ends it, eos kept
        ([1, 2, 3, 4, 5, 6, 7], ("</think>",), (6, "stop")),  # a stop string spanning three tokens
        ([1, 2, 3, 4, 5, 6, 7], ("answer is",), (3, "stop")),
        ([1, 2, 3, 4, 5, 6, 7], ("nope", " 42"), (7, "stop")),
        ([1, 2, 9, 4, 5, 6], ("</think>",), (3, "stop")),  # eos before the stop string
        ([1, 4, 5, 6, 9], ("</think>",), (4, "stop")),  # stop string before the eos
        ([1, 2], ("xyz",), (2, "length")),
        ([], ("x",), (0, "length")),
    ],
)
def test_response_end(tokens, stop, expected):
    assert response_end(tokens, {9}, stop, join) == expected


def test_response_end_inside_one_token_with_the_real_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_path())
    ids = tokenizer.encode("The answer is \\boxed{42} and more text after it")
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    length, reason = response_end(ids, {tokenizer.eos_token_id}, ("{42}",), decode)
    assert reason == "stop"
    assert "{42}" in decode(ids[:length]) and "{42}" not in decode(ids[: length - 1])
    eos_ids = ids[:3] + [tokenizer.eos_token_id] + ids[3:]
    assert response_end(eos_ids, {tokenizer.eos_token_id}, ("{42}",), decode) == (4, "stop")


def test_derive_seed_is_stable_and_spread():
    seeds = {derive_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert derive_seed(3, 5) == derive_seed(3, 5)
    assert all(0 <= s < 2**32 for s in seeds)
