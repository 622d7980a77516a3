"""Tiny offline policies: a Qwen2.5-VL and a text-only Qwen2, built from configs.

They let the data pipeline, the tests and the CPU demo run the real model classes
without downloading anything. Each is saved as an ordinary Hugging Face folder
(safetensors weights, config, ``generation_config.json``, the tokenizer from
``mapo_ray.models.tokenizer`` and, for the VL model, a ``Qwen2VLImageProcessorPil``
config), so everything downstream loads it with ``from_pretrained`` exactly as it
would load ``Qwen/Qwen2.5-VL-7B-Instruct``.

Building is deterministic in ``seed`` and atomic: the folder is written under a
temporary name beside its destination and renamed into place, so a concurrent
reader (another Ray worker) or an interrupted build never sees half a model.

CLI: ``python -m mapo_ray.models.tiny --out DIR [--text] [--seed N]``.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
)

from mapo_ray.models.tokenizer import (
    IM_END,
    IMAGE_PAD,
    PAD_TOKEN,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tokenizer,
)

# Part of the cache folder name: bump it whenever a change here or in the tokenizer
# changes what gets built, so stale caches are not reused.
MODEL_VERSION = "v1"
TINY_VL_NAME = "tiny-qwen2.5-vl"
TINY_TEXT_NAME = "tiny-qwen2"

# Image size bounds, in pixels. One merged vision token covers 28x28 pixels, so an
# image becomes 4..64 tokens: the upper bound (a 224x224 image, 8x8 merged tokens)
# keeps a prompt around a hundred tokens for fast CPU rollouts while still giving
# the vision tower's 4x4 attention windows (window_size 112 px) several windows to
# work on; the lower bound keeps a 2x2 grid, the least that spatial merging needs.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64

# Text decoder shared by both models. Head size 64 = 128 / 2 heads: vLLM rejects
# smaller heads. One KV head exercises grouped-query attention as the real models do.
_TEXT_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
)
# Multimodal RoPE splits the 32 rotary frequencies of a 64-wide head into
# temporal/height/width sections, in the same 2:3:3 ratio as Qwen2.5-VL's (16, 24, 24).
_MROPE_SECTION = [8, 12, 12]


def cache_dir() -> Path:
    """Root of the model cache: ``$MAPO_RAY_CACHE/models``, else ``~/.cache/mapo-ray/models``."""
    root = os.environ.get("MAPO_RAY_CACHE") or "~/.cache/mapo-ray"
    # Absolute, so a path handed to Ray workers (other working directories) still holds.
    return Path(root).expanduser().absolute() / "models"


def _build_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh sibling folder of ``out_dir``, then rename it into place.

    Raises ``FileExistsError`` if ``out_dir`` already exists (also when another
    process renamed its build there first).
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"tiny model: {out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result may be a shared cache
        try:
            # rename(2) is atomic within one filesystem and refuses a non-empty target.
            os.rename(tmp, out_dir)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise FileExistsError(f"tiny model: {out_dir} appeared while building it") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _seeded_init(model_cls: type[torch.nn.Module], config: object, seed: int) -> torch.nn.Module:
    """Instantiate ``model_cls(config)`` with random weights that depend only on ``seed``."""
    # fork_rng leaves the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config).eval()


def tiny_vl_config(vocab_size: int, token_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """The tiny Qwen2.5-VL config; ``token_ids`` maps special token strings to ids."""
    text = dict(
        _TEXT_DIMS,
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _MROPE_SECTION},
        bos_token_id=None,
        eos_token_id=token_ids[IM_END],
        pad_token_id=token_ids[PAD_TOKEN],
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        # Windowed attention in block 0, full attention in the last block, the same
        # pattern as the real tower's groups of blocks.
        fullatt_block_indexes=[1],
        out_hidden_size=_TEXT_DIMS["hidden_size"],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids[IMAGE_PAD],
        video_token_id=token_ids[VIDEO_PAD],
        vision_start_token_id=token_ids[VISION_START],
        vision_end_token_id=token_ids[VISION_END],
        # Tied input/output embeddings keep the vocabulary from dominating the
        # parameter count, as in the small Qwen2.5 models.
        tie_word_embeddings=True,
    )


def tiny_text_config(vocab_size: int, token_ids: dict[str, int]) -> Qwen2Config:
    """The tiny text-only Qwen2 config; ``token_ids`` maps special token strings to ids."""
    return Qwen2Config(
        **_TEXT_DIMS,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=token_ids[IM_END],
        pad_token_id=token_ids[PAD_TOKEN],
        tie_word_embeddings=True,
    )


def _generation_config(token_ids: dict[str, int]) -> GenerationConfig:
    return GenerationConfig(eos_token_id=token_ids[IM_END], pad_token_id=token_ids[PAD_TOKEN])


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens the model configs refer to, keyed by token string."""
    tokens = (PAD_TOKEN, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}


def image_processor() -> Qwen2VLImageProcessorPil:
    """The image processor saved with the tiny VL model (no torchvision needed)."""
    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def build_tiny_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny Qwen2.5-VL with tokenizer and image processor into ``out_dir``."""

    def write(folder: Path) -> None:
        tokenizer = build_tokenizer(model_max_length=_TEXT_DIMS["max_position_embeddings"])
        ids = special_token_ids(tokenizer)
        model = _seeded_init(Qwen2_5_VLForConditionalGeneration, tiny_vl_config(len(tokenizer), ids), seed)
        model.generation_config = _generation_config(ids)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor().save_pretrained(folder)

    return _build_atomically(out_dir, write)


def build_tiny_text(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny text-only Qwen2 with its tokenizer into ``out_dir``."""

    def write(folder: Path) -> None:
        tokenizer = build_tokenizer(model_max_length=_TEXT_DIMS["max_position_embeddings"])
        ids = special_token_ids(tokenizer)
        model = _seeded_init(Qwen2ForCausalLM, tiny_text_config(len(tokenizer), ids), seed)
        model.generation_config = _generation_config(ids)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_atomically(out_dir, write)


def _cached(name: str, build: Callable[[Path], Path]) -> Path:
    path = cache_dir() / f"{name}-{MODEL_VERSION}"
    if path.is_dir():
        return path
    try:
        return build(path)
    except FileExistsError:
        # Another process finished first; its rename was atomic, so the folder is whole.
        if path.is_dir():
            return path
        raise


def tiny_vl_path() -> Path:
    """Folder of the tiny Qwen2.5-VL (seed 0), built once into ``cache_dir()``."""
    return _cached(TINY_VL_NAME, build_tiny_vl)


def tiny_text_path() -> Path:
    """Folder of the tiny text-only Qwen2 (seed 0), built once into ``cache_dir()``."""
    return _cached(TINY_TEXT_NAME, build_tiny_text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny offline policy model folder.")
    parser.add_argument("--out", required=True, type=Path, help="destination folder (must not exist)")
    parser.add_argument("--text", action="store_true", help="text-only Qwen2 instead of Qwen2.5-VL")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    build = build_tiny_text if args.text else build_tiny_vl
    try:
        print(build(args.out, seed=args.seed))
    except FileExistsError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
