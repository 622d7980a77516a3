"""Log-probabilities of response tokens under a policy: the one forward pass of the learner.

Definition (shared with the sampler in ``mapo_ray.rollout.sampling``): the log-softmax
of ``logits / temperature`` at each response position, temperature being the rollout
sampling temperature (0, greedy, means the plain softmax). The learner does not apply
top-p: a token the sampler kept inside its nucleus could fall just outside the
learner's, and a -inf log-prob would turn the PPO ratio into NaN. With ``top_p = 1``
the sampler reports the same quantity.
"""

from __future__ import annotations

import torch
from torch import nn

from mapo_ray.algo import entropy_from_logits
from mapo_ray.learner.collate import PolicyInputs
from mapo_ray.models.inputs import IMAGE_TOKEN_TYPE
from mapo_ray.rollout.sampling import sampling_logits


class ResponseLogProbs(nn.Module):
    """Wraps a Hugging Face causal LM (text or Qwen2.5-VL) so that its forward returns
    the response tokens' log-probs and, optionally, entropies.

    DeepSpeed wraps this module, so the whole computation is one engine forward (ZeRO-3
    gathers each submodule's parameters as it runs). ``self.model`` keeps its own
    parameter names; it is what gets synced and exported.

    Two things the HF forward would get wrong are done here. Positions: it counts
    left padding as tokens unless told otherwise, so they come from the attention mask
    (and, for Qwen2.5-VL, ``get_rope_index``'s 3-D rule). Image slots: it finds them by
    token id, but a sampled image-pad token in a response is text, so the image
    features go into the slots ``mm_token_type_ids`` marks.
    """

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
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
        # R + 1 positions from the end: columns P-1 .. P+R-1; the last predicts nothing.
        logits = self.model(
            attention_mask=inputs.attention_mask,
            position_ids=positions,
            logits_to_keep=width_r + 1,
            use_cache=False,
            **kwargs,
        ).logits[:, :-1]
        scaled = sampling_logits(logits.float(), self.temperature, 1.0)
        # gather - logsumexp keeps one (n, R, V) tensor alive instead of two.
        log_probs = scaled.gather(-1, inputs.response_ids.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
        log_probs = log_probs.masked_fill(~inputs.response_mask, 0.0)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(scaled.detach()).masked_fill(~inputs.response_mask, 0.0)
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
