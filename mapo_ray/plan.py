"""The memory plan of a run, before it starts: ``python -m mapo_ray.plan --preset NAME``.

For the learner (per rank) and the rollout actors (per GPU) it prints the expected peak
memory by part, checks it against the GPUs the config asks for, and names the setting
to change when it does not fit. Where a learner and a rollout actor share a GPU
(fractional ``trainer.gpus_per_learner`` / ``rollout.num_gpus_per_actor``) it also
checks what the two hold at the same time. ``--json`` prints the same as one object.
Exit status: 0 when everything fits, 1 when something does not, 2 on a config error.

Every number is arithmetic on the model's exact parameter counts (the Hugging Face
model instantiated on the meta device, so nothing is allocated) and its dimensions;
the formulas are in the docstrings of the functions below. Sizes are bytes; the
printed numbers are GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapo_ray.config import PRESETS, TINY_VL, Config, ConfigError, load_config

GIB = 2**30

# CUDA context, cuBLAS/NCCL workspaces, DeepSpeed's communication buckets (ZeRO-1/2
# reduce a 5e8-element bucket, 1 GB in bf16) and caching-allocator fragmentation.
LEARNER_CUDA_ALLOWANCE = 3 * GIB
# What vLLM counts as non-torch memory inside its budget: CUDA context and NCCL.
VLLM_NON_TORCH = 1 * GIB
# CUDA graphs, captured after the KV cache is sized, so outside the budget (none when
# rollout.enforce_eager).
VLLM_CUDA_GRAPHS = GIB // 2
# ZeRO-3 makes the fp32 gradient of one optimizer sub-group at a time (DeepSpeed's
# zero_optimization.sub_group_size default).
ZERO3_SUB_GROUP_PARAMS = 10**9
# vLLM blocks KV memory in pages of this many tokens.
VLLM_BLOCK_TOKENS = 16


class PlanError(ValueError):
    """A model the plan cannot size (no config to read)."""


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class VisionShape:
    """The dimensions of a Qwen2.5-VL vision tower."""

    depth: int
    hidden_size: int
    intermediate_size: int
    patch_size: int
    spatial_merge_size: int


@dataclass(frozen=True)
class ModelShape:
    """Exact parameter counts and the decoder dimensions the formulas use."""

    name: str
    source: str
    total_params: int
    vision_params: int
    # Parameters one module holds itself: what ZeRO-3 gathers at once (the embedding).
    largest_module_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    checkpoint_bytes_per_param: int
    vision: VisionShape | None


def _builtin_qwen25vl(text: dict[str, Any], out_hidden: int, tied: bool) -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_chans=3,
        out_hidden_size=out_hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
    )
    common = dict(
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    return Qwen2_5_VLConfig(
        text_config={**common, **text},
        vision_config=vision,
        tie_word_embeddings=tied,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        dtype="bfloat16",
    )


# The public config.json values of the two Qwen2.5-VL sizes the presets use, so that a
# plan needs no download.
BUILTIN_CONFIGS: dict[str, Callable[[], Any]] = {
    "Qwen/Qwen2.5-VL-7B-Instruct": lambda: _builtin_qwen25vl(
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        out_hidden=3584,
        tied=False,
    ),
    "Qwen/Qwen2.5-VL-3B-Instruct": lambda: _builtin_qwen25vl(
        dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
        ),
        out_hidden=2048,
        tied=True,
    ),
}


def model_config(model: str) -> tuple[Any, str]:
    """The Hugging Face config of ``trainer.model`` and where it came from.

    Looks in order at: "tiny-vl" (built offline into the cache), a local folder, the
    Hugging Face cache (never the network), the built-in table.

    Raises:
        PlanError: for a model found nowhere, saying how to make it available.
    """
    from transformers import AutoConfig

    if model == TINY_VL:
        from mapo_ray.models import tiny_vl_path

        return AutoConfig.from_pretrained(tiny_vl_path()), "mapo_ray.models"
    if Path(model).is_dir():
        return AutoConfig.from_pretrained(model, local_files_only=True), "local folder"
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), "Hugging Face cache"
    except OSError:
        pass
    if model in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[model](), "built-in config"
    raise PlanError(
        f"no config for model {model!r}: it is not a local folder, not in the Hugging Face cache and not "
        f"built in ({', '.join(BUILTIN_CONFIGS)}); download it (`hf download {model}`) or set "
        "trainer.model to its folder"
    )


def model_shape(config: Any, name: str, source: str) -> ModelShape:
    """Counts ``config``'s parameters exactly by building the model on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    multimodal = hasattr(config, "vision_config")
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    with torch.device("meta"):
        model = model_cls.from_config(config)
    # parameters() yields a tied embedding once.
    total = sum(p.numel() for p in model.parameters())
    visual = getattr(getattr(model, "model", None), "visual", None)
    vision_params = 0 if visual is None else sum(p.numel() for p in visual.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = str(getattr(config, "dtype", None) or getattr(text, "dtype", None) or "bfloat16")
    vision = None
    if multimodal:
        v = config.vision_config
        vision = VisionShape(v.depth, v.hidden_size, v.intermediate_size, v.patch_size, v.spatial_merge_size)
    return ModelShape(
        name=name,
        source=source,
        total_params=total,
        vision_params=vision_params,
        largest_module_params=largest,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        checkpoint_bytes_per_param=4 if "float32" in dtype else 2,
        vision=vision,
    )


def load_shape(model: str) -> ModelShape:
    """``model_shape`` of ``trainer.model``, its config found by ``model_config``."""
    config, source = model_config(model)
    return model_shape(config, model, source)


# ----------------------------------------------------------------------------- learner parts


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of the policy's weights, gradients and optimizer states."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def model_states(
    total_params: int,
    trainable_params: int,
    largest_module_params: int,
    *,
    zero_stage: int,
    world_size: int,
    bf16: bool,
) -> ModelStates:
    """Bytes per rank of weights, gradients and AdamW states under ZeRO ``zero_stage``.

    bf16 (DeepSpeed mixed precision), per trainable parameter, 20 bytes:

    - weights: 2 (the bf16 module the forward runs);
    - gradients: 2 (bf16, what backward writes) + 4 (the fp32 copy the optimizer steps
      on: DeepSpeed casts the gradient partition to fp32 before the step);
    - optimizer: 4 (fp32 master weights) + 8 (AdamW's fp32 exp_avg and exp_avg_sq).

    fp32: weights 4, gradients 4, optimizer 8, plus a 4-byte master copy under ZeRO 1-3
    (DeepSpeed clones the flat fp32 partition even when the module is fp32; at stage 0
    torch's AdamW steps the parameters themselves). A frozen parameter holds its weight
    only.

    What ZeRO shards over ``world_size`` ranks: stage 1 the optimizer and the fp32
    gradient copy; stage 2 also the bf16 gradients; stage 3 also the weights, plus the
    largest module gathered whole (weight and gradient, as DeepSpeed's estimator counts
    it), and the fp32 gradient copy exists one sub-group (1e9 elements) at a time.
    """
    w = 2 if bf16 else 4
    n = world_size
    shard = {name: zero_stage >= stage for name, stage in (("optim", 1), ("grads", 2), ("weights", 3))}

    def per_rank(params: int, sharded: bool) -> float:
        return params / n if sharded else params

    weights = w * per_rank(total_params, shard["weights"])
    gradients = w * per_rank(trainable_params, shard["grads"])
    if bf16:
        fp32_grad_params = per_rank(trainable_params, shard["optim"])
        if zero_stage == 3:
            fp32_grad_params = min(fp32_grad_params, ZERO3_SUB_GROUP_PARAMS)
        gradients += 4 * fp32_grad_params
    master = 4 if bf16 or zero_stage >= 1 else 0
    optimizer = (master + 8) * per_rank(trainable_params, shard["optim"])
    if zero_stage == 3:
        weights += w * largest_module_params
        gradients += w * largest_module_params
    return ModelStates(int(weights), int(gradients), int(optimizer))


