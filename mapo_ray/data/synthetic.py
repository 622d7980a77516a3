"""A figure-question task the project writes itself, in the Geo3K layout.

Every example is a small PIL drawing and a question whose answer follows from it.
Eight kinds, from perception alone to arithmetic, so that a tiny model can learn the
easy end first:

- ``fill``: the colour of the one large shape (six possible answers): pure perception,
  which the tiny CPU policy learns in minutes (the ``cpu-tiny`` task);
- ``sides``: how many sides the one large regular polygon has (3, 4 or 5);
- ``colour``: the colour of the one circle among other shapes (six possible answers);
- ``count``: how many triangles / circles / squares (1 to 5);
- ``angle``: the third angle of a triangle with two labelled angles;
- ``perimeter``: of a rectangle with labelled sides;
- ``area``: of a triangle with labelled base and height (a fraction when odd);
- ``hypotenuse``: of a right triangle with labelled legs (a surd such as ``2\\sqrt{3}``).

Answers are written the way Geo3K writes them: ``12``, ``\\frac{3}{2}``, ``2\\sqrt{3}``.
A task may hold any subset of the kinds (``kinds``), which then cycle in the order
given. Output is deterministic in ``seed``: example ``i`` of a split depends only on
``(seed, split, i)`` and the kinds. Columns: ``images`` (a list with one ``{bytes, path}`` PNG
struct), ``problem``, ``answer`` and a pass-through ``kind``.

CLI: ``python -m mapo_ray.data.synthetic --out DIR --train N --test M --seed S [--kinds fill,sides]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

# 6 x 28 px: 36 vision tokens once merged, few enough for a tiny CPU model.
CANVAS = 168
# The figure stays inside this margin, leaving room for labels.
MARGIN = 30
ROW_GROUP_ROWS = 64  # small row groups let Ray Data read one file in parallel
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "orange": (240, 130, 20),
    "purple": (140, 60, 180),
}
SHAPES = ("triangle", "circle", "square")
INK = (0, 0, 0)
SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("kind", pa.string()),
    ]
)


@dataclass(frozen=True)
class Example:
    kind: str
    problem: str
    answer: str
    image: Image.Image


def latex_fraction(numerator: int, denominator: int) -> str:
    """``numerator/denominator`` in lowest terms: ``"6"`` or ``"\\frac{15}{2}"`` (positive inputs)."""
    divisor = math.gcd(numerator, denominator)
    numerator, denominator = numerator // divisor, denominator // divisor
    return str(numerator) if denominator == 1 else f"\\frac{{{numerator}}}{{{denominator}}}"


def latex_sqrt(n: int) -> str:
    """``sqrt(n)`` simplified: ``"5"``, ``"\\sqrt{5}"`` or ``"2\\sqrt{3}"`` (for ``n >= 1``)."""
    outside, inside = 1, n
    for factor in range(int(math.isqrt(n)), 1, -1):
        if n % (factor * factor) == 0:
            outside, inside = factor, n // (factor * factor)
            break
    if inside == 1:
        return str(outside)
    return f"\\sqrt{{{inside}}}" if outside == 1 else f"{outside}\\sqrt{{{inside}}}"


def check_kinds(kinds: Sequence[str]) -> None:
    """Raise ``ValueError`` naming any of ``kinds`` that is not a kind of this task (or none given)."""
    unknown = [kind for kind in kinds if kind not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"synthetic task: unknown kind(s) {unknown or '(none given)'}; the kinds are {list(KINDS)}")


def make_example(seed: int, split: str, index: int, kinds: Sequence[str] | None = None) -> Example:
    """Example ``index`` of ``split``: its kind cycles through ``kinds`` (None: all) so each is equally common."""
    kinds = KINDS if kinds is None else kinds
    check_kinds(kinds)
    rng = random.Random(f"{seed}:{split}:{index}")
    kind = kinds[index % len(kinds)]
    problem, answer, image = _MAKERS[kind](rng)
    return Example(kind, problem, answer, image)


def examples_table(seed: int, split: str, count: int, kinds: Sequence[str] | None = None) -> pa.Table:
    """``count`` examples of ``split`` (of ``kinds``; None: all) as a Geo3K-layout table."""
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    for index in range(count):
        example = make_example(seed, split, index, kinds)
        buffer = io.BytesIO()
        example.image.save(buffer, format="PNG")
        rows["images"].append([{"bytes": buffer.getvalue(), "path": f"{split}-{index:06d}.png"}])
        rows["problem"].append(example.problem)
        rows["answer"].append(example.answer)
        rows["kind"].append(example.kind)
    return pa.table(rows, schema=SCHEMA)


def write_task(
    out_dir: str | os.PathLike, train: int, test: int, seed: int, kinds: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``test.parquet`` under ``out_dir``; returns their paths.

    Each file appears whole (written beside it, then renamed), so a reader that races
    the writer never sees half a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, count in (("train", train), ("test", test)):
        path = out / f"{split}.parquet"
        handle, tmp = tempfile.mkstemp(prefix=f".{split}.", suffix=".parquet", dir=out)
        os.close(handle)
        try:
            pq.write_table(examples_table(seed, split, count, kinds), tmp, row_group_size=ROW_GROUP_ROWS)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; data is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        paths.append(path)
    return paths[0], paths[1]


# ---- the kinds: each returns (problem, answer, image) --------------------------------------


def _fill(rng: random.Random) -> tuple[str, str, Image.Image]:
    name = rng.choice(sorted(COLOURS))
    image, draw = _canvas()
    # Large (most of the merged vision tokens see it), at a random size and place.
    size = rng.randint(CANVAS * 2 // 3, CANVAS - 16)
    left, top = rng.randint(8, CANVAS - 8 - size), rng.randint(8, CANVAS - 8 - size)
    _shape(draw, rng.choice(SHAPES), (left, top, left + size, top + size), COLOURS[name])
    return "<image>What colour is the shape?", name, image


def _sides(rng: random.Random) -> tuple[str, str, Image.Image]:
    sides = rng.randint(3, 5)
    image, draw = _canvas()
    radius = rng.uniform(0.32, 0.44) * CANVAS
    centre = (rng.uniform(radius + 4, CANVAS - radius - 4), rng.uniform(radius + 4, CANVAS - radius - 4))
    turn = rng.uniform(0, 2 * math.pi)
    angles = [turn + 2 * math.pi * k / sides for k in range(sides)]
    corners = [(centre[0] + radius * math.cos(a), centre[1] + radius * math.sin(a)) for a in angles]
    draw.polygon(corners, fill=COLOURS[rng.choice(sorted(COLOURS))], outline=INK, width=2)
    return "<image>How many sides does the polygon have?", str(sides), image


def _colour(rng: random.Random) -> tuple[str, str, Image.Image]:
    names = rng.sample(sorted(COLOURS), rng.randint(2, 4))
    shapes = ["circle"] + [rng.choice(("triangle", "square")) for _ in names[1:]]
    image, draw = _canvas()
    for cell, shape, name in zip(_cells(rng, len(names)), shapes, names):
        _shape(draw, shape, cell, COLOURS[name])
    return "<image>What colour is the circle?", names[0], image


def _count(rng: random.Random) -> tuple[str, str, Image.Image]:
    target = rng.choice(SHAPES)
    count = rng.randint(1, 5)
    shapes = [target] * count + [rng.choice([s for s in SHAPES if s != target]) for _ in range(rng.randint(0, 3))]
    image, draw = _canvas()
    for cell, shape in zip(_cells(rng, len(shapes)), shapes):
        _shape(draw, shape, cell, COLOURS[rng.choice(sorted(COLOURS))])
    return f"<image>How many {target}s are in the figure?", str(count), image


def _angle(rng: random.Random) -> tuple[str, str, Image.Image]:
    alpha = rng.randrange(30, 90, 5)
    beta = rng.randrange(30, min(90, 155 - alpha), 5)
    # Base AB on the x axis; C where the rays at A (angle alpha) and B (angle beta) meet.
    side_ac = math.sin(math.radians(beta)) / math.sin(math.radians(alpha + beta))
    apex = (side_ac * math.cos(math.radians(alpha)), side_ac * math.sin(math.radians(alpha)))
    corners = [(0.0, 0.0), (1.0, 0.0), apex]
    image, draw = _canvas()
    points = _fit(corners)
    draw.polygon(points, outline=INK, width=2)
    for point, label in zip(points, (f"{alpha}°", f"{beta}°", "x°")):
        _label(draw, _outside(point, points, 13), label)
    return "<image>Find x.", str(180 - alpha - beta), image


def _perimeter(rng: random.Random) -> tuple[str, str, Image.Image]:
    width, height = rng.randint(2, 15), rng.randint(2, 15)
    image, draw = _canvas()
    (x0, y0), _, (x1, y1), _ = _fit([(0, 0), (width, 0), (width, height), (0, height)])
    left, right, top, bottom = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    draw.rectangle((left, top, right, bottom), outline=INK, width=2)
    _label(draw, ((left + right) / 2, bottom + 11), str(width))
    _label(draw, (right + 11, (top + bottom) / 2), str(height))
    return "<image>Find the perimeter of the rectangle.", str(2 * (width + height)), image


def _area(rng: random.Random) -> tuple[str, str, Image.Image]:
    base, height = rng.randint(2, 12), rng.randint(2, 12)
    apex = rng.uniform(0.2, 0.8) * base
    image, draw = _canvas()
    a, b, c, foot = _fit([(0, 0), (base, 0), (apex, height), (apex, 0)])
    draw.polygon([a, b, c], outline=INK, width=2)
    _dashed(draw, c, foot)
    _label(draw, ((a[0] + b[0]) / 2, a[1] + 11), str(base))
    _label(draw, (foot[0], (c[1] + foot[1]) / 2), str(height))
    return "<image>Find the area of the triangle.", latex_fraction(base * height, 2), image


def _hypotenuse(rng: random.Random) -> tuple[str, str, Image.Image]:
    leg_a, leg_b = rng.randint(1, 9), rng.randint(1, 9)
    image, draw = _canvas()
    right, end_a, end_b = _fit([(0, 0), (leg_a, 0), (0, leg_b)])
    draw.polygon([right, end_a, end_b], outline=INK, width=2)
    mark = 8  # the right-angle square
    draw.rectangle((right[0], right[1] - mark, right[0] + mark, right[1]), outline=INK, width=1)
    _label(draw, ((right[0] + end_a[0]) / 2, right[1] + 11), str(leg_a))
    _label(draw, (right[0] - 11, (right[1] + end_b[1]) / 2), str(leg_b))
    middle = ((end_a[0] + end_b[0]) / 2, (end_a[1] + end_b[1]) / 2)
    _label(draw, _outside(middle, [right, end_a, end_b], 11), "x")
    return "<image>Find x.", latex_sqrt(leg_a * leg_a + leg_b * leg_b), image


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str, Image.Image]]] = {
    "fill": _fill,
    "sides": _sides,
    "colour": _colour,
    "count": _count,
    "angle": _angle,
    "perimeter": _perimeter,
    "area": _area,
    "hypotenuse": _hypotenuse,
}
KINDS: tuple[str, ...] = tuple(_MAKERS)


# ---- drawing helpers ---------------------------------------------------------------------


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _cells(rng: random.Random, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` distinct cells of a 3x3 grid as ``(left, top, right, bottom)`` boxes."""
    size = CANVAS // 3
    pad = 8
    picks = rng.sample(range(9), count)
    boxes = []
    for cell in picks:
        column, row = cell % 3, cell // 3
        boxes.append((column * size + pad, row * size + pad, (column + 1) * size - pad, (row + 1) * size - pad))
    return boxes


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=INK)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=INK)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill, outline=INK)


