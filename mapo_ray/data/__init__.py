"""Prompt data: Geo3K- and EmoSet-layout readers, the Ray Data pipeline, a synthetic task.

The names here are pure (no Ray import). The Ray Data part lives in
``mapo_ray.data.pipeline`` (``open_split``, ``prompt_dataset``, ``PromptBatches``),
the synthetic task writer in ``mapo_ray.data.synthetic``.
"""

from mapo_ray.data.errors import SKIP_REASONS, DataError, RowSkip
from mapo_ray.data.images import PixelBudget, decode_image, fit_image, image_bytes, load_image, smart_resize
from mapo_ray.data.prompts import EMOTIONS, FORMAT_INSTRUCTION, IMAGE_PLACEHOLDER, chat_messages, render_prompt
from mapo_ray.data.rows import (
    IMAGES_TYPE,
    drop_skipped,
    emoset_as_geo3k,
    pack_image,
    prepare_row,
    prepare_table,
    rebatch,
    to_batch,
    unpack_image,
)
from mapo_ray.data.sources import DataFile, DataSource, check_schema, open_source, plan_reads, read_unit

__all__ = [
    "EMOTIONS",
    "FORMAT_INSTRUCTION",
    "IMAGES_TYPE",
    "IMAGE_PLACEHOLDER",
    "SKIP_REASONS",
    "DataError",
    "DataFile",
    "DataSource",
    "PixelBudget",
    "RowSkip",
    "chat_messages",
    "check_schema",
    "decode_image",
    "drop_skipped",
    "emoset_as_geo3k",
    "fit_image",
    "image_bytes",
    "load_image",
    "open_source",
    "plan_reads",
    "pack_image",
    "prepare_table",
    "prepare_row",
    "read_unit",
    "rebatch",
    "render_prompt",
    "smart_resize",
    "to_batch",
    "unpack_image",
]