def reference_weights(total_params: int, *, zero_stage: int, world_size: int, bf16: bool) -> int:
    """Bytes per rank of the frozen reference: its weights, sharded under ZeRO-3, else whole."""
    w = 2 if bf16 else 4
    return int(w * total_params / (world_size if zero_stage == 3 else 1))


def layer_activation_bytes(hidden: int, attn_dim: int, intermediate: int, act_bytes: int) -> int:
    """Bytes one token leaves saved for backward in one transformer block (per token, per layer).

    The Qwen2 / Qwen2.5-VL block as Hugging Face runs it, with SDPA or flash attention
    (no seq^2 term), ``a`` = ``act_bytes`` (2 bf16, 4 fp32)::

        2 * (4 + a) * hidden          two RMSNorms: the fp32 upcast of the input and the
                                      normalized output
        + 5 * a * attn_dim            q, k, v, the attention output and o_proj's input
                                      (a contiguous copy); k and v count at all heads
                                      because HF expands the KV heads (repeat_kv) whenever
                                      it passes a padding mask to SDPA
        + 4 * a * intermediate        SwiGLU: gate, silu(gate), up, and down_proj's input

    ``attn_dim`` is heads x head_dim (the hidden size in Qwen2.5-VL).
    """
    a = act_bytes
    return 2 * (4 + a) * hidden + 5 * a * attn_dim + 4 * a * intermediate


