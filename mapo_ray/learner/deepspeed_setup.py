"""Building the policy and reference engines under DeepSpeed, and the pieces they are made of.

The process group comes first: Ray Train's ``TorchTrainer`` creates it in each worker
(gloo on CPU, NCCL on GPU); a lone process calls ``init_single_process``. DeepSpeed
then wraps that group. On CPU it also loads its shared-memory collective op, compiled
once per machine (~75 s here) into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and loaded from there in under a second afterwards;
creating the torch group first does not skip it.

The optimizer is torch's AdamW (no DeepSpeed op to compile) and the schedule a
``LambdaLR``; DeepSpeed steps both, clips gradients, and keeps their state in its
checkpoints.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

from mapo_ray.config import LearnerConfig

logger = logging.getLogger(__name__)


def init_single_process(backend: str | None = None) -> None:
    """Make this process a world of one (rank 0), for tests and single-process runs.

    Sets the variables DeepSpeed reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT on a free port) and creates the default group: ``backend`` or NCCL
    with a GPU, else gloo. Does nothing when a group already exists.
    """
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), rank=0, world_size=1)


def use_bf16(cfg: LearnerConfig) -> bool:
    """Whether the engines run in bf16: ``precision`` "auto" means bf16 exactly when a GPU is present."""
    if cfg.precision == "auto":
        return torch.cuda.is_available()
    return cfg.precision == "bf16"


def deepspeed_config(cfg: LearnerConfig, world_size: int, *, train: bool = True) -> dict[str, Any]:
    """The DeepSpeed config dict of the policy engine (``train``) or the frozen reference one.

    Batch sizes are nominal (one sample per micro-batch, no accumulation): the learner
    sizes micro-batches by tokens itself and marks each optimizer step's boundary
    with ``set_gradient_accumulation_boundary``, so DeepSpeed's own counter never
    decides when to step.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "bf16": {"enabled": use_bf16(cfg)},
        "wall_clock_breakdown": False,
    }
    if train:
        config.update(
            zero_optimization={"stage": cfg.zero_stage},
            gradient_clipping=cfg.grad_clip,
            # Torch's AdamW is not on DeepSpeed's list of tested ZeRO optimizers, but works with it.
            zero_allow_untested_optimizer=True,
        )
    else:
        # Only ZeRO-3 changes anything for a model without optimizer: its parameters are sharded.
        config["zero_optimization"] = {"stage": 3 if cfg.zero_stage == 3 else 0}
    return config


def lr_factor(step: int, warmup_steps: int, decay_steps: int | None, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0 for the first step).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps
    (so the first step already moves), then 1, or, when ``decay_steps`` is set, a
    cosine from 1 down to ``min_ratio`` over ``decay_steps`` steps, then ``min_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def load_model(model_path: str | os.PathLike, cfg: LearnerConfig, *, trainable: bool) -> PreTrainedModel:
    """The Hugging Face model at ``model_path``: a vision-language model when its config
    has a vision tower, else a causal LM. Loaded on CPU in bf16 or fp32 (``use_bf16``).

    The trainable policy gets the configured gradient checkpointing and vision-tower
    freezing; the reference (``trainable=False``) is frozen whole, in eval mode.
    Each rank loads the whole model into host memory before DeepSpeed places (ZeRO-3:
    shards) it; loading straight into shards would need ``accelerate``.
    """
    config = AutoConfig.from_pretrained(model_path)
    multimodal = hasattr(config, "vision_config")
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    model = model_cls.from_pretrained(model_path, dtype=dtype)
    if not trainable:
        return model.eval().requires_grad_(False)
    if cfg.freeze_vision_tower:
        _vision_tower(model, model_path).requires_grad_(False)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and ZeRO-3's hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _vision_tower(model: nn.Module, model_path: str | os.PathLike) -> nn.Module:
    """The vision encoder of a Qwen2-VL-style model (``model.model.visual``, merger included)."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "visual", None)
    if tower is None:
        raise ValueError(
            f"learner.freeze_vision_tower is set, but {model_path} ({type(model).__name__}) has no vision tower"
        )
    return tower


def build_policy_engine(
    module: nn.Module, cfg: LearnerConfig, world_size: int
) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed engine around ``module`` with AdamW over its trainable parameters and the warm-up schedule."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    schedule = partial(
        lr_factor, warmup_steps=cfg.lr_warmup_steps, decay_steps=cfg.lr_decay_steps, min_ratio=cfg.min_lr_ratio
    )
    with _op_builds_to_log():
        engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=trainable,
            optimizer=lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            config=deepspeed_config(cfg, world_size),
        )
    return engine


def build_reference(module: nn.Module, cfg: LearnerConfig, world_size: int, device: torch.device) -> nn.Module:
    """The frozen reference: sharded by a DeepSpeed inference engine under ZeRO-3, else a plain copy on ``device``."""
    if cfg.zero_stage == 3:
        with _op_builds_to_log():
            engine, *_ = deepspeed.initialize(model=module, config=deepspeed_config(cfg, world_size, train=False))
        return engine
    return module.to(device)


@contextlib.contextmanager
def _op_builds_to_log() -> Iterator[None]:
    """DeepSpeed prints "DeepSpeed <op> built successfully" to stdout, which Ray forwards to
    the job's console, each time it loads an op: those lines go to this module's log at
    DEBUG instead (in a Ray Train worker, INFO reaches the console too); anything else
    printed meanwhile is printed as it was."""
    captured = io.StringIO()
    # Inside a Ray Train worker ``print`` also logs each line, past any redirect of stdout:
    # a plain one for this stretch.
    patched, builtins.print = builtins.print, _plain_print
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        builtins.print = patched
        for line in captured.getvalue().splitlines():
            if _OP_BUILT.fullmatch(line):
                logger.debug("%s", line)
            else:
                print(line, flush=True)


def _plain_print(*objects: object, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
    stream = sys.stdout if file is None else file
    stream.write((" " if sep is None else sep).join(map(str, objects)) + ("\n" if end is None else end))
    if flush:
        stream.flush()


_OP_BUILT = re.compile(r"DeepSpeed \S+ built successfully")
