"""Image decoding and Qwen2.5-VL style resizing: pure functions on bytes, PIL and numpy.

An image becomes a ``(H, W, 3) uint8`` RGB array whose sides are multiples of 28 px
(a 14-px patch, merged 2x2 into one vision token) and whose pixel count lies within a
budget. Images larger than the budget are resized down, as Qwen2.5-VL's own processor
does; only an image whose header declares more than ``max_decode_pixels`` is refused,
before decoding, because decoding it could exhaust a worker's memory.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mapo_ray.data.errors import RowSkip

# 14-px patches merged 2x2: one vision token per 28x28 pixels.
PATCH_FACTOR = 28
# Beyond this ratio one side would be a sliver of patches (Qwen2.5-VL refuses it too).
MAX_ASPECT_RATIO = 200.0


@dataclass(frozen=True)
class PixelBudget:
    """Bounds on pixels per image: the resize target range and the decode guard."""

    min_pixels: int
    max_pixels: int
    max_decode_pixels: int
    factor: int = PATCH_FACTOR

    def __post_init__(self) -> None:
        if self.max_pixels < self.factor**2:
            raise ValueError(f"max_pixels={self.max_pixels} is below one {self.factor}x{self.factor} patch")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


def smart_resize(height: int, width: int, budget: PixelBudget) -> tuple[int, int]:
    """Target ``(height, width)`` for an image: multiples of ``budget.factor``, aspect ratio kept.

    ``max_pixels`` is a hard cap (it bounds the prompt's vision tokens); ``min_pixels``
    is met whenever the grid allows it under the cap. Raises ``RowSkip`` for an
    empty or overly elongated image.
    """
    f = budget.factor
    if height <= 0 or width <= 0:
        raise RowSkip("corrupt_image", f"image has size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise RowSkip("image_aspect_ratio", f"{width}x{height} is more elongated than {MAX_ASPECT_RATIO:g}:1")
    h = max(f, round(height / f) * f)
    w = max(f, round(width / f) * f)
    if h * w > budget.max_pixels:
        # Scale both sides by the same factor, rounding down so the cap holds.
        scale = math.sqrt(height * width / budget.max_pixels)
        h = max(f, math.floor(height / scale / f) * f)
        w = max(f, math.floor(width / scale / f) * f)
    elif h * w < budget.min_pixels:
        scale = math.sqrt(budget.min_pixels / (height * width))
        h = math.ceil(height * scale / f) * f
        w = math.ceil(width * scale / f) * f
    # Rounding a side up to one patch (thin images) or up to min_pixels can overshoot the
    # cap; shrink the longer side one patch at a time until it holds.
    while h * w > budget.max_pixels:
        if h >= w:
            h -= f
        else:
            w -= f
    return h, w


def image_bytes(value: Any, read_file: Callable[[str], bytes] | None = None) -> bytes:
    """The encoded bytes of one image cell.

    Accepts the Hugging Face ``Image`` feature struct ``{"bytes": ..., "path": ...}``,
    raw bytes, or a path string; a path (or a struct without bytes) is read with
    ``read_file``. Raises ``RowSkip("missing_image")`` when there is nothing to read.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    path = value
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
    if isinstance(path, str) and path and read_file is not None:
        try:
            return read_file(path)
        except OSError as err:
            raise RowSkip("missing_image", f"cannot read image file {path!r} ({err})") from err
    raise RowSkip("missing_image", f"no image bytes in {_describe(value)}")


def decode_image(data: bytes, max_decode_pixels: int) -> Image.Image:
    """Decode encoded image bytes to an RGB ``PIL.Image``; transparency is laid on white.

    The header is checked against ``max_decode_pixels`` before the pixels are decoded.
    Raises ``RowSkip`` (``corrupt_image`` or ``image_too_large``).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise RowSkip("image_too_large", str(err)) from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise RowSkip("corrupt_image", f"cannot decode {len(data)} bytes ({err})") from err
    width, height = image.size
    if width * height > max_decode_pixels:
        raise RowSkip(
            "image_too_large",
            f"{width}x{height} = {width * height} pixels is over max_decode_pixels={max_decode_pixels}",
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged pixel data
        raise RowSkip("corrupt_image", f"cannot decode {width}x{height} {image.format} image ({err})") from err
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        # Diagrams are often transparent line art: dropping alpha would leave it on black.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, budget: PixelBudget) -> np.ndarray:
    """Resize an RGB image to ``smart_resize`` of its size; returns ``(H, W, 3) uint8``."""
    height, width = smart_resize(image.height, image.width, budget)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)


def load_image(
    value: Any, budget: PixelBudget, read_file: Callable[[str], bytes] | None = None
) -> np.ndarray:
    """One image cell to a resized ``(H, W, 3) uint8`` array (``image_bytes`` -> decode -> fit)."""
    return fit_image(decode_image(image_bytes(value, read_file), budget.max_decode_pixels), budget)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"struct with keys {sorted(value)} (bytes is null)"
    return f"a {type(value).__name__}" if value is not None else "a null cell"