@dataclass(frozen=True)
class Activations:
    """Bytes per rank of the activations saved for backward at the micro-batch budget."""

    full: int
    checkpointed: int
    checkpointing: bool
    text_tokens: int
    vision_patches: int

    @property
    def configured(self) -> int:
        return self.checkpointed if self.checkpointing else self.full


def stack_activations(tokens: int, layers: int, per_layer: int, hidden: int, act_bytes: int) -> tuple[int, int]:
    """(without, with) gradient checkpointing, bytes, for ``tokens`` through ``layers`` blocks.

    Without: ``tokens * layers * per_layer``. With (non-reentrant, one checkpoint per
    block): each block keeps only its input, ``a * hidden`` per token, and one block's
    full set exists again while it is recomputed for its backward:
    ``tokens * (layers * a * hidden + per_layer)``.
    """
    return tokens * layers * per_layer, tokens * (layers * act_bytes * hidden + per_layer)


def learner_activations(shape: ModelShape, config: Config, *, bf16: bool) -> Activations:
    """Activations of one micro-batch (``layer_activation_bytes`` over the decoder and vision blocks).

    Text: ``max(learner.micro_batch_tokens, rollout.max_model_len)`` tokens (a sample
    longer than the budget gets a micro-batch of its own), plus the final norm's
    ``(4 + a) * hidden`` per token. Vision: only when the tower trains (a frozen tower
    saves nothing for backward); planned as one image of ``data.max_pixels`` per
    ``rollout.max_model_len`` tokens of the budget, ``max_pixels / patch_size**2``
    patches each, but no more than a prompt can hold (``data.max_prompt_tokens``, else
    ``rollout.max_model_len``, merged tokens of ``spatial_merge_size**2`` patches each:
    a longer prompt is skipped). Samples of one group share their image and run it
    once, so this counts generously.
    """
    a = 2 if bf16 else 4
    cfg = config.learner
    tokens = max(cfg.micro_batch_tokens, config.rollout.max_model_len)
    per_layer = layer_activation_bytes(shape.hidden_size, shape.num_heads * shape.head_dim, shape.intermediate_size, a)
    full, ckpt = stack_activations(tokens, shape.num_layers, per_layer, shape.hidden_size, a)
    final_norm = tokens * (4 + a) * shape.hidden_size
    full, ckpt = full + final_norm, ckpt + final_norm
    patches = 0
    if shape.vision is not None and not cfg.freeze_vision_tower:
        v = shape.vision
        images = max(1, cfg.micro_batch_tokens // config.rollout.max_model_len)
        prompt_tokens = config.data.max_prompt_tokens or config.rollout.max_model_len
        per_image = min(config.data.max_pixels // v.patch_size**2, prompt_tokens * v.spatial_merge_size**2)
        patches = images * max(1, per_image)
        per_block = layer_activation_bytes(v.hidden_size, v.hidden_size, v.intermediate_size, a)
        v_full, v_ckpt = stack_activations(patches, v.depth, per_block, v.hidden_size, a)
        full, ckpt = full + v_full, ckpt + v_ckpt
    return Activations(full, ckpt, cfg.gradient_checkpointing, tokens, patches)


def logprob_chunk_bytes(shape: ModelShape, config: Config, *, bf16: bool) -> int:
    """Bytes of the chunked log-prob step: ``2 * c * vocab * 4`` (+ ``vocab * hidden * w``).

    ``c = min(learner.logprob_chunk_tokens, micro-batch tokens)`` response tokens have
    float32 logits at once, plus their softmax / gradient of the same size. Under
    ZeRO-2/3 add one full gradient of the output embedding (vocab x hidden in the
    weight dtype) that backward writes before DeepSpeed reduce-scatters it; at stage
    0/1 that gradient is already one of the model-state gradients.
    """
    w = 2 if bf16 else 4
    chunk = min(config.learner.logprob_chunk_tokens, max(config.learner.micro_batch_tokens, config.rollout.max_model_len))
    logits = 2 * chunk * shape.vocab_size * 4
    head_grad = shape.vocab_size * shape.hidden_size * w if config.learner.zero_stage >= 2 else 0
    return logits + head_grad


# ----------------------------------------------------------------------------- components


@dataclass(frozen=True)
class Component:
    """One process kind's memory per GPU (per process on a host), by part.

    ``capacity`` is what the total is checked against; None: host memory, not checked.
    ``resident`` is what stays allocated between its peaks (checked on a shared GPU).
    """

    name: str
    summary: str
    parts: dict[str, int]
    notes: dict[str, str]
    capacity: int | None
    resident: int
    details: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or (self.total <= self.capacity and self.details.get("starts", True))


def _learner_on_gpu(config: Config) -> bool:
    # use_gpu None means "if the cluster has GPUs": a plan is for the GPU case.
    return config.trainer.use_gpu is not False


def _bf16(config: Config) -> bool:
    precision = config.learner.precision
    return precision == "bf16" or (precision == "auto" and _learner_on_gpu(config))


def plan_learner(shape: ModelShape, config: Config, gpu_memory: int) -> Component:
    """The learner's memory per rank (``trainer.num_learners`` ranks)."""
    cfg = config.learner
    gpu = _learner_on_gpu(config)
    bf16 = _bf16(config)
    world = config.trainer.num_learners
    frozen = shape.vision_params if cfg.freeze_vision_tower else 0
    states = model_states(
        shape.total_params,
        shape.total_params - frozen,
        shape.largest_module_params,
        zero_stage=cfg.zero_stage,
        world_size=world,
        bf16=bf16,
    )
    reference = 0
    if config.algo.kl_coef > 0:
        reference = reference_weights(shape.total_params, zero_stage=cfg.zero_stage, world_size=world, bf16=bf16)
    acts = learner_activations(shape, config, bf16=bf16)
    logprob = logprob_chunk_bytes(shape, config, bf16=bf16)
    allowance = LEARNER_CUDA_ALLOWANCE if gpu else 0
    precision = "bf16 mixed precision, 20 bytes/trainable param" if bf16 else "fp32, 16 bytes/trainable param"
    other = "without" if acts.checkpointing else "with"
    parts = {
        "weights": states.weights,
        "gradients": states.gradients,
        "optimizer": states.optimizer,
        "reference": reference,
        "activations": acts.configured,
        "logprob_chunks": logprob,
        "cuda_allowance": allowance,
    }
    notes = {
        "weights": ("sharded" if cfg.zero_stage == 3 else "whole") + (", vision tower frozen" if frozen else ""),
        "gradients": f"ZeRO-{cfg.zero_stage}, {precision}",
        "optimizer": "fp32 master + AdamW moments" if bf16 else "AdamW moments",
        "reference": "algo.kl_coef > 0" if reference else "none (algo.kl_coef = 0)",
        "activations": (
            f"{acts.text_tokens} tokens{f' + {acts.vision_patches} vision patches' if acts.vision_patches else ''}, "
            f"checkpointing {'on' if acts.checkpointing else 'off'} "
            f"({other}: {_gib(acts.full if acts.checkpointing else acts.checkpointed):.2f} GiB)"
        ),
        "logprob_chunks": f"{min(cfg.logprob_chunk_tokens, acts.text_tokens)} tokens x {shape.vocab_size} vocab",
        "cuda_allowance": "CUDA context, NCCL/ZeRO buckets, fragmentation" if gpu else "none on CPU",
    }
    placement = f", {config.trainer.gpus_per_learner:g} GPU each" if gpu else ""
    summary = f"{world} rank(s), ZeRO-{cfg.zero_stage}, {'bf16' if bf16 else 'fp32'}{placement}"
    return Component(
        name="learner",
        summary=summary,
        parts=parts,
        notes=notes,
        capacity=gpu_memory if gpu else None,
        # Gradients, activations and logits live only during an update.
        resident=states.weights + states.optimizer + reference + allowance,
        details={
            "device": "gpu" if gpu else "host",
            "num_ranks": world,
            "model_states_gib": _gib(states.total),
            "activations_without_checkpointing_gib": _gib(acts.full),
            "activations_with_checkpointing_gib": _gib(acts.checkpointed),
            "micro_batch_tokens": acts.text_tokens,
        },
    )


def kv_bytes_per_token(shape: ModelShape, tensor_parallel_size: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token on one GPU: ``2 (K and V) * layers * kv_heads * head_dim * dtype_bytes / tp``."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes // tensor_parallel_size


def vllm_activation_peak(shape: ModelShape, tensor_parallel_size: int, gpu_memory: int) -> int:
    """vLLM's profiled activation peak on one GPU, bytes (an estimate).

    vLLM sizes its KV cache after a dummy forward of ``max_num_batched_tokens`` tokens
    and a sampler pass over ``max_num_seqs`` rows. Defaults of its offline ``LLM`` class:
    16384 tokens and 1024 sequences on a GPU of 70 GiB or more, else 8192 and 256. The
    forward keeps no activations, so one layer's working set per token, bf16:
    ``2 * (2 * hidden + q + 2 * kv + hidden + 3 * intermediate) / tp`` (residual, normed
    input, qkv, attention output, fused gate-up and its product); the sampler holds
    float32 logits and probabilities: ``2 * seqs * vocab * 4``.
    """
    big = gpu_memory >= 70 * GIB
    tokens, seqs = (16384, 1024) if big else (8192, 256)
    h, d = shape.hidden_size, shape.head_dim
    per_token = 2 * (3 * h + shape.num_heads * d + 2 * shape.num_kv_heads * d + 3 * shape.intermediate_size)
    return tokens * per_token // tensor_parallel_size + 2 * seqs * shape.vocab_size * 4


def _dtype_bytes(dtype: str, shape: ModelShape, on_gpu: bool) -> int:
    if dtype == "float32":
        return 4
    if dtype in ("bfloat16", "float16"):
        return 2
    return shape.checkpoint_bytes_per_param if on_gpu else 4


def plan_rollout(shape: ModelShape, config: Config, gpu_memory: int) -> Component:
    """One rollout actor's memory per GPU: vLLM's budget split into weights, activations and KV cache.

    vLLM takes ``rollout.gpu_memory_utilization`` x GPU memory in total and gives the KV
    cache what is left after the weights, its activation peak and non-torch memory. It
    refuses to start when that cannot hold one ``rollout.max_model_len`` sequence. The
    HF engine holds its weights and the KV cache of the sequences it is asked for.
    """
    r = config.rollout
    tp = r.tensor_parallel_size
    on_gpu = r.device == "cuda"
    w = _dtype_bytes(r.dtype, shape, on_gpu)
    weights = shape.total_params * w // tp
    kv_per_token = kv_bytes_per_token(shape, tp, 2 if w == 2 else 4)
    seq_tokens = math.ceil(r.max_model_len / VLLM_BLOCK_TOKENS) * VLLM_BLOCK_TOKENS
    asked = math.ceil(config.trainer.prompts_per_step * r.group_size / r.num_actors)
    per_gpu = f", {r.gpus_per_actor:g} GPU each" if on_gpu else ""
    if r.engine == "vllm":
        budget = int(r.gpu_memory_utilization * gpu_memory)
        activations = vllm_activation_peak(shape, tp, gpu_memory)
        kv = budget - weights - activations - VLLM_NON_TORCH
        graphs = 0 if r.enforce_eager else VLLM_CUDA_GRAPHS
        parts = {
            "weights": weights,
            "activation_peak": activations,
            "non_torch": VLLM_NON_TORCH,
            "kv_cache": max(kv, 0),
            "cuda_graphs": graphs,
        }
        concurrent = max(kv, 0) // (kv_per_token * seq_tokens)
        notes = {
            "weights": f"{'bf16' if w == 2 else 'fp32'}, split over tensor_parallel_size {tp}",
            "activation_peak": "vLLM's profile run",
            "non_torch": "CUDA context, NCCL",
            "kv_cache": (
                f"{r.gpu_memory_utilization:g} x GPU minus the above; {kv_per_token / 1024:.0f} KiB/token: "
                f"{concurrent} sequences of {r.max_model_len} tokens at once, {asked} asked per step"
            ),
            "cuda_graphs": "off (enforce_eager)" if r.enforce_eager else "outside vLLM's budget",
        }
        summary = f"{r.num_actors} vLLM actor(s), tensor_parallel_size {tp}{per_gpu}"
        resident_asleep = VLLM_NON_TORCH + graphs
    else:
        kv = kv_per_token * seq_tokens * asked
        concurrent = asked
        parts = {"weights": weights, "kv_cache": kv}
        notes = {
            "weights": f"{'bf16' if w == 2 else 'fp32'}",
            "kv_cache": f"{asked} sequences of at most {r.max_model_len} tokens, {kv_per_token / 1024:.1f} KiB/token",
        }
        summary = f"{r.num_actors} HF actor(s){per_gpu}"
        resident_asleep = weights + kv
    return Component(
        name="rollout",
        summary=summary,
        parts=parts,
        notes=notes,
        capacity=gpu_memory if on_gpu else None,
        resident=resident_asleep if r.sleep_between_rollouts else sum(parts.values()),
        details={
            "device": "gpu" if on_gpu else "host",
            "engine": r.engine,
            "num_actors": r.num_actors,
            "kv_bytes_per_token": kv_per_token,
            "concurrent_max_length_sequences": int(concurrent),
            "sequences_asked_per_step": asked,
            "kv_bytes_one_sequence": kv_per_token * seq_tokens,
            # vLLM refuses to start when the KV cache cannot hold one max-length sequence.
            "starts": r.engine != "vllm" or kv >= kv_per_token * seq_tokens,
        },
    )


@dataclass(frozen=True)
class SharedGpu:
    """What a learner rank and a rollout actor on the same GPU hold at once, by phase (bytes)."""

    phases: dict[str, int]
    notes: dict[str, str]
    capacity: int

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def plan_shared_gpu(learner: Component, rollout: Component, config: Config, gpu_memory: int) -> SharedGpu | None:
    """The shared-GPU check when fractional GPUs put a learner and a rollout actor on one GPU.

    Phases whose peaks coincide: during an update the learner's peak meets the actor's
    resident memory (asleep with ``rollout.sleep_between_rollouts``: only its context and
    CUDA graphs; else its whole budget). The learner empties its CUDA cache after each
    update, so what it held only for the update is free for the actor (which allocates
    outside torch's cache). A weight sync of a sleeping vLLM engine wakes its weights
    alone (``VLLMEngine`` wakes the ``"weights"`` tag; the KV cache stays released until
    the next generation): the actor's resident memory and weights meet the learner's
    resident memory. During a rollout the actor's whole footprint meets the learner's
    resident memory (weights, optimizer states, reference); without sleep the sync is
    part of that phase. In ``async`` mode rollouts run during updates: both peaks add up.
    """
    t, r = config.trainer, config.rollout
    if learner.capacity is None or rollout.capacity is None:
        return None
    if t.gpus_per_learner >= 1 and r.gpus_per_actor >= 1:
        return None
    if t.gpus_per_learner + r.gpus_per_actor > 1 + 1e-9:
        # Ray cannot put both on one GPU, so each holds one alone.
        return None
    phases = {
        "update": learner.total + rollout.resident,
        "rollout": rollout.total + learner.resident,
    }
    notes = {
        "update": "learner peak + rollout " + ("asleep" if r.sleep_between_rollouts else "awake"),
        "rollout": "rollout" + ("" if r.sleep_between_rollouts else " (and weight sync)")
        + " + learner weights, optimizer, reference",
    }
    if r.sleep_between_rollouts and r.engine == "vllm":
        phases["sync"] = rollout.resident + rollout.parts["weights"] + learner.resident
        notes["sync"] = "weight sync: vLLM's weights woken alone (no KV cache) + learner weights, optimizer, reference"
    if t.mode == "async":
        phases["async_overlap"] = learner.total + rollout.total
        notes["async_overlap"] = "trainer.mode async: a rollout runs during an update"
    return SharedGpu(phases, notes, gpu_memory)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """The whole memory plan of one config."""

    label: str
    shape: ModelShape
    gpu_memory: int
    learner: Component
    rollout: Component
    shared: SharedGpu | None
    advice: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.learner.fits and self.rollout.fits and (self.shared is None or self.shared.fits)


def _evaluate(shape: ModelShape, config: Config, gpu_memory: int) -> tuple[Component, Component, SharedGpu | None]:
    learner = plan_learner(shape, config, gpu_memory)
    rollout = plan_rollout(shape, config, gpu_memory)
    return learner, rollout, plan_shared_gpu(learner, rollout, config, gpu_memory)


def _fits(parts: tuple[Component, Component, SharedGpu | None]) -> bool:
    learner, rollout, shared = parts
    return learner.fits and rollout.fits and (shared is None or shared.fits)


def _replace(config: Config, section: str, **changes: Any) -> Config | None:
    try:
        return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})
    except ValueError:  # a section's own check refuses the value
        return None


def _candidates(config: Config) -> list[tuple[str, Config | None]]:
    """Single-setting changes that lower memory, each as (the setting, the changed config)."""
    cfg, r = config.learner, config.rollout
    out: list[tuple[str, Config | None]] = []
    for stage in range(cfg.zero_stage + 1, 4):
        out.append((f"learner.zero_stage={stage}", _replace(config, "learner", zero_stage=stage)))
    if not cfg.gradient_checkpointing:
        out.append(("learner.gradient_checkpointing=true", _replace(config, "learner", gradient_checkpointing=True)))
    budget = cfg.micro_batch_tokens // 2
    while budget >= 1024:
        out.append((f"learner.micro_batch_tokens={budget}", _replace(config, "learner", micro_batch_tokens=budget)))
        budget //= 2
    chunk = cfg.logprob_chunk_tokens // 2
    while chunk >= 64:
        out.append((f"learner.logprob_chunk_tokens={chunk}", _replace(config, "learner", logprob_chunk_tokens=chunk)))
        chunk //= 2
    if not cfg.freeze_vision_tower:
        out.append(("learner.freeze_vision_tower=true", _replace(config, "learner", freeze_vision_tower=True)))
    if r.engine == "vllm":
        for step in range(1, 10):
            util = round(r.gpu_memory_utilization - 0.05 * step, 2)
            if util > 0:
                out.append((f"rollout.gpu_memory_utilization={util:g}", _replace(config, "rollout", gpu_memory_utilization=util)))
        for step in range(1, 10):
            util = round(r.gpu_memory_utilization + 0.05 * step, 2)
            if util <= 0.95:
                out.append((f"rollout.gpu_memory_utilization={util:g}", _replace(config, "rollout", gpu_memory_utilization=util)))
        if r.device == "cuda" and not r.sleep_between_rollouts:
            out.append(("rollout.sleep_between_rollouts=true", _replace(config, "rollout", sleep_between_rollouts=True)))
    return out


def advise(shape: ModelShape, config: Config, gpu_memory: int) -> tuple[str, ...]:
    """The settings that, changed alone, make a plan that does not fit fit (the first of each key).

    Empty when it fits. When no single change is enough, the changes that lower the
    largest overflow, each with the GiB it saves, so that several can be combined.
    """
    current = _evaluate(shape, config, gpu_memory)
    if _fits(current):
        return ()
    fixes: dict[str, str] = {}
    for setting, changed in _candidates(config):
        key = setting.split("=")[0]
        if changed is not None and key not in fixes and _fits(_evaluate(shape, changed, gpu_memory)):
            fixes[key] = setting
    if fixes:
        return tuple(f"set {s}" for s in fixes.values())
    overflow = _worst_overflow(current)
    savings: dict[str, tuple[str, float]] = {}
    for setting, changed in _candidates(config):
        if changed is None:
            continue
        saved = overflow - _worst_overflow(_evaluate(shape, changed, gpu_memory))
        key = setting.split("=")[0]
        if saved > 0 and saved > savings.get(key, ("", 0.0))[1]:
            savings[key] = (setting, saved)
    return tuple(f"set {s} (saves {_gib(saved):.1f} GiB of {_gib(overflow):.1f} over)" for s, saved in savings.values())


def _worst_overflow(parts: tuple[Component, Component, SharedGpu | None]) -> int:
    learner, rollout, shared = parts
    over = [c.total - c.capacity for c in (learner, rollout) if c.capacity is not None]
    if shared is not None:
        over.append(shared.peak - shared.capacity)
    if not rollout.details["starts"]:
        over.append(rollout.details["kv_bytes_one_sequence"] - rollout.parts["kv_cache"])
    return max(over, default=0)


def build_plan(config: Config, gpu_memory_gib: float = 80.0, label: str = "", shape: ModelShape | None = None) -> Plan:
    """The memory plan of ``config`` on GPUs of ``gpu_memory_gib`` GiB."""
    shape = shape or load_shape(config.trainer.model)
    memory = int(gpu_memory_gib * GIB)
    learner, rollout, shared = _evaluate(shape, config, memory)
    return Plan(label, shape, memory, learner, rollout, shared, advise(shape, config, memory))


# ----------------------------------------------------------------------------- output


def _gib(n: float) -> float:
    return n / GIB


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _component_dict(c: Component) -> dict[str, Any]:
    return {
        "summary": c.summary,
        "memory": c.details["device"],
        "parts_gib": {k: round(_gib(v), 3) for k, v in c.parts.items()},
        "total_gib": round(_gib(c.total), 3),
        "checked_against_gib": None if c.capacity is None else round(_gib(c.capacity), 3),
        "fits": c.fits,
        "details": c.details,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready object (sizes in GiB)."""
    s = plan.shape
    shared = None
    if plan.shared is not None:
        shared = {
            "phases_gib": {k: round(_gib(v), 3) for k, v in plan.shared.phases.items()},
            "peak_gib": round(_gib(plan.shared.peak), 3),
            "checked_against_gib": round(_gib(plan.shared.capacity), 3),
            "fits": plan.shared.fits,
        }
    return {
        "config": plan.label,
        "model": {"name": s.name, "source": s.source, "params": s.total_params, "vision_params": s.vision_params},
        "gpu_memory_gib": round(_gib(plan.gpu_memory), 3),
        "learner": _component_dict(plan.learner),
        "rollout": _component_dict(plan.rollout),
        "shared_gpu": shared,
        "fits": plan.fits,
        "advice": list(plan.advice),
    }


def _component_lines(c: Component) -> list[str]:
    where = "per GPU" if c.capacity is not None else "host memory, per process"
    lines = [f"{c.name.capitalize()}: {c.summary} ({where})"]
    for name, size in c.parts.items():
        lines.append(f"  {name:<16}{_gib(size):8.2f} GiB  {c.notes[name]}")
    if c.capacity is None:
        verdict = "host memory, not checked"
    else:
        verdict = f"of {_gib(c.capacity):.2f} GiB: {'fits' if c.fits else 'DOES NOT FIT'}"
        if not c.details.get("starts", True):
            verdict += " (the KV cache cannot hold one max_model_len sequence: vLLM will not start)"
    lines.append(f"  {'total':<16}{_gib(c.total):8.2f} GiB  {verdict}")
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as text."""
    s = plan.shape
    lines = [
        f"Memory plan{f' of {plan.label}' if plan.label else ''}: {s.name} ({_count(s.total_params)} parameters, "
        f"{_count(s.vision_params)} in the vision tower; {s.source}), {_gib(plan.gpu_memory):.0f} GiB GPUs",
        "",
        *_component_lines(plan.learner),
        "",
        *_component_lines(plan.rollout),
    ]
    if plan.shared is not None:
        sh = plan.shared
        lines += ["", "Shared GPU (learner rank and rollout actor on one GPU):"]
        for name, size in sh.phases.items():
            lines.append(f"  {name:<16}{_gib(size):8.2f} GiB  {sh.notes[name]}")
        lines.append(f"  {'peak':<16}{_gib(sh.peak):8.2f} GiB  of {_gib(sh.capacity):.2f} GiB: {'fits' if sh.fits else 'DOES NOT FIT'}")
    lines += ["", "Fits." if plan.fits else "Does not fit. To fix, any one of:" if plan.advice else "Does not fit."]
    lines += [f"  {a}" for a in plan.advice]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapo_ray.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named preset (mapo_ray.config.PRESETS)")
    parser.add_argument("--config", type=Path, help="a YAML config file, applied over the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted override")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    # Imported here: mapo_ray.job pulls in Ray and torch, which the plan itself never needs.
    from mapo_ray.job import check_names

    try:
        config = check_names(load_config(args.config, args.preset, args.set))
        plan = build_plan(config, args.gpu_memory_gib, label=args.preset or str(args.config or "defaults"))
    except (ConfigError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_to_dict(plan), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
