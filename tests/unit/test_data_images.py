"""Image decoding, the pixel budget and Qwen2.5-VL style resizing (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mapo_ray.data import PixelBudget, RowSkip, decode_image, fit_image, image_bytes, load_image, smart_resize

BUDGET = PixelBudget(min_pixels=56 * 56, max_pixels=28 * 28 * 64, max_decode_pixels=10_000_000)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 4000),
    width=st.integers(1, 4000),
    min_side=st.integers(1, 40),
    max_side=st.integers(1, 80),
)
def test_smart_resize_lands_on_the_grid_within_the_cap(height, width, min_side, max_side):
    min_pixels = (min_side * 14) ** 2
    max_pixels = max(min_pixels, (max_side * 14) ** 2, 28 * 28)
    budget = PixelBudget(min_pixels, max_pixels, max_decode_pixels=10**9)
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(RowSkip) as info:
            smart_resize(height, width, budget)
        assert info.value.reason == "image_aspect_ratio"
        return
    h, w = smart_resize(height, width, budget)
    assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
    assert h * w <= max_pixels
    if max_pixels >= 4 * min_pixels and max(height, width) / min(height, width) <= 4:
        # With room to spare under the cap, the floor holds too.
        assert h * w >= min_pixels


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((224, 224), (224, 224)),  # already on the grid and in budget: untouched
        ((100, 150), (112, 140)),  # nearest multiples of 28
        ((1000, 1000), (224, 224)),  # scaled down to the cap (64 tokens)
        ((20, 20), (56, 56)),  # scaled up to the floor
        ((3000, 1500), (308, 140)),  # shape kept while scaling down
    ],
)
def test_smart_resize_examples(size, expected):
    assert smart_resize(*size, BUDGET) == expected


def test_aspect_ratio_keeps_roughly_under_scaling():
    h, w = smart_resize(900, 1800, BUDGET)
    assert abs(w / h - 2.0) < 0.35


def test_decode_converts_modes_and_lays_transparency_on_white():
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode_image(encode(rgba), max_decode_pixels=10_000)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (0, 0, 255)
    grey = decode_image(encode(Image.new("L", (10, 10), 128), "JPEG"), max_decode_pixels=10_000)
    assert grey.mode == "RGB" and grey.size == (10, 10)


def test_corrupt_and_truncated_bytes_are_row_skips():
    with pytest.raises(RowSkip) as info:
        decode_image(b"definitely not an image", max_decode_pixels=10_000)
    assert info.value.reason == "corrupt_image"
    png = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(RowSkip) as info:
        decode_image(png[: len(png) // 2], max_decode_pixels=10_000)
    assert info.value.reason == "corrupt_image"


def test_image_over_the_decode_limit_is_refused_before_decoding():
    png = encode(Image.new("RGB", (200, 100)))
    with pytest.raises(RowSkip) as info:
        decode_image(png, max_decode_pixels=200 * 100 - 1)
    assert info.value.reason == "image_too_large"
    assert "200x100" in info.value.detail
    assert decode_image(png, max_decode_pixels=200 * 100).size == (200, 100)


def test_image_bytes_accepts_struct_raw_bytes_and_paths():
    data = encode(Image.new("RGB", (4, 4)))
    files = {"figs/a.png": data}
    assert image_bytes({"bytes": data, "path": "ignored.png"}) == data
    assert image_bytes(data) == data
    assert image_bytes({"bytes": None, "path": "figs/a.png"}, files.__getitem__) == data
    assert image_bytes("figs/a.png", files.__getitem__) == data


@pytest.mark.parametrize("cell", [None, {"bytes": None, "path": None}, {"bytes": None, "path": "x.png"}])
def test_image_bytes_without_anything_to_read_is_missing(cell):
    def read_file(path: str) -> bytes:
        raise FileNotFoundError(path)

    with pytest.raises(RowSkip) as info:
        image_bytes(cell, read_file)
    assert info.value.reason == "missing_image"


def test_load_image_returns_resized_uint8_rgb():
    source = Image.new("RGB", (500, 300), (10, 200, 30))
    array = load_image({"bytes": encode(source), "path": None}, BUDGET)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[:2] == smart_resize(300, 500, BUDGET)
    assert tuple(array[5, 5]) == (10, 200, 30)


def test_fit_image_keeps_an_image_already_on_the_grid():
    source = Image.effect_noise((56, 84), 60).convert("RGB")
    assert np.array_equal(fit_image(source, BUDGET), np.asarray(source))


def test_budget_rejects_impossible_bounds():
    with pytest.raises(ValueError):
        PixelBudget(min_pixels=100, max_pixels=700, max_decode_pixels=10**6)
    with pytest.raises(ValueError):
        PixelBudget(min_pixels=5000, max_pixels=4000, max_decode_pixels=10**6)
