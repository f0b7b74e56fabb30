"""Validating ground-truth geometry and converting it to the canonical frame.

Canonical geometry (see :mod:`vlm_grpo_ma.data.sample`) is floats in [0, 1] of the ORIGINAL
image.  Data files write geometry in one of three coordinate systems (``coords``):

- ``"pixel"``:   pixels of the original image, continuous (the image spans ``[0, w] x [0, h]``,
  as in COCO): ``x01 = x / w``, ``y01 = y / h``;
- ``"norm"``:    already in [0, 1]: unchanged;
- ``"rel1000"``: integers 0..1000 relative to the image (Qwen2-VL / Qwen3-VL style):
  ``x01 = x / 1000``.

Each converter checks what it reads and raises a :class:`~vlm_grpo_ma.data.errors.FieldError`
naming the field (``"boxes[2]"``) and the problem; loaders add the file and line.  Checks:
every coordinate a finite number (not a string, bool or null), the right arity (4 for a box, 2
for a point, >= 2 points for a trajectory, >= 3 for a polygon), boxes not inverted
(``x1 <= x2``, ``y1 <= y2``) and everything inside the image up to ``tolerance`` (a fraction of
the side, 0.01 = 1 %); values within the tolerance are clamped into [0, 1].

Target keys that carry geometry, and what they hold (other keys pass through unchanged):

============== ====================================================================
``box``        one box ``[x1, y1, x2, y2]``
``boxes``      a list of boxes (may be empty); ``crowd_boxes`` likewise
``point``      one point ``[x, y]``
``points``     a list of points (may be empty)
``trajectory`` a list of >= 2 points
``polygon``    a list of >= 3 points ``[[x, y], ...]`` or a flat ``[x1, y1, x2, y2, ...]``
``region``     ``{"polygon": ...}``, ``{"rle": {...}, "size": [h, w]}``, a raw COCO RLE
               ``{"counts": ..., "size": [h, w]}`` or a bare polygon list
``regions``    a list of regions
============== ====================================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from vlm_grpo_ma.data.errors import FieldError

COORD_SYSTEMS = ("pixel", "norm", "rel1000")
DEFAULT_TOLERANCE = 0.01

Size = Optional[tuple[int, int]]  # (width, height) of the original image, or None if unknown


def check_coords(coords: Any, field: str = "coords") -> str:
    """``coords`` if it names a known coordinate system, else FieldError."""
    if coords not in COORD_SYSTEMS:
        raise FieldError(field, f"unknown coordinate system {coords!r} (expected one of {list(COORD_SYSTEMS)})")
    return coords


def number(value: Any, field: str) -> float:
    """A finite float from a JSON number; strings, booleans, null, NaN and inf are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(field, f"non-numeric coordinate {value!r} ({type(value).__name__})", "not_numeric")
    v = float(value)
    if not math.isfinite(v):
        raise FieldError(field, f"non-finite coordinate {value!r}", "not_numeric")
    return v


def _scale(coords: str, size: Size, field: str) -> tuple[float, float]:
    """Divisors (sx, sy) taking ``coords`` to [0, 1]."""
    if coords == "norm":
        return 1.0, 1.0
    if coords == "rel1000":
        return 1000.0, 1000.0
    if coords == "pixel":
        if size is None:
            raise FieldError(field, "pixel coordinates need an image to be relative to, and the record has none", "bad_value")
        w, h = size
        return float(w), float(h)
    raise FieldError("coords", f"unknown coordinate system {coords!r} (expected one of {list(COORD_SYSTEMS)})")


def _unit(v01: float, raw: float, axis: str, field: str, coords: str, size: Size, tol: float) -> float:
    """Check a canonical value against [0, 1] +- tol and clamp it."""
    if v01 < -tol or v01 > 1.0 + tol:
        if coords == "pixel" and size is not None:
            frame = f"the {size[0]}x{size[1]} image"
        else:
            frame = {"norm": "[0, 1]", "rel1000": "0..1000"}.get(coords, coords)
        raise FieldError(
            field,
            f"{axis} = {raw:g} is outside {frame} ({coords} coordinates, tolerance {tol:g} of the side)",
            "out_of_image",
        )
    return min(1.0, max(0.0, v01))