def _fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and centre figure coordinates (y up) into the canvas margin (y down)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    scale = (CANVAS - 2 * MARGIN) / span
    dx = (CANVAS - (max(xs) - min(xs)) * scale) / 2
    dy = (CANVAS - (max(ys) - min(ys)) * scale) / 2
    return [(dx + (x - min(xs)) * scale, CANVAS - dy - (y - min(ys)) * scale) for x, y in points]


def _outside(point: tuple[float, float], polygon: list[tuple[float, float]], distance: float) -> tuple[float, float]:
    """``point`` pushed ``distance`` px away from the polygon's centroid (where a label fits)."""
    cx = sum(p[0] for p in polygon) / len(polygon)
    cy = sum(p[1] for p in polygon) / len(polygon)
    norm = math.hypot(point[0] - cx, point[1] - cy) or 1.0
    return point[0] + (point[0] - cx) / norm * distance, point[1] + (point[1] - cy) / norm * distance


def _label(draw: ImageDraw.ImageDraw, at: tuple[float, float], text: str) -> None:
    # On a white patch, so that a label over a line stays readable.
    left, top, right, bottom = draw.textbbox(at, text, font=_font(), anchor="mm")
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(255, 255, 255))
    draw.text(at, text, fill=INK, font=_font(), anchor="mm")


def _dashed(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], dash: float = 4) -> None:
    length = math.hypot(end[0] - start[0], end[1] - start[1])
    steps = max(1, int(length // dash))
    for step in range(0, steps, 2):
        t0, t1 = step / steps, min(1.0, (step + 1) / steps)
        draw.line(
            [(start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t) for t in (t0, t1)],
            fill=INK,
            width=1,
        )


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=13)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--train", type=int, default=1024, help="number of training examples")
    parser.add_argument("--test", type=int, default=256, help="number of test examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated kinds, of {','.join(KINDS)}")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        parser.error("--train and --test must be at least 1")
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    try:
        check_kinds(kinds)
    except ValueError as err:
        parser.error(str(err))
    for path in write_task(args.out, args.train, args.test, args.seed, kinds):
        print(path)


if __name__ == "__main__":
    main()
