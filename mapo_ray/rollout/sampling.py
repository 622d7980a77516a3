"""The sampling distribution and the end of a response, as pure functions (no Ray).

Which log-probability a sample carries: that of the distribution its token was drawn
from. Logits are divided by the temperature, then every token outside the top-p
nucleus is set to -inf, so the softmax renormalises over the nucleus. This is what
vLLM reports with ``logprobs_mode="processed_logprobs"`` and what ``HFEngine`` samples
from. Greedy decoding (temperature 0) reports the plain softmax of the logits, as vLLM
does for greedy requests.

The learner recomputes both sides of its PPO ratio itself, with the temperature but
without the top-p cut (a token outside its own nucleus would get -inf); these sampler
values are compared with its own only as a metric (``actor/rollout_logprob_abs_diff``),
and equal them at top-p 1 and for greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch

from mapo_ray.rollout.types import FinishReason


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


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Log-probability of each token under the sampling distribution of its logits.

    Args:
        logits: ``(N, L, V)`` logits; ``logits[:, t]`` predicts ``token_ids[:, t]``.
        token_ids: ``(N, L)`` int64.

    Returns:
        ``(N, L)`` float32; -inf for a token outside its nucleus.
    """
    logprobs = sampling_logits(logits.float(), temperature, top_p).log_softmax(dim=-1)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


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


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for prompt ``index`` of a batch sampled with ``seed``.

    Hashing (rather than ``seed + index``) keeps neighbouring batch seeds from sharing
    prompt seeds; vLLM adds the sample index to it for each of the G samples.
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
