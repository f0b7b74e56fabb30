"""Geometry for the detection, affordance and trajectory tasks: pure functions on canonical
coordinates (floats in [0, 1] of the original image, x right, y down).

- boxes are ``[x1, y1, x2, y2]`` with x1 <= x2, y1 <= y2; arrays of boxes have shape (N, 4);
- points are ``[x, y]``; arrays of points have shape (N, 2);
- regions are ``{"polygon": [[x, y], ...]}`` (shapely) or ``{"rle": <COCO RLE>, ...}``
  (pycocotools; the mask covers the original image, its ``size`` is ``[height, width]``).

Box overlap follows the usual continuous definition (no COCO "+1" pixel convention); matching
uses :func:`scipy.optimize.linear_sum_assignment`; region membership uses shapely and
``pycocotools.mask``.  Trajectory distances are Euclidean in canonical space, so on a
non-square image a unit of x and a unit of y are different pixel lengths (the ShareRobot
convention: coordinates divided by width and height).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "box_giou",
    "box_iou",
    "discrete_frechet",
    "hausdorff",
    "hungarian_match",
    "iou_matrix",
    "mask_pixels",
    "mask_values",
    "points_in_polygon",
    "points_in_region",
    "points_in_rle",
    "rmse_index_matched",
]

_EPS = 1e-12


def _boxes(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    return arr


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) -> (N, M).

    A pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    a, b = _boxes(a), _boxes(b)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > _EPS, inter / np.maximum(union, _EPS), 0.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (4,) and (4,); 0 if their union is empty."""
    return float(iou_matrix([a], [b])[0, 0])


def box_giou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU (Rezatofighi et al., 2019) of two boxes, in [-1, 1]:
    ``IoU - (|C| - |A u B|) / |C|`` with C the smallest box enclosing both.
    Two degenerate boxes (empty enclosing box) give 1 if they coincide, else -1; a box with
    inverted corners (x1 > x2 or y1 > y2) is no box: -1."""
    a, b = _boxes(a)[0], _boxes(b)[0]
    if a[0] > a[2] or a[1] > a[3] or b[0] > b[2] or b[1] > b[3]:
        return -1.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if enclose <= _EPS:
        return 1.0 if np.allclose(a, b) else -1.0
    iou = inter / union if union > _EPS else 0.0
    return float(iou - (enclose - union) / enclose)


def hungarian_match(scores: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one assignment maximising the total score of an (N, M) matrix (for example
    :func:`iou_matrix` of ground truth x predictions) -> ``[(row, col), ...]`` with
    ``min(N, M)`` pairs, sorted by row.  Pairs with score 0 are kept (callers decide)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return []
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


# ----------------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------------
def _points(p: Any) -> np.ndarray:
    return np.asarray(p, dtype=np.float64).reshape(-1, 2)


def _in_image(pts: np.ndarray) -> np.ndarray:
    return np.all((pts >= 0.0) & (pts <= 1.0), axis=1)


def points_in_polygon(points: Sequence[Sequence[float]], polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """(N,) bool: which points (N, 2) lie in the polygon (K, 2) (its boundary counts as inside).

    Points outside the image ([0, 1]^2) are misses even if the polygon reaches there.  An
    invalid (self-intersecting) polygon is repaired with ``shapely.make_valid`` first.
    """
    import shapely

    pts = _points(points)
    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    poly = shapely.Polygon(np.asarray(polygon, dtype=np.float64).reshape(-1, 2))
    if not poly.is_valid:
        poly = shapely.make_valid(poly)
    inside = np.asarray(shapely.intersects_xy(poly, pts[:, 0], pts[:, 1]), dtype=bool)
    return inside & _in_image(pts)


def _decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = dict(rle)
    h, w = (int(v) for v in rle["size"])
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, h, w)
    elif isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode("ascii")
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2: a harmless copy= DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), dtype=bool)


def mask_pixels(points: Sequence[Sequence[float]], width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixel each canonical point (N, 2) reads in a ``height`` x ``width`` mask, the way
    RoboPoint's ``summarize_vqa.py`` (wentaoyuan/RoboPoint) and FlagEvalMM's Where2Place
    evaluator do it: ``col = int(x * width)``, ``row = int(y * height)`` (truncation toward
    zero, so x in (-1/width, 0) still reads column 0, and x = 1 reads column ``width``, outside).
    Returns ``(rows, cols, in_range)``: (N,) int64 arrays (0 where out of range) and the (N,)
    bool ``0 <= col < width and 0 <= row < height``."""
    pts = _points(points)
    finite = np.isfinite(pts).all(axis=1)
    safe = np.where(finite[:, None], pts, -2.0) * np.array([width, height], dtype=np.float64)
    safe = np.clip(safe, -2.0, 2.0 * max(width, height) + 2)  # huge values: out of range, no overflow
    cols, rows = np.trunc(safe[:, 0]).astype(np.int64), np.trunc(safe[:, 1]).astype(np.int64)
    ok = finite & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    return np.where(ok, rows, 0), np.where(ok, cols, 0), ok


