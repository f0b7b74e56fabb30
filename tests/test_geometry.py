"""vlm_grpo_ma.tasks._geometry: hand-computed IoU / GIoU / matching / regions / DFD / HD / RMSE, and
trajectory distances against independent computations (brute force, scipy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.spatial.distance import directed_hausdorff

from vlm_grpo_ma.tasks._geometry import (
    box_giou,
    box_iou,
    discrete_frechet,
    hausdorff,
    hungarian_match,
    iou_matrix,
    points_in_polygon,
    points_in_region,
    points_in_rle,
    rmse_index_matched,
)


# ---------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b, iou, giou",
    [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # overlap 1, union 7, hull 9
        ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: hull 3, union 2
        ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),  # nested: hull = outer box
        ([0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.6], 1.0, 1.0),
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0, 0.0),  # touching: hull 2 = union
    ],
)
def test_iou_giou_hand_computed(a, b, iou, giou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)
    assert box_giou(a, b) == pytest.approx(giou)
    assert box_giou(b, a) == pytest.approx(giou)


def test_degenerate_boxes():
    assert box_iou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 0.0  # empty union
    assert box_giou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 1.0
    assert box_giou([0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.6, 0.6]) == pytest.approx(-1.0)
    assert box_iou([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0


def test_iou_matrix_shape_and_values():
    a = [[0, 0, 2, 2], [10, 10, 11, 11]]
    b = [[1, 1, 3, 3], [0, 0, 2, 2], [10, 10, 11, 11]]
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m, [[1 / 7, 1, 0], [0, 0, 1]])
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)


def test_hungarian_beats_greedy():
    # greedy takes (0,0)=0.9 then (1,1)=0.1 (total 1.0); the optimum is (0,1)+(1,0) = 1.65
    scores = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert hungarian_match(scores) == [(0, 1), (1, 0)]


def test_hungarian_rectangular_and_empty():
    scores = np.array([[0.0, 0.2, 0.7]])
    assert hungarian_match(scores) == [(0, 2)]
    assert hungarian_match(scores.T) == [(2, 0)]
    assert hungarian_match(np.zeros((0, 3))) == []


def test_hungarian_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, m = (int(v) for v in rng.integers(1, 5, size=2))
        s = rng.random((n, m))
        pairs = hungarian_match(s)
        best = 0.0
        k = min(n, m)
        for rows in itertools.permutations(range(n), k):
            for cols in itertools.permutations(range(m), k):
                best = max(best, sum(s[r, c] for r, c in zip(rows, cols)))
        assert len(pairs) == k
        assert sum(s[r, c] for r, c in pairs) == pytest.approx(best)


# ---------------------------------------------------------------------------------------------
# regions
# ---------------------------------------------------------------------------------------------
def test_points_in_polygon_hand():
    tri = [[0, 0], [1, 0], [0, 1]]
    pts = [[0.2, 0.2], [0.6, 0.6], [0.5, 0.5], [0.0, 0.0], [1.2, -0.1]]
    # inside, outside, on the hypotenuse (boundary counts), a vertex, outside everything
    assert points_in_polygon(pts, tri).tolist() == [True, False, True, True, False]
    assert points_in_polygon([], tri).tolist() == []


def test_points_outside_image_miss_even_inside_polygon():
    square = [[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]
    assert points_in_polygon([[-0.1, 0.1], [0.1, 0.1], [0.1, -0.01]], square).tolist() == [False, True, False]


def test_self_intersecting_polygon_is_repaired():
    bowtie = [[0, 0], [1, 1], [1, 0], [0, 1]]  # two triangles meeting at (0.5, 0.5)
    assert points_in_polygon([[0.9, 0.5], [0.5, 0.9], [0.1, 0.5]], bowtie).tolist() == [True, False, True]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def test_points_in_rle_hand():
    mask = np.zeros((2, 4), dtype=np.uint8)  # H=2, W=4
    mask[0, 2] = 1
    mask[1, 3] = 1
    rle = _rle(mask)
    pts = [[0.6, 0.3], [0.4, 0.3], [1.0, 1.0], [0.74, 0.99], [1.01, 0.9], [0.6, -0.6], [0.99, 0.99], [-0.1, 0.2]]
    # RoboPoint's pixel rule int(x * W): (0.6,0.3)->row 0,col 2 on; (0.4,0.3)->col 1 off;
    # (1,1)->col 4 / row 2: outside; (0.74,0.99)->row 1,col 2 off; (1.01,0.9),
    # (0.6,-0.6) outside; (0.99,0.99)->(1,3) on; (-0.1, 0.2) -> int(-0.4) = 0: column 0 (off here)
    expect = [True, False, False, False, False, False, True, False]
    assert points_in_rle(pts, rle).tolist() == expect
    # bytes counts and an uncompressed RLE (column-major run lengths) read the same
    raw = mask_utils.encode(np.asfortranarray(mask))
    assert points_in_rle(pts, raw).tolist() == expect
    flat = mask.flatten(order="F").tolist()  # 0,0,0,0,1,0,0,1
    uncompressed = {"size": [2, 4], "counts": [4, 1, 2, 1]}
    assert flat == [0, 0, 0, 0, 1, 0, 0, 1]
    assert points_in_rle(pts, uncompressed).tolist() == expect
    # slightly negative coordinates still read pixel 0 (truncation toward zero), as RoboPoint
    left = np.zeros((2, 4), dtype=np.uint8)
    left[:, 0] = 1
    assert points_in_rle([[-0.2, 0.5], [-0.26, 0.5], [float("nan"), 0.5]], _rle(left)).tolist() == [True, False, False]


def test_points_in_region_dispatch():
    poly = [[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]
    assert points_in_region([[0.25, 0.25], [0.75, 0.75]], {"polygon": poly}).tolist() == [True, False]
    two = {"polygons": [poly, [[0.6, 0.6], [1, 0.6], [1, 1], [0.6, 1]]]}
    assert points_in_region([[0.25, 0.25], [0.75, 0.75], [0.55, 0.55]], two).tolist() == [True, True, False]
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1
    rle = _rle(mask)
    region = {"rle": {"counts": rle["counts"]}, "size": [4, 4]}  # size given beside the RLE
    assert points_in_region([[0.25, 0.25], [0.75, 0.75]], region).tolist() == [True, False]
    with pytest.raises(ValueError, match="regions"):
        points_in_region([[0, 0]], {"mask": 1})


# ---------------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------------
def test_trajectory_distances_hand():
    p, q = [[0, 0], [1, 0]], [[0, 1], [1, 1]]
    assert discrete_frechet(p, q) == 1.0
    assert hausdorff(p, q) == 1.0
    assert rmse_index_matched(p, q) == 1.0
    # a middle point off the other polyline
    p3, q2 = [[0, 0], [1, 0.5], [2, 0]], [[0, 0], [2, 0]]
    assert discrete_frechet(p3, q2) == pytest.approx(math.hypot(1, 0.5))
    assert hausdorff(p3, q2) == pytest.approx(math.hypot(1, 0.5))
    # a reversed path: same point set (HD 0) but the order costs under Frechet
    fwd, back = [[0, 0], [1, 0]], [[1, 0], [0, 0]]
    assert hausdorff(fwd, back) == 0.0
    assert discrete_frechet(fwd, back) == 1.0
    # RMSE over the first min(len) index-matched points: sq. distances 1 and 0
    assert rmse_index_matched([[0, 0], [1, 1], [5, 5]], [[0, 1], [1, 1]]) == pytest.approx(math.sqrt(0.5))


def test_empty_trajectories_raise():
    for fn in (discrete_frechet, hausdorff, rmse_index_matched):
        with pytest.raises(ValueError):
            fn([], [[0, 0]])


def _frechet_brute(p: np.ndarray, q: np.ndarray) -> float:
    """Min over ALL monotone couplings (enumerated recursively) of the max coupled distance."""
    n, m = len(p), len(q)
    best = math.inf

    def walk(i: int, j: int, worst: float) -> None:
        nonlocal best
        worst = max(worst, float(np.linalg.norm(p[i] - q[j])))
        if worst >= best:
            return
        if i == n - 1 and j == m - 1:
            best = worst
            return
        if i + 1 < n:
            walk(i + 1, j, worst)
        if j + 1 < m:
            walk(i, j + 1, worst)
        if i + 1 < n and j + 1 < m:
            walk(i + 1, j + 1, worst)

    walk(0, 0, 0.0)
    return best


def test_frechet_and_hausdorff_against_independent_computations():
    rng = np.random.default_rng(1)
    for _ in range(60):
        p = rng.random((rng.integers(1, 6), 2))
        q = rng.random((rng.integers(1, 6), 2))
        assert discrete_frechet(p, q) == pytest.approx(_frechet_brute(p, q), abs=1e-12)
        hd = max(directed_hausdorff(p, q)[0], directed_hausdorff(q, p)[0])
        assert hausdorff(p, q) == pytest.approx(hd, abs=1e-12)
        k = min(len(p), len(q))
        assert rmse_index_matched(p, q) == pytest.approx(np.sqrt(np.mean(np.sum((p[:k] - q[:k]) ** 2, axis=1))))
        # Frechet bounds Hausdorff from above
        assert discrete_frechet(p, q) >= hausdorff(p, q) - 1e-12


def test_giou_of_an_inverted_box_is_the_worst_value():
    """An inverted box used to give GIoU 20.25; now -1 (no box), and every value in [-1, 1]."""
    assert box_giou([0.6, 0.6, 0.2, 0.2], [0.2, 0.2, 0.6, 0.6]) == -1.0
    assert box_giou([0.2, 0.2, 0.6, 0.6], [0.5, 0.1, 0.4, 0.9]) == -1.0
    rng = np.random.default_rng(0)
    for _ in range(500):
        a, b = rng.uniform(-0.5, 1.5, 4), rng.uniform(-0.5, 1.5, 4)
        assert -1.0 <= box_giou(a, b) <= 1.0
