"""Deterministic PIL drawing helpers for the synthetic geometric tasks.

Images are small (112 x 112 by default: a 4 x 4 grid of merged vision tokens for Qwen2.5-VL)
so that a tiny model trains on them on a CPU.  The background is a faint fixed colour gradient
(red falls with x, blue falls with y, up to :data:`GRADIENT_LEVEL` / 255 on black): Qwen2.5-VL's
vision tower has no absolute position embedding, and on a flat background it cannot tell where a
shape is (RL on the tiny model started clearly faster with the gradient).

Every random choice comes from :func:`rng_for` (``random.Random`` seeded with the string
``"<task>:<seed>:<index>"``, which Python hashes with SHA-512), so sample ``i`` of a seed is the
same whatever ``n`` is, across processes and machines; drawing has no other randomness, so the
same seed gives byte-identical pixels.
"""

from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlm_grpo_ma.data.sample import Sample

__all__ = [
    "synthetic_sample",
    "COLOURS",
    "article",
    "GRADIENT_LEVEL",
    "SHAPES",
    "draw_shape",
    "gradient_background",
    "image_ref",
    "location_words",
    "new_canvas",
    "place_boxes",
    "px_box_to_unit",
    "rng_for",
]

#: distinct saturated colours, far from the dark gradient background
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 255),
    "yellow": (245, 225, 40),
    "magenta": (235, 60, 225),
    "cyan": (40, 225, 235),
    "orange": (250, 145, 20),
    "white": (245, 245, 245),
}
#: shapes :func:`draw_shape` knows
SHAPES = ("square", "circle", "triangle")
#: the gradient's largest channel value (out of 255)
GRADIENT_LEVEL = 40
DEFAULT_SIZE = (112, 112)


def rng_for(task: str, seed: int, index: int) -> random.Random:
    """The random generator of sample ``index`` of ``task`` under ``seed``."""
    return random.Random(f"{task}:{seed}:{index}")


def gradient_background(width: int, height: int, level: int = GRADIENT_LEVEL) -> Image.Image:
    """RGB image whose red channel falls linearly with x from ``level`` to 0, blue with y from
    ``level`` to 0, green 0."""
    xs = np.linspace(level, 0, width) if width > 1 else np.full(1, level)
    ys = np.linspace(level, 0, height) if height > 1 else np.full(1, level)
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 0] = np.round(xs)[None, :].astype(np.uint8)
    arr[:, :, 2] = np.round(ys)[:, None].astype(np.uint8)
    return Image.fromarray(arr)  # uint8 [H, W, 3]: RGB (the mode argument is deprecated in Pillow 11.3)