def mask_values(points: Sequence[Sequence[float]], mask: np.ndarray) -> np.ndarray:
    """(N,) float: the value of ``mask`` (H, W) at each point's pixel (:func:`mask_pixels`), 0 for
    a point outside the image."""
    mask = np.asarray(mask)
    h, w = mask.shape[:2]
    rows, cols, ok = mask_pixels(points, w, h)
    return np.where(ok, mask[rows, cols].astype(np.float64), 0.0)


def points_in_rle(points: Sequence[Sequence[float]], rle: dict) -> np.ndarray:
    """(N,) bool: which points (N, 2) fall on a foreground pixel of a COCO RLE mask.

    The mask has ``rle["size"] == [H, W]`` over the whole image; point (x, y) reads pixel
    ``(row, col) = (int(y * H), int(x * W))`` (:func:`mask_pixels`: RoboPoint's convention;
    x = 1 or y = 1 is outside, as is anything outside the pixel grid).  Compressed
    (``counts`` bytes/str) and uncompressed (``counts`` list) RLE are accepted.
    """
    return mask_values(points, _decode_rle(rle)) > 0


def points_in_region(points: Sequence[Sequence[float]], region: dict) -> np.ndarray:
    """(N,) bool membership of points in a region ``{"polygon": [[x, y], ...]}``,
    ``{"rle": <COCO RLE>, "size": [h, w]}``, or a union: ``{"polygons": [[[x, y], ...], ...]}``
    or ``{"regions": [<region>, ...]}``."""
    if "polygon" in region:
        return points_in_polygon(points, region["polygon"])
    if "polygons" in region or "regions" in region:
        pts = _points(points)
        out = np.zeros(len(pts), dtype=bool)
        for poly in region.get("polygons", []):
            out |= points_in_polygon(pts, poly)
        for sub in region.get("regions", []):
            out |= points_in_region(pts, sub)
        return out
    if "rle" in region:
        rle = dict(region["rle"])
        rle.setdefault("size", region.get("size"))
        return points_in_rle(points, rle)
    raise ValueError(f"region needs 'polygon', 'polygons', 'regions' or 'rle', got keys {sorted(region)}")


# ----------------------------------------------------------------------------------------------
# trajectories
# ----------------------------------------------------------------------------------------------
def _pairwise(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))


def discrete_frechet(p: Sequence[Sequence[float]], q: Sequence[Sequence[float]]) -> float:
    """Discrete Fréchet distance (Eiter & Mannila, 1994) between polylines p (N, 2) and
    q (M, 2): the smallest over monotone couplings of the largest coupled distance.

    Dynamic programme ``ca[i, j] = max(d(p_i, q_j), min(ca[i-1, j], ca[i-1, j-1], ca[i, j-1]))``
    in O(N M).  Both polylines must be non-empty.
    """
    p, q = _points(p), _points(q)
    if len(p) == 0 or len(q) == 0:
        raise ValueError("discrete_frechet needs two non-empty polylines")
    d = _pairwise(p, q)
    n, m = d.shape
    ca = np.empty_like(d)
    ca[0, 0] = d[0, 0]
    for i in range(1, n):
        ca[i, 0] = max(ca[i - 1, 0], d[i, 0])
    for j in range(1, m):
        ca[0, j] = max(ca[0, j - 1], d[0, j])
    for i in range(1, n):
        for j in range(1, m):
            ca[i, j] = max(d[i, j], min(ca[i - 1, j], ca[i - 1, j - 1], ca[i, j - 1]))
    return float(ca[-1, -1])


def hausdorff(p: Sequence[Sequence[float]], q: Sequence[Sequence[float]]) -> float:
    """Symmetric Hausdorff distance between point sets p (N, 2) and q (M, 2):
    ``max(max_i min_j d(p_i, q_j), max_j min_i d(p_i, q_j))``.  Both must be non-empty."""
    p, q = _points(p), _points(q)
    if len(p) == 0 or len(q) == 0:
        raise ValueError("hausdorff needs two non-empty point sets")
    d = _pairwise(p, q)
    return float(max(d.min(axis=1).max(), d.min(axis=0).max()))


def rmse_index_matched(p: Sequence[Sequence[float]], q: Sequence[Sequence[float]]) -> float:
    """Root mean squared Euclidean distance over the first ``k = min(N, M)`` index-matched
    points of p (N, 2) and q (M, 2): ``sqrt(mean_i ||p_i - q_i||^2)``, i < k (ShareRobot)."""
    p, q = _points(p), _points(q)
    k = min(len(p), len(q))
    if k == 0:
        raise ValueError("rmse_index_matched needs two non-empty polylines")
    return float(math.sqrt(((p[:k] - q[:k]) ** 2).sum(-1).mean()))
