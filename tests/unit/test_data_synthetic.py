"""The synthetic figure task: answers, determinism, and loading it with the Geo3K reader."""

from __future__ import annotations

import collections
import io
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mapo_ray.data import PixelBudget, open_source, plan_reads, prepare_row, read_unit, render_prompt
from mapo_ray.data.synthetic import COLOURS, KINDS, examples_table, latex_fraction, latex_sqrt, make_example


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(6, 2, "3"), (15, 2, "\\frac{15}{2}"), (12, 8, "\\frac{3}{2}"), (7, 1, "7")],
)
def test_latex_fraction(numerator, denominator, expected):
    assert latex_fraction(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("n", "expected"), [(25, "5"), (5, "\\sqrt{5}"), (12, "2\\sqrt{3}"), (72, "6\\sqrt{2}"), (1, "1")]
)
def test_latex_sqrt(n, expected):
    assert latex_sqrt(n) == expected


def parse_answer(text: str) -> float:
    """Value of an answer written as ``a``, ``\\frac{a}{b}``, ``\\sqrt{n}`` or ``k\\sqrt{n}``."""
    if text.startswith("\\frac{"):
        numerator, denominator = text[len("\\frac{") : -1].split("}{")
        return float(Fraction(int(numerator), int(denominator)))
    if "\\sqrt{" in text:
        outside, inside = text.split("\\sqrt{")
        return (int(outside) if outside else 1) * float(np.sqrt(int(inside[:-1])))
    return float(int(text))


def test_answers_have_the_form_and_range_of_their_kind():
    seen = collections.defaultdict(set)
    for index in range(240):
        example = make_example(seed=0, split="train", index=index)
        seen[example.kind].add(example.answer)
        assert example.problem.count("<image>") == 1 and example.image.size == (168, 168)
        if example.kind in ("colour", "fill"):
            assert example.answer in COLOURS
            continue
        value = parse_answer(example.answer)
        if example.kind == "sides":
            assert value in (3, 4, 5)
        elif example.kind == "count":
            assert 1 <= value <= 5
        elif example.kind == "angle":
            assert 180 - 85 - 65 <= value <= 180 - 30 - 30 and value % 5 == 0
        elif example.kind == "perimeter":
            assert 8 <= value <= 60 and value % 2 == 0
        elif example.kind == "area":
            assert 2 <= value <= 72 and (2 * value) % 1 == 0
        elif example.kind == "hypotenuse":
            assert np.sqrt(2) - 1e-9 <= value <= np.sqrt(162) + 1e-9
    assert set(seen) == set(KINDS)
    # Every kind is equally common and varied; the fraction and surd forms both occur.
    assert all(len(answers) >= (3 if kind == "sides" else 4) for kind, answers in seen.items())
    assert any(a.startswith("\\frac") for a in seen["area"]) and any("\\sqrt" in a for a in seen["hypotenuse"])


def test_the_colour_answer_is_painted_beside_other_colours():
    for index in range(0, 20):
        example = make_example(seed=1, split="train", index=index, kinds=["colour"])
        assert example.kind == "colour"
        pixels = np.asarray(example.image).reshape(-1, 3)
        painted = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(axis=1).sum() > 50}
        assert example.answer in painted and len(painted) >= 2


def test_the_fill_answer_is_the_one_colour_and_covers_much_of_the_image():
    for index in range(20):
        example = make_example(seed=2, split="test", index=index, kinds=["fill"])
        pixels = np.asarray(example.image).reshape(-1, 3)
        painted = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(axis=1).sum() > 50}
        assert painted == {example.answer}
        # A triangle in a box of two thirds of the canvas covers at least 2/9 of it.
        assert (pixels == COLOURS[example.answer]).all(axis=1).mean() > 0.2


def test_a_subset_of_kinds_cycles_in_the_order_given_and_unknown_kinds_are_named():
    table = examples_table(seed=0, split="train", count=6, kinds=["sides", "fill"])
    assert table.column("kind").to_pylist() == ["sides", "fill"] * 3
    # An example depends on (seed, split, index) and its kind only, not on the other kinds.
    mixed, alone = make_example(0, "train", 1, kinds=["sides", "fill"]), make_example(0, "train", 1, kinds=["fill"])
    assert mixed.answer == alone.answer
    with pytest.raises(ValueError, match=r"unknown kind\(s\) \['circles'\]; the kinds are \['fill'"):
        examples_table(seed=0, split="train", count=2, kinds=["fill", "circles"])


def test_output_is_deterministic_in_the_seed():
    first = examples_table(seed=5, split="train", count=12)
    assert first.equals(examples_table(seed=5, split="train", count=12))
    assert not first.equals(examples_table(seed=6, split="train", count=12))
    assert not first.equals(examples_table(seed=5, split="test", count=12))


def test_cli_writes_geo3k_layout_that_the_reader_loads_without_skips(tmp_path):
    from transformers import AutoTokenizer

    from mapo_ray.models.tiny import tiny_vl_path

    subprocess.run(
        [sys.executable, "-m", "mapo_ray.data.synthetic", "--out", str(tmp_path), "--train", "70", "--test", "12"]
        + ["--seed", "3", "--kinds", "fill,count,area"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    kinds = ["fill", "count", "area"]
    assert pq.read_table(tmp_path / "test.parquet").equals(examples_table(seed=3, split="test", count=12, kinds=kinds))

    source = open_source(str(tmp_path / "train.parquet"))
    assert source.num_rows == 70 and source.passthrough == ("kind",)
    assert len(source.files[0].row_groups) == 2  # small row groups: parallel reads
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_path())
    budget = PixelBudget(min_pixels=3136, max_pixels=50176, max_decode_pixels=10**6)
    answers = {}
    for unit in plan_reads(source.files, 32, shuffle=False, seed=0, epoch=0):
        for row in read_unit(source.filesystem, unit).to_pylist():
            prompt, [image], answer = prepare_row(row, render=lambda p: render_prompt(tokenizer, p), budget=budget)
            assert image.shape == (168, 168, 3) and "<|image_pad|>" in prompt
            original = Image.open(io.BytesIO(row["images"][0]["bytes"]))
            assert np.array_equal(image, np.asarray(original))
            answers[row["uid"]] = answer
    assert len(answers) == 70 and answers["train.parquet#4"] == make_example(3, "train", 4, kinds).answer