def px_box_to_unit(box_px: Sequence[int], width: int, height: int) -> list[float]:
    """Integer pixel box (x0, y0, x1, y1) covering pixels x0..x1-1, y0..y1-1 -> canonical box."""
    x0, y0, x1, y1 = box_px
    return [x0 / width, y0 / height, x1 / width, y1 / height]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box_px: Sequence[int], colour: tuple[int, int, int]) -> None:
    """Draw a filled ``shape`` that exactly spans the pixel box (x0, y0, x1, y1), end exclusive
    (so the canonical box from :func:`px_box_to_unit` is its tight bounding box)."""
    x0, y0, x1, y1 = box_px
    xe, ye = x1 - 1, y1 - 1  # PIL's coordinates are inclusive
    if shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=colour)
    elif shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + xe) / 2, y0), (xe, ye), (x0, ye)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _overlaps(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _free_positions(
    size: tuple[int, int], width: int, height: int, margin: int, gap: int, others: Sequence[Sequence[int]]
) -> np.ndarray:
    """(N, 2) array of every top-left corner (x0, y0), in row-major order, where a box of
    ``size`` = (w, h) lies ``margin`` pixels inside the image and ``gap`` pixels apart from each
    box in ``others`` (empty when there is none)."""
    w, h = size
    nx, ny = width - 2 * margin - w + 1, height - 2 * margin - h + 1
    if nx <= 0 or ny <= 0:
        return np.zeros((0, 2), dtype=int)
    free = np.ones((ny, nx), dtype=bool)  # free[y0 - margin, x0 - margin]
    for o in others:
        # a box at x0 overlaps o (see _overlaps) iff o[0] - w - gap < x0 < o[2] + gap; same in y
        xa, xb = max(o[0] - w - gap + 1 - margin, 0), min(o[2] + gap - margin, nx)
        ya, yb = max(o[1] - h - gap + 1 - margin, 0), min(o[3] + gap - margin, ny)
        if xa < xb and ya < yb:
            free[ya:yb, xa:xb] = False
    ys, xs = np.nonzero(free)
    return np.stack([xs + margin, ys + margin], axis=1)


def place_boxes(
    rng: random.Random,
    sizes: Sequence[tuple[int, int]],
    width: int,
    height: int,
    margin: int = 2,
    gap: int = 3,
    avoid: Sequence[Sequence[int]] = (),
    tries: int = 200,
    min_side: int | None = None,
) -> list[tuple[int, int, int, int]]:
    """Place boxes of the given (w, h) pixel sizes at random, inside the image with ``margin``
    pixels to spare and ``gap`` pixels apart from each other and from ``avoid`` boxes.

    Each box first gets ``tries`` uniform random positions (rejection sampling).  If all collide,
    the box is put at a position drawn (with ``rng``) from the exhaustive list of free positions,
    so a layout that fits is always found.  If no position is free and ``min_side`` is given, the
    box shrinks (each side to 90%, not below ``min_side``) until one is.  Every choice comes from
    ``rng``, so the same generator state gives the same layout.

    Returns the boxes (x0, y0, x1, y1), end exclusive, possibly smaller than asked when
    ``min_side`` is given.  Raises ValueError if a box fits nowhere (and cannot shrink further).
    """
    placed: list[tuple[int, int, int, int]] = []
    for w, h in sizes:
        box = None
        if w + 2 * margin <= width and h + 2 * margin <= height:
            for _ in range(tries):
                x0 = rng.randint(margin, width - margin - w)
                y0 = rng.randint(margin, height - margin - h)
                cand = (x0, y0, x0 + w, y0 + h)
                if not any(_overlaps(cand, o, gap) for o in [*placed, *avoid]):
                    box = cand
                    break
        while box is None:
            free = _free_positions((w, h), width, height, margin, gap, [*placed, *avoid])
            if len(free):
                x0, y0 = (int(v) for v in free[rng.randrange(len(free))])
                box = (x0, y0, x0 + w, y0 + h)
            elif min_side is not None and (w > min_side or h > min_side):
                w, h = max(min_side, min(w - 1, round(0.9 * w))), max(min_side, min(h - 1, round(0.9 * h)))
            else:
                raise ValueError(f"cannot place a {w}x{h} box in a {width}x{height} image next to {len(placed) + len(avoid)} other boxes")
        placed.append(box)
    return placed


def location_words(x: float, y: float) -> str:
    """Rough location of a canonical point in words: ``"top left"``, ``"center"``,
    ``"bottom"``, ... (the image split in thirds)."""
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    return f"{row} {col}".strip() or "center"


def article(noun: str) -> str:
    """``"an"`` before a vowel sound (first letter a, e, i, o, u), else ``"a"``."""
    return "an" if noun[:1].lower() in "aeiou" and noun[:1] else "a"


def image_ref(img: Image.Image, cache_dir: str | os.PathLike | None, task: str, seed: int, index: int) -> Image.Image | str:
    """The image itself (``cache_dir`` None), or the path of its PNG under
    ``<cache_dir>/<task>/seed<seed>/<index>.png`` (written if missing; PNG encoding of the
    same pixels by the same Pillow gives the same bytes)."""
    if cache_dir is None:
        return img
    folder = os.path.join(os.fspath(cache_dir), task, f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{index:06d}.png")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    return path


def new_canvas(size: tuple[int, int] = DEFAULT_SIZE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A gradient background of ``size`` = (width, height) and a drawer on it."""
    img = gradient_background(*size)
    return img, ImageDraw.Draw(img)


def synthetic_sample(task: str, seed: int, index: int, *, prompt: dict, target: dict, images: Sequence = (),
                     image_sizes: Sequence = (), **meta) -> Sample:
    """One synthetic :class:`~vlm_grpo_ma.data.sample.Sample` of every task the same way: id
    ``<task>-synthetic-<seed>-<index>``, ``meta`` = ``source: synthetic``, the seed and the index,
    then the task's own keys (``reasoning``, ...)."""
    return Sample(id=f"{task}-synthetic-{seed}-{index}", task=task, images=list(images), image_sizes=list(image_sizes),
                  prompt=prompt, target=target, meta={"source": "synthetic", "seed": seed, "index": index, **meta})
