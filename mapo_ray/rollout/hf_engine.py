"""``HFEngine``: a rollout engine on transformers ``generate`` (the CPU default; runs on GPU too).

One ``generate`` call samples all B x G responses of a batch: prompts are left-padded,
images go in as ``pixel_values`` / ``image_grid_thw`` (``mapo_ray.models.prepare_inputs``),
and ``num_return_sequences=G`` repeats each prompt G times after its images are encoded.

Sampling is done by this module, not by the checkpoint's generation defaults: a fresh
``GenerationConfig`` keeps only the eos and pad ids (the real Qwen2.5-VL checkpoint
ships ``repetition_penalty=1.05``, which would quietly change the policy), HF's own
warpers are neutral, and one logits processor turns the logits into the sampling
distribution (``sampling.sampling_logits``, temperature and top-p) and records each
sampled token's log-probability under the temperature-scaled distribution without the
top-p cut (``sampling.behaviour_logits``, the learner's definition), keeping one
``(N, V)`` step in memory rather than all steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from mapo_ray.models import prepare_inputs
from mapo_ray.rollout.sampling import behaviour_logits, response_end, sampling_logits
from mapo_ray.sync import GroupAddress, SyncPlan, WeightReceiver
from mapo_ray.types import Group, Prompt, Sample, SamplingParams, pil_image

logger = logging.getLogger(__name__)


class _SampledLogprobs(LogitsProcessor):
    """Last logits processor of one ``generate`` call: applies temperature and top-p (the
    token is drawn from the result) and records each drawn token's log-probability under
    the temperature-scaled logits without the top-p cut (``sampling.token_logprobs``).

    The token drawn at step t is only visible (as ``input_ids[:, -1]``) at step t + 1,
    so each call settles the previous step; ``collect`` settles the last one.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self._temperature = temperature
        self._top_p = top_p
        self._pending: torch.Tensor | None = None  # (N, V) log-probs of the unsettled step
        self._settled: list[torch.Tensor] = []  # one (N,) per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._settled.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = behaviour_logits(scores, self._temperature).log_softmax(dim=-1)
        return sampling_logits(scores, self._temperature, self._top_p)

    def collect(self, response_ids: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` float32 log-probs of ``response_ids`` ``(N, T)``, the generated tokens."""
        steps = response_ids.shape[1]
        # generate may run (and then undo) steps past the end when it checks stops lazily.
        settled = self._settled[:steps]
        if len(settled) < steps:
            assert self._pending is not None and len(settled) == steps - 1
            settled.append(self._pending.gather(-1, response_ids[:, -1:]).squeeze(-1))
        return torch.stack(settled, dim=1)


class HFEngine:
    """Rollout engine on a Hugging Face causal LM or Qwen2.5-VL checkpoint folder (one sync rank).

    Args:
        model_path: a folder ``from_pretrained`` loads (e.g. ``mapo_ray.models.tiny_vl_path()``).
        device: where the model runs.
        dtype: parameter dtype; None keeps the checkpoint's.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.sync_ranks = 1
        config = AutoConfig.from_pretrained(model_path)
        self.is_multimodal = hasattr(config, "vision_config")
        model_cls = AutoModelForImageTextToText if self.is_multimodal else AutoModelForCausalLM
        self.model = model_cls.from_pretrained(model_path, dtype=dtype or "auto").to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.image_processor = AutoImageProcessor.from_pretrained(model_path) if self.is_multimodal else None
        defaults = self.model.generation_config
        eos = defaults.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        if not self.eos_ids:
            raise ValueError(f"{model_path}: generation_config.json names no eos_token_id; responses would never stop")
        pad = defaults.pad_token_id if defaults.pad_token_id is not None else self.tokenizer.pad_token_id
        self._generation_defaults = dict(eos_token_id=sorted(self.eos_ids), pad_token_id=pad)
        self._weight_version: int | None = 0
        self._receiver: WeightReceiver | None = None

    @property
    def weight_version(self) -> int | None:
        return self._weight_version

    def _encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        if self.image_processor is None:
            with_images = [p.uid for p in prompts if p.images]
            if with_images:
                raise ValueError(f"prompt(s) {with_images[:5]} carry images, but the model has no vision tower")
            encoded = self.tokenizer([p.text for p in prompts], padding=True, padding_side="left", return_tensors="pt")
            return dict(encoded)
        images = [[pil_image(im, f"prompt {p.uid!r} image {j}") for j, im in enumerate(p.images)] for p in prompts]
        return prepare_inputs(self.tokenizer, self.image_processor, [p.text for p in prompts], images)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        """Sample ``params.n`` responses for each of the B ``prompts``; one group per prompt, in order."""
        if self._weight_version is None:
            raise RuntimeError("the last weight update failed part-way; a full update must load before sampling")
        if not prompts:
            return []
        inputs = {k: v.to(self.device) for k, v in self._encode(prompts).items()}
        recorder = _SampledLogprobs(params.temperature, params.top_p)
        # HF's own warpers stay neutral: the recorder applies temperature and top-p itself.
        sampling = {} if params.greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        config = GenerationConfig(
            **self._generation_defaults,
            **sampling,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            stop_strings=list(params.stop) or None,
            return_dict_in_generate=True,
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                **inputs,
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
                tokenizer=self.tokenizer if params.stop else None,
            )
        prompt_len = inputs["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:]
        logprobs = recorder.collect(generated).cpu()
        generated = generated.cpu()
        prompt_ids = [
            row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu())
        ]

        groups = []
        for b, prompt in enumerate(prompts):
            samples = []
            for i in range(b * params.n, (b + 1) * params.n):
                tokens = generated[i].tolist()
                length, reason = response_end(tokens, self.eos_ids, params.stop, self._decode)
                samples.append(
                    Sample(
                        group_uid=prompt.uid,
                        prompt_ids=prompt_ids[b],
                        response_ids=tokens[:length],
                        response_logprobs=logprobs[i, :length].tolist(),
                        response_text=self._decode(tokens[:length]),
                        finish_reason=reason,
                        weight_version=self._weight_version,
                    )
                )
            groups.append(Group(uid=prompt.uid, answer=prompt.answer, samples=samples))
        return groups

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy each ``(name, tensor)`` into the parameter or buffer of that name, then report ``version``.

        Names are the model's own ``state_dict`` names (a tied weight answers to either
        name). Raises ``ValueError`` naming the first unknown name or mismatched shape;
        the engine then has no version until a full update loads.
        """
        self._weight_version = None
        targets = self.model.state_dict(keep_vars=True)
        count = 0
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                raise ValueError(f"load_weights: the model has no parameter or buffer {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(
                    f"load_weights: {name!r} has shape {list(target.shape)}, the update gives {list(tensor.shape)}"
                )
            target.data.copy_(tensor)
            count += 1
        self._weight_version = version
        logger.info("loaded %d tensors, weight version %d", count, version)

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        """Join the weight-sync group at ``address`` as rank ``first_rank`` (blocks until all ranks have)."""
        if self._receiver is not None:
            self._receiver.close()  # a group is rebuilt after a failure; leave the old one first
        device = self.device if address.backend == "nccl" else torch.device("cpu")
        self._receiver = WeightReceiver.join(address, first_rank, device)

    def receive_weights(self, plan: SyncPlan) -> int:
        """Receive update ``plan`` over the joined group and load it; returns its version."""
        if self._receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        return self._receiver.receive(plan, lambda weights: self.load_weights(weights, plan.version))
