"""Trajectory: a 2-D path of up to N points (ShareRobot / RoboBrain style).

Sample:
    ``prompt = {"start": "red dot", "goal": "blue square"}``;
    ``target = {"trajectory": [[x, y], ...]}`` (canonical [0, 1] points, in order).

Answer: ``[[x1, y1], [x2, y2], ...]`` in the family's frame (also ``{"point_2d": ...}`` objects or
``(x, y)`` tuples); an empty list is malformed (``no_points``).  The prompt asks for at most
``max_points`` points (option, default 10) and the REWARD scores only the first ``max_points``
written (a reward-only cap); the metrics score every point written.

Distances are Euclidean in canonical [0, 1] image space (ShareRobot's convention: pixel
coordinates divided by width and height): DFD = discrete Fréchet distance, HD = symmetric
Hausdorff distance, RMSE over the first min(len) index-matched points
(:mod:`vlm_grpo_ma.tasks._geometry`).

Reward part ``frechet`` = ``1 - min(1, DFD / d_max)``: 1 for the exact path, falling linearly to
0 at a Fréchet distance of ``d_max`` (option, default 0.5 = half the image side; a path that
far off has nothing left worth rewarding, while a smaller ``d_max`` gives no signal to a
beginner's paths).  Fréchet respects the order of the points, so a path drawn backwards scores
low even though its Hausdorff distance is 0.

Metrics (lower is better): ``dfd``, ``hd``, ``rmse`` averaged over samples, computed as FlagEvalMM's
``tasks/trajectory/evaluate.py`` computes them (the evaluator RoboBrain 2.0 names) on the whole
predicted path; ``parse_rate``.  One documented difference: an unparsable answer counts as
``sqrt(2)`` (the largest distance between two points of the image) so that failing to answer
never looks better than a bad answer, where FlagEvalMM scores an answer without points as the
single point (0, 0) and leaves out an item whose scoring raises.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np

from vlm_grpo_ma.tasks import _synthetic as syn
from vlm_grpo_ma.tasks._geometric import GeometricTask, answer_inner
from vlm_grpo_ma.tasks._geometry import discrete_frechet, hausdorff, rmse_index_matched
from vlm_grpo_ma.tasks._parsing import parse_points
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.task import ParseError

__all__ = ["FAILED_DISTANCE", "TrajectoryTask", "frechet_reward", "discrete_frechet", "hausdorff", "rmse_index_matched"]

#: the distance a parse failure counts as in the metrics: the diagonal of the unit square
FAILED_DISTANCE = math.sqrt(2.0)
_OBSTACLE_COLOUR = (150, 150, 150)


def frechet_reward(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], d_max: float = 0.5) -> float:
    """``1 - min(1, DFD(pred, gt) / d_max)`` for canonical polylines (N, 2) and (M, 2)."""
    return 1.0 - min(1.0, discrete_frechet(pred, gt) / d_max)


class TrajectoryTask(GeometricTask):
    """See the module docstring.  Options: ``max_points`` (10: asked for, and scored by the
    reward), ``d_max`` (0.5),
    ``obstacle_prob`` (0.5, synthetic), ``object_scale`` (1.0, synthetic: the
    start dot's radius is 4% and the goal square's half-side 5% of the image side, times this),
    ``marker_colours`` (``"random"``, synthetic: two different colours per image, named in the
    prompt; ``"fixed"``: always a red dot and a blue square, on the same layouts, so that finding
    the markers needs no matching of a colour word to the image),
    ``w_task``, ``w_format``, ``image_size``, ``cache_dir``."""

    name = "trajectory"
    reward_parts = ("format", "frechet")
    target_keys = ("trajectory",)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.max_points = int(self.options.get("max_points", 10))
        self.d_max = float(self.options.get("d_max", 0.5))
        self.obstacle_prob = float(self.options.get("obstacle_prob", 0.5))
        self.marker_colours = str(self.options.get("marker_colours", "random"))
        if self.marker_colours not in ("random", "fixed"):
            raise ValueError(f"trajectory marker_colours must be 'random' or 'fixed', got {self.marker_colours!r}")
        if self.max_points < 2 or self.d_max <= 0:
            raise ValueError(f"trajectory needs max_points >= 2 and d_max > 0, got {self.max_points}, {self.d_max}")

    def prompt_fields(self, sample: Sample, family) -> dict[str, Any]:
        return {"max_points": self.max_points, **super().prompt_fields(sample, family)}

    # --- answer text ----------------------------------------------------------------------
    def sft_target(self, sample: Sample, family) -> str:
        self.check_sample(sample)
        path = sample.target["trajectory"][: self.max_points]
        answer = json.dumps(family.encode_points(path, sample.image_size))
        reasoning = sample.meta.get("reasoning") or (
            f"The {sample.prompt.get('start', 'start')} is at the {syn.location_words(*path[0])} and the "
            f"{sample.prompt.get('goal', 'goal')} at the {syn.location_words(*path[-1])}."
        )
        return format_sft_target(reasoning, answer)

    # --- scoring --------------------------------------------------------------------------
    def parse(self, answer_text: str, sample: Sample, family) -> list[list[float]]:
        """Canonical ``[[x, y], ...]``: every point written."""
        points = parse_points(answer_inner(answer_text))
        if not points:
            raise ParseError("no_points", "empty trajectory")
        return family.decode_points(points, sample.image_size)

    def score(self, prediction: list[list[float]], sample: Sample) -> tuple[float, dict[str, float]]:
        """The reward: :func:`frechet_reward` of the first ``max_points`` points."""
        r = frechet_reward(prediction[: self.max_points], sample.target["trajectory"], self.d_max)
        return r, {"frechet": r}

    def sample_metrics(self, prediction: Any, sample: Sample) -> dict[str, float]:
        """``dfd``, ``hd``, ``rmse`` of one sample (each :data:`FAILED_DISTANCE` when unparsable)."""
        self.check_sample(sample)
        if not prediction:
            return {"dfd": FAILED_DISTANCE, "hd": FAILED_DISTANCE, "rmse": FAILED_DISTANCE}
        gt = sample.target["trajectory"]
        return {
            "dfd": discrete_frechet(prediction, gt),
            "hd": hausdorff(prediction, gt),
            "rmse": rmse_index_matched(prediction, gt),
        }

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        if not samples:
            return {}
        per = [self.sample_metrics(p, s) for p, s in zip(predictions, samples)]
        out = {k: float(np.mean([m[k] for m in per])) for k in ("dfd", "hd", "rmse")}
        out["parse_rate"] = float(np.mean([p is not None for p in predictions]))
        return out

    # --- data -----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """``n`` images with a coloured dot (start) and a square of another colour (goal).
        Without an obstacle the path is the straight segment between their centres; with one
        (probability ``obstacle_prob``) a grey block sits slightly to one side of that segment
        and the path is a quadratic Bézier curve bending around it on the other side.  The
        path is ``max_points`` points evenly spaced in the curve parameter, rounded to whole pixels
    (so that a frame of the image's own pixels represents it exactly)."""
        w, h = self.image_size
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            c_start, c_goal = rng.sample([c for c in syn.COLOURS if c != "white"], 2)  # white ~ the grey block
            if self.marker_colours == "fixed":  # drawn above all the same, so the layouts do not change
                c_start, c_goal = "red", "blue"
            obstacle = rng.random() < self.obstacle_prob
            r = max(2, round(0.04 * min(w, h) * self.object_scale))
            q = max(3, round(0.05 * min(w, h) * self.object_scale))
            path, block = _sample_path(rng, w, h, self.max_points, obstacle, min_margin=max(r, q) + 1)
            img, draw = syn.new_canvas((w, h))
            if block is not None:
                draw.rectangle([block[0], block[1], block[2] - 1, block[3] - 1], fill=_OBSTACLE_COLOUR)
            sx, sy = path[0]
            # pixels sx-r .. sx+r-1 (PIL is inclusive): continuous extent [sx-r, sx+r], centred on sx
            draw.ellipse([sx - r, sy - r, sx + r - 1, sy + r - 1], fill=syn.COLOURS[c_start])
            gx, gy = path[-1]
            draw.rectangle([gx - q, gy - q, gx + q - 1, gy + q - 1], fill=syn.COLOURS[c_goal])
            traj = [[x / w, y / h] for x, y in path]
            start, goal = f"{c_start} dot", f"{c_goal} square"
            how = "I go around the grey block." if block is not None else "The way is clear, so I go straight."
            reasoning = (
                f"The {start} is at the {syn.location_words(*traj[0])} and the {goal} at the "
                f"{syn.location_words(*traj[-1])}. {how}"
            )
            out.append(
                syn.synthetic_sample(
                    self.name, seed, i, images=[syn.image_ref(img, self.cache_dir, self.name, seed, i)],
                    image_sizes=[(w, h)], prompt={"start": start, "goal": goal}, target={"trajectory": traj},
                    reasoning=reasoning, obstacle=block is not None,
                )
            )
        return out


def _sample_path(rng, w: int, h: int, k: int, obstacle: bool, tries: int = 500, min_margin: int = 0):
    """(path of k pixel points (whole pixels), obstacle box or None).

    Start and goal centres are integers at least 45% of the image side apart; with an obstacle,
    a block of side ~14% of the image is centred a little off the segment's midpoint and the
    Bézier control point is placed on the other side so that the curve's midpoint clears it.
    Every path point stays ``margin`` pixels inside the image and (with an obstacle) at least 3
    pixels away from the block, checked on a dense sampling of the curve (``margin`` is at least
    ``min_margin``, so that the markers drawn at the ends fit).  If no obstacle layout is found
    in ``tries`` draws, the same ``rng`` draws a path without one."""
    side = min(w, h)
    margin = max(4, round(0.06 * side), min_margin)
    for _ in range(tries):
        p0 = np.array([rng.randint(margin, w - margin), rng.randint(margin, h - margin)], dtype=float)
        p2 = np.array([rng.randint(margin, w - margin), rng.randint(margin, h - margin)], dtype=float)
        dist = float(np.linalg.norm(p2 - p0))
        if dist < 0.45 * side:
            continue
        mid = (p0 + p2) / 2
        if not obstacle:
            ctrl, block = mid, None
        else:
            normal = np.array([-(p2 - p0)[1], (p2 - p0)[0]]) / dist
            sign = rng.choice([-1.0, 1.0])
            b = max(6, round(0.14 * side))
            centre = mid + sign * normal * rng.uniform(0.0, 0.04 * side)
            bx0, by0 = int(round(centre[0] - b / 2)), int(round(centre[1] - b / 2))
            block = (bx0, by0, bx0 + b, by0 + b)
            clearance = b * 0.75 + 0.05 * side
            ctrl = mid - sign * normal * 2 * clearance  # curve midpoint = mid + (ctrl - mid) / 2
        t = np.linspace(0.0, 1.0, k)[:, None]
        dense_t = np.linspace(0.0, 1.0, 101)[:, None]
        curve = lambda tt: (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * ctrl + tt**2 * p2  # noqa: E731
        path, dense = curve(t), curve(dense_t)
        if (dense < margin / 2).any() or (dense[:, 0] > w - margin / 2).any() or (dense[:, 1] > h - margin / 2).any():
            continue
        if block is not None:
            x0, y0, x1, y1 = block
            if x0 < 1 or y0 < 1 or x1 > w - 1 or y1 > h - 1:
                continue
            near = (dense[:, 0] > x0 - 3) & (dense[:, 0] < x1 + 3) & (dense[:, 1] > y0 - 3) & (dense[:, 1] < y1 + 3)
            if near.any():
                continue
            # start dot and goal square must not touch the block either
            c = max(8, min_margin)
            if any(x0 - c < p[0] < x1 + c and y0 - c < p[1] < y1 + c for p in (p0, p2)):
                continue
        return [[float(round(x)), float(round(y))] for x, y in path], block
    if obstacle:  # no room to bend around a block (tiny image / unlucky draws): a straight path
        return _sample_path(rng, w, h, k, False, tries, min_margin)
    raise ValueError(f"could not draw a trajectory in a {w}x{h} image after {tries} tries")
