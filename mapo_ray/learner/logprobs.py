"""Log-probabilities of response tokens under a policy: the one forward pass of the learner.

Definition (shared with the sampler in ``mapo_ray.rollout.sampling``): the log-softmax
of ``logits / temperature`` at each response position, temperature being the rollout
sampling temperature (0, greedy, means the plain softmax). Top-p does not enter: a
token the sampler kept inside its nucleus could fall just outside the learner's, and a
-inf log-prob would turn the PPO ratio into NaN. The sampler records this same quantity
for each token it draws from its nucleus (``HFEngine`` at any top_p; ``VLLMEngine``
exactly at temperature 1, see ``mapo_ray.rollout.sampling``), so at equal weights
``actor/rollout_logprob_abs_diff`` is 0 to float precision.

The output head runs in chunks of response tokens (``learner.logprob_chunk_tokens``):
a micro-batch of 2,048-token responses against a 152k-word vocabulary would otherwise
hold several (tokens x vocabulary) float32 tensors, about 1.2 GB each per sequence, in
the forward and again in the backward. Only response positions go through the head;
prompt positions are never projected onto the vocabulary.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from mapo_ray.learner.collate import PolicyInputs
from mapo_ray.models.inputs import IMAGE_TOKEN_TYPE


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """Autograd of ``chunked_token_logprobs``: the backward recomputes each chunk's logits.

    Saving every chunk's softmax for the backward would bring back the whole
    (tokens x vocabulary) tensor; recomputing costs one more head matmul per chunk.
    The weight's gradient is accumulated in place over the chunks (in the weight's
    dtype, as autograd accumulates a parameter used several times), so a single
    weight-sized buffer exists however many chunks there are.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens, with_entropy):
        scale = 1.0 / temperature if temperature > 0 else 1.0
        count = hidden.shape[0]
        # The softmax runs in float32 at least (bf16 logits are cast up, as before the chunking).
        dtype = torch.promote_types(weight.dtype, torch.float32)
        log_probs = torch.empty(count, dtype=dtype, device=hidden.device)
        log_z = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for start in range(0, count, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight).to(dtype).mul_(scale)
            picked = logits.gather(-1, targets[rows, None]).squeeze(-1)
            peak = logits.amax(-1, keepdim=True)
            if with_entropy:
                # entropy = log Z - E_p[logit], taken before the logits are overwritten below.
                probs = (logits - peak).exp_()
                # A batched dot product: no third chunk-sized tensor for the products.
                expected_logit = (probs[:, None, :] @ logits[:, :, None]).view(-1) / probs.sum(-1)
                del probs
            # exp in place: one chunk-sized tensor alive instead of two.
            z = logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))
            log_z[rows] = z
            log_probs[rows] = picked - z
            if with_entropy:
                entropy[rows] = z - expected_logit
            # Freed before the next chunk's logits are allocated, not when the name is rebound.
            del logits
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.scale, ctx.chunk_tokens = scale, chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, targets, log_z = ctx.saved_tensors
        scale = ctx.scale
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            g = grad_log_probs[rows] * scale
            # d log p(y) / d (h W^T)_v = scale * (1[v = y] - p_v), built in place from the logits.
            grad_logits = F.linear(hidden[rows], weight).to(log_z.dtype).mul_(scale)
            grad_logits.sub_(log_z[rows, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[rows, None], g[:, None])
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if ctx.needs_input_grad[1]:
                if grad_weight is None:  # the first chunk's product is the buffer: no zero fill
                    grad_weight = grad_logits.T @ hidden[rows]
                else:
                    grad_weight.addmm_(grad_logits.T, hidden[rows])
            del grad_logits
        if ctx.needs_input_grad[1] and grad_weight is None:
            # No token to score: still a gradient, so that ZeRO's hooks fire as on other ranks.
            grad_weight = torch.zeros_like(weight)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of each target token under ``softmax(hidden @ weight.T / temperature)``.

    The value and the gradient are those of ``log_softmax(logits / t).gather(targets)``
    on the full logits, but at most ``chunk_tokens`` rows of logits exist at once, in
    the forward and in the backward.

    Args:
        hidden: ``(T, H)`` final hidden states, one row per token to score.
        weight: ``(V, H)`` output-embedding (LM head) weight; the head has no bias.
        targets: ``(T,)`` int64 token ids; row t scores ``targets[t]``.
        temperature: > 0 divides the logits; 0 (greedy sampling) means 1.
        chunk_tokens: rows per chunk, > 0.
        with_entropy: also return each row's entropy (no gradient).

    Returns:
        ``(T,)`` log-probs with gradients to ``hidden`` and ``weight``, and ``(T,)``
        entropies or None; float32, or float64 for float64 inputs.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    log_probs, entropy = _ChunkedTokenLogProbs.apply(hidden, weight, targets, temperature, chunk_tokens, with_entropy)
    return log_probs, entropy if with_entropy else None


class TokenLogProbHead(nn.Module):
    """The LM head applied as ``chunked_token_logprobs``, as a module of its own.

    It owns no parameter: the head's weight is registered with ZeRO-3 as an external
    parameter of this module, so DeepSpeed gathers it for this module's forward and
    backward, as it would for the head's own forward (other stages ignore it).
    """

    def __init__(self, head: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"chunked log-probs need an output layer without bias; {type(head).__name__} has one")
        if chunk_tokens <= 0:
            raise ValueError(f"learner.logprob_chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(T, H)`` hidden states and ``(T,)`` targets to ``(T,)`` log-probs (and entropies)."""
        return chunked_token_logprobs(hidden, weight, targets, temperature, self.chunk_tokens, with_entropy)


class ResponseLogProbs(nn.Module):
    """Wraps a Hugging Face causal LM (text or Qwen2.5-VL) so that its forward returns
    the response tokens' log-probs and, optionally, entropies.

    DeepSpeed wraps this module, so the whole computation is one engine forward (ZeRO-3
    gathers each submodule's parameters as it runs). ``self.model`` keeps its own
    parameter names; it is what gets synced and exported. Its decoder runs without its
    LM head; ``self.head`` applies the head to the response positions in chunks.

    Two things the HF forward would get wrong are done here. Positions: it counts
    left padding as tokens unless told otherwise, so they come from the attention mask
    (and, for Qwen2.5-VL, ``get_rope_index``'s 3-D rule). Image slots: it finds them by
    token id, but a sampled image-pad token in a response is text, so the image
    features go into the slots ``mm_token_type_ids`` marks.
    """

    def __init__(self, model: nn.Module, temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.head = TokenLogProbHead(model.get_output_embeddings(), chunk_tokens)
        vision = getattr(model.config, "vision_config", None)
        # A blank 2x2-patch image (one merged token) for micro-batches without images.
        self._blank_image = None if vision is None else (
            torch.zeros(4, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2),
            torch.tensor([[1, 2, 2]]),
        )

    def forward(self, inputs: PolicyInputs, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``log_probs`` (n, R) float32, 0 at padding, with grad; and ``entropy``
        (n, R) float32 without grad (0 at padding) when ``with_entropy``, else None."""
        width_r = inputs.response_ids.shape[1]
        if self._blank_image is None:
            positions = (inputs.attention_mask.cumsum(-1) - 1).clamp_min(0)
            kwargs = {"input_ids": inputs.input_ids}
        else:
            positions, _ = self.model.model.get_rope_index(
                inputs.input_ids,
                inputs.mm_token_type_ids,
                image_grid_thw=inputs.image_grid_thw,
                attention_mask=inputs.attention_mask,
            )
            kwargs = {"inputs_embeds": self._embed_with_images(inputs)}
        hidden = self.model.model(
            attention_mask=inputs.attention_mask, position_ids=positions, use_cache=False, **kwargs
        ).last_hidden_state
        # Position P-1+t predicts response token t; padding is never scored.
        mask = inputs.response_mask
        scored = hidden[:, -width_r - 1 : -1][mask]
        weight = self.model.get_output_embeddings().weight
        values, entropies = self.head(scored, weight, inputs.response_ids[mask], self.temperature, with_entropy)
        log_probs = values.new_zeros(mask.shape).masked_scatter(mask, values)
        entropy = None if entropies is None else entropies.new_zeros(mask.shape).masked_scatter(mask, entropies)
        return log_probs, entropy

    def _embed_with_images(self, inputs: PolicyInputs) -> torch.Tensor:
        """(n, P + R, hidden) token embeddings with the image features in the image slots.

        The vision tower runs in every forward, on the blank image when the micro-batch
        has none: data-parallel ranks must touch the same parameters in the same order
        (ZeRO-3 gathers each module as it runs; ZeRO-2 reduces every gradient), and a
        rank holding only text would otherwise skip the tower. The blank one adds 0.
        """
        embeds = self.model.get_input_embeddings()(inputs.input_ids)
        if inputs.pixel_values is None:
            pixel_values, grid = (t.to(embeds.device) for t in self._blank_image)
        else:
            pixel_values, grid = inputs.pixel_values, inputs.unique_grid_thw
        # One tuple entry per distinct image; the samples that share an image share its features.
        per_image = self.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        if inputs.pixel_values is None:
            return embeds + 0.0 * torch.cat(per_image).sum()
        features = torch.cat([per_image[i] for i in inputs.image_source.tolist()])
        slots = (inputs.mm_token_type_ids == IMAGE_TOKEN_TYPE).unsqueeze(-1)
        return embeds.masked_scatter(slots, features.to(embeds.dtype))