def _pair(value: Any, field: str, what: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise FieldError(field, f"{what} must be a list of 2 numbers [x, y], got {type(value).__name__}", "bad_arity")
    if len(value) != 2:
        raise FieldError(field, f"{what} must have 2 numbers [x, y], got {len(value)}", "bad_arity")
    return value


def convert_point(p: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE) -> list[float]:
    """One point ``[x, y]`` in ``coords`` -> canonical ``[x01, y01]``."""
    x, y = _pair(p, field, "a point")
    x, y = number(x, f"{field}[0]"), number(y, f"{field}[1]")
    sx, sy = _scale(coords, size, field)
    return [_unit(x / sx, x, "x", field, coords, size, tol), _unit(y / sy, y, "y", field, coords, size, tol)]


def convert_box(b: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE) -> list[float]:
    """One box ``[x1, y1, x2, y2]`` in ``coords`` -> canonical xyxy; inverted boxes are errors
    (a zero-width box, ``x1 == x2``, is allowed)."""
    if not isinstance(b, (list, tuple)):
        raise FieldError(field, f"a box must be a list [x1, y1, x2, y2], got {type(b).__name__}", "bad_arity")
    if len(b) != 4:
        raise FieldError(field, f"a box must have 4 numbers [x1, y1, x2, y2], got {len(b)}", "bad_arity")
    x1, y1, x2, y2 = (number(v, f"{field}[{i}]") for i, v in enumerate(b))
    if x1 > x2:
        raise FieldError(field, f"box is inverted (x1 > x2: {x1:g} > {x2:g})", "inverted_box")
    if y1 > y2:
        raise FieldError(field, f"box is inverted (y1 > y2: {y1:g} > {y2:g})", "inverted_box")
    sx, sy = _scale(coords, size, field)
    return [
        _unit(x1 / sx, x1, "x1", field, coords, size, tol),
        _unit(y1 / sy, y1, "y1", field, coords, size, tol),
        _unit(x2 / sx, x2, "x2", field, coords, size, tol),
        _unit(y2 / sy, y2, "y2", field, coords, size, tol),
    ]


def _list(value: Any, field: str, what: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise FieldError(field, f"{what} must be a list, got {type(value).__name__}", "bad_value")
    return value


def convert_boxes(bs: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE) -> list[list[float]]:
    """A list of boxes (may be empty)."""
    return [convert_box(b, f"{field}[{i}]", coords, size, tol) for i, b in enumerate(_list(bs, field, "boxes"))]


def convert_points(
    ps: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE, min_len: int = 0, what: str = "points"
) -> list[list[float]]:
    """A list of points ``[[x, y], ...]`` with at least ``min_len`` of them."""
    ps = _list(ps, field, what)
    if len(ps) < min_len:
        raise FieldError(field, f"{what} need at least {min_len} points, got {len(ps)}", "bad_arity")
    return [convert_point(p, f"{field}[{i}]", coords, size, tol) for i, p in enumerate(ps)]


def convert_polygon(poly: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE) -> list[list[float]]:
    """A polygon as ``[[x, y], ...]`` or flat ``[x1, y1, x2, y2, ...]`` (COCO) -> canonical point
    list with >= 3 vertices."""
    poly = _list(poly, field, "a polygon")
    if poly and not isinstance(poly[0], (list, tuple)):  # flat COCO form
        if len(poly) % 2:
            raise FieldError(field, f"a flat polygon needs an even number of values, got {len(poly)}", "bad_arity")
        poly = [poly[i : i + 2] for i in range(0, len(poly), 2)]
    return convert_points(poly, field, coords, size, tol, min_len=3, what="a polygon")


def _rle_size(value: Any, field: str) -> list[int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise FieldError(field, f"RLE size must be [height, width] of positive integers, got {value!r}", "bad_value")
    return [int(value[0]), int(value[1])]


def canonical_rle(rle: Any, field: str, size: Size = None) -> dict:
    """A COCO RLE (compressed, ``counts`` a string, or uncompressed, ``counts`` a list) ->
    ``{"rle": {"size": [h, w], "counts": str}, "size": [h, w]}``.  An RLE is a mask on the pixel
    grid of the original image, so its size must be the image's when the image is known."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise FieldError(field, "an RLE must be a dict with 'counts' and 'size'", "bad_value")
    h, w = _rle_size(rle["size"], f"{field}.size")
    if size is not None and (w, h) != tuple(size):
        raise FieldError(
            f"{field}.size", f"RLE size [h, w] = [{h}, {w}] does not match the {size[0]}x{size[1]} image", "bad_value"
        )
    counts = rle["counts"]
    from pycocotools import mask as mask_utils

    if isinstance(counts, list):  # uncompressed -> compressed
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise FieldError(f"{field}.counts", "uncompressed RLE counts must be non-negative integers", "bad_value")
        _check_run_total(sum(counts), h, w, field)
        counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
    elif isinstance(counts, (str, bytes)):
        if isinstance(counts, bytes):
            try:
                counts = counts.decode("ascii")
            except UnicodeDecodeError:
                raise FieldError(f"{field}.counts", "unreadable RLE (not ASCII)", "bad_value") from None
        _check_run_total(sum(rle_runs(counts, f"{field}.counts")), h, w, field)
    else:
        raise FieldError(f"{field}.counts", f"RLE counts must be a string or a list, got {type(counts).__name__}", "bad_value")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"rle": {"size": [h, w], "counts": counts}, "size": [h, w]}


def _check_run_total(total: int, h: int, w: int, field: str) -> None:
    # pycocotools' rleDecode writes cnts[j] pixels per run with no bound: the runs of a mask must
    # cover its h x w pixels exactly (too many would write past the mask, too few leave it unset)
    if total != h * w:
        raise FieldError(f"{field}.counts", f"the RLE's runs cover {total} pixels, its size [{h}, {w}] has {h * w}",
                         "bad_value")


def rle_runs(counts: str, field: str = "counts") -> list[int]:
    """The run lengths of a compressed COCO RLE string (FieldError if it is malformed).

    The format of pycocotools' ``rleToString`` / ``rleFrString`` (``common/maskApi.c``,
    https://github.com/cocodataset/cocoapi): each run is a variable-length integer in 5-bit
    groups, one character each (``chr(group + 48)``; bit 0x20 = more groups follow, bit 0x10 of
    the last group = negative), and from the third run on a run is stored as the difference from
    the run two before.  pycocotools reads any string without a check; this reads it the same way
    and refuses characters outside the alphabet, a truncated last run and negative runs."""
    runs: list[int] = []
    x = k = 0
    more = False
    for i, ch in enumerate(counts):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise FieldError(field, f"unreadable RLE: character {ch!r} at {i} is not in the RLE alphabet", "bad_value")
        x |= (c & 0x1F) << (5 * k)
        more = bool(c & 0x20)
        k += 1
        if more:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise FieldError(field, f"unreadable RLE: run {len(runs)} is negative ({x})", "bad_value")
        runs.append(x)
        x = k = 0
    if more:
        raise FieldError(field, "unreadable RLE: the string ends inside a run", "bad_value")
    return runs


def convert_region(r: Any, field: str, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE) -> dict:
    """A region -> ``{"polygon": [[x, y], ...]}`` (canonical) or ``{"rle": ..., "size": [h, w]}``."""
    if isinstance(r, (list, tuple)):
        return {"polygon": convert_polygon(r, field, coords, size, tol)}
    if not isinstance(r, dict):
        raise FieldError(field, f"a region must be a polygon list or a dict, got {type(r).__name__}", "bad_value")
    if "polygon" in r:
        return {"polygon": convert_polygon(r["polygon"], f"{field}.polygon", coords, size, tol)}
    if "rle" in r:
        out = canonical_rle(r["rle"], f"{field}.rle", size)
        if "size" in r and _rle_size(r["size"], f"{field}.size") != out["size"]:
            raise FieldError(f"{field}.size", "region size differs from its RLE's size", "bad_value")
        return out
    if "counts" in r:
        return canonical_rle(r, field, size)
    raise FieldError(field, "a region needs 'polygon' or 'rle'", "missing_field")


_CONVERTERS: dict[str, Callable[..., Any]] = {
    "box": convert_box,
    "boxes": convert_boxes,
    "crowd_boxes": convert_boxes,
    "point": convert_point,
    "points": convert_points,
    "trajectory": lambda v, f, c, s, t: convert_points(v, f, c, s, t, min_len=2, what="a trajectory"),
    "polygon": convert_polygon,
    "region": convert_region,
    "regions": lambda v, f, c, s, t: [convert_region(r, f"{f}[{i}]", c, s, t) for i, r in enumerate(_list(v, f, "regions"))],
}

#: target keys holding geometry (converted); every other key passes through unchanged
GEOMETRY_KEYS = tuple(_CONVERTERS)


def convert_target(target: Any, coords: str, size: Size, tol: float = DEFAULT_TOLERANCE, field: str = "target") -> dict:
    """A target dict with its geometry converted to canonical form (a new dict).

    Also checks that ``labels`` (if present) has one entry per box in ``boxes``.
    """
    if not isinstance(target, dict):
        raise FieldError(field, f"must be an object, got {type(target).__name__}", "bad_value")
    check_coords(coords)
    out = {}
    for key, value in target.items():
        conv = _CONVERTERS.get(key)
        out[key] = conv(value, f"{field}.{key}", coords, size, tol) if conv else value
    if "labels" in out and "boxes" in out:
        labels = out["labels"]
        if not isinstance(labels, list) or len(labels) != len(out["boxes"]):
            n = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise FieldError(f"{field}.labels", f"labels must be a list with one entry per box ({len(out['boxes'])}), got {n}", "bad_arity")
    return out
