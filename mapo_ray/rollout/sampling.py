"""The sampling distribution, the recorded log-probability and the end of a response,
as pure functions (no Ray).

A token is drawn from the sampling distribution (``sampling_logits``): logits divided
by the temperature, every token outside the top-p nucleus set to -inf, so the softmax
renormalises over the nucleus.

The log-probability a sample carries (``token_logprobs``) is that of its token under the
temperature-scaled distribution WITHOUT the top-p cut (``behaviour_logits``): exactly
what the learner computes for both sides of its PPO ratio, so that at equal weights the
two agree to float precision (``actor/rollout_logprob_abs_diff`` is 0) whatever top_p
is. Greedy decoding (temperature 0) records the plain softmax of the logits.

vLLM (``logprobs_mode``, checked in its source, ``vllm/v1/sample/sampler.py`` and the
v2 ``vllm/v1/worker/gpu/sample/sampler.py``) offers "raw_logprobs" (log-softmax of the
model's logits before any processing: no penalties, no temperature, no top-k/top-p),
"processed_logprobs" (after logit bias, penalties, temperature, min-p AND top-k/top-p),
and, in v1 only, "raw_logits" / "processed_logits" (the same, unnormalised). None is
"temperature-scaled, not truncated" at every temperature. ``vllm_logprobs_mode`` picks
the exact one where it exists: "raw_logprobs" at training temperature 1 (the paper's;
mapo-ray sets no penalty or bias, so raw = temperature-scaled) and for greedy decoding;
otherwise "processed_logprobs", exact at top_p 1 and, at top_p < 1, higher than the
learner's by the log of the nucleus mass (the same for every token of a step).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from mapo_ray.types import FinishReason


def sampling_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Logits of the distribution a token is sampled from.

    Args:
        logits: ``(..., V)`` float logits of the next token.
        temperature: > 0 divides the logits; 0 (greedy) returns ``logits`` unchanged.
        top_p: in (0, 1]. Tokens are sorted by probability, ascending; those whose
            cumulative probability is at most ``1 - top_p`` get -inf (the most likely
            token always stays). 1 cuts nothing.

    Returns:
        ``(..., V)`` tensor of ``logits``'s dtype.
    """
    if temperature == 0:
        return logits
    scaled = logits / temperature
    if top_p >= 1:
        return scaled
    ascending, order = scaled.sort(dim=-1)
    cut = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    cut[..., -1] = False
    return scaled.masked_fill(cut.scatter(-1, order, cut), float("-inf"))


def behaviour_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits of the distribution whose log-probabilities a sample records: divided by the
    temperature (> 0), with no top-p cut; the logits unchanged for greedy (0)."""
    return logits if temperature == 0 else logits / temperature


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The recorded log-probability of each token: under ``behaviour_logits`` of its logits.

    Args:
        logits: ``(N, L, V)`` logits; ``logits[:, t]`` predicts ``token_ids[:, t]``.
        token_ids: ``(N, L)`` int64.

    Returns:
        ``(N, L)`` float32, finite for finite logits (top-p never enters).
    """
    logprobs = behaviour_logits(logits.float(), temperature).log_softmax(dim=-1)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def vllm_logprobs_mode(temperature: float) -> str:
    """vLLM's ``logprobs_mode`` for an engine that samples training rollouts at ``temperature``.

    "raw_logprobs" where it is the recorded definition exactly (temperature 1, or greedy),
    else "processed_logprobs" (exact at top_p 1; see the module docstring)."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def response_end(
    token_ids: Sequence[int],
    eos_ids: Collection[int],
    stop: Sequence[str],
    decode: Callable[[Sequence[int]], str],
) -> tuple[int, FinishReason]:
    """Where a generated token sequence ends, and why.

    The response ends after its first eos token, or after the token that completes the
    first occurrence of a stop string in its decoded text, whichever comes first; else
    it runs to the end (``"length"``). Tokens past the end are padding or were sampled
    after the response was over.

    Returns:
        ``(length, reason)``: the response is ``token_ids[:length]``.
    """
    length, reason = len(token_ids), "length"
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            length, reason = index + 1, "stop"
            break
    if stop and any(s in decode(token_ids[:length]) for s in stop):
        # Containment only grows with the prefix, so bisect for the shortest one.
        low, high = 1, length
        while low < high:
            mid = (low + high) // 2
            if any(s in decode(token_ids[:mid]) for s in stop):
                high = mid
            else:
                low = mid + 1
        length, reason = low, "stop"
    return length, reason

