"""Affordance: where to act on an object, as a box (ShareRobot) or as points (Where2Place,
RoboRefIt, RefSpatial).

Sample:
    ``prompt = {"object": "red mug"}``; canonical [0, 1] coordinates.  Box mode:
    ``target = {"box": [x1, y1, x2, y2]}`` and/or ``{"boxes": [...]}`` (several correct
    regions: the best IoU counts).  Points mode: ``target = {"region": {"polygon": [[x, y], ...]}}``
    (or ``{"rle": <COCO RLE>, "size": [h, w]}``), ``{"regions": [...]}`` (their union) or
    ``{"polygon": [...]}``; see :func:`vlm_grpo_ma.tasks._geometry.points_in_region`.  For SFT in points
    mode, ``target["points"]`` gives the reference points.

Options: ``mode`` = ``"box"`` (default) or ``"points"``; ``box_reward`` = ``"iou"`` (default)
or ``"giou"`` (the task part is then (GIoU + 1) / 2, which still rewards moving a
non-overlapping box closer); the reward-only leniencies ``max_points`` = 10 (points mode: the
REWARD scores only the first ``max_points`` points written; the metrics score all of them) and
``swap_inverted`` = True (box mode: the REWARD reads a box written with x1 > x2 or y1 > y2 as
the box with its corners swapped; the metrics score it as written, IoU 0, as FlagEvalMM does);
plus the common ``w_task``, ``w_format``, ``image_size``, ``cache_dir``, ``region_format`` =
``"polygon"`` or ``"rle"`` for synthetic regions, and ``object_scale`` (:data:`OBJECT_SCALE`)
for the size of synthetic objects.

Box mode: answer ``[x1, y1, x2, y2]`` (or ``{"bbox_2d": ...}``; of several boxes the first is
scored).  Reward parts ``format``, ``iou``, ``giou`` (the latter as (GIoU + 1) / 2); metrics
(FlagEvalMM ``tasks/affordance/evaluate.py``): ``mean_iou`` and the shares ``iou>=0.5``,
``iou>=0.75``, ``iou>=0.9`` (>=, as there; an unparsable answer counts as IoU 0, where
FlagEvalMM skips the item), ``parse_rate``.

Points mode: answer ``[[x, y], ...]`` (or ``{"point_2d": ...}`` objects, or ``(x, y)`` tuples).
Reward part ``inside`` = the fraction of the first ``max_points`` predicted points inside the
ground-truth region; points outside the image are misses.  An empty list is malformed
(``no_points``).  Metrics, over ALL the points written (pixel of a point: ``int(x * W)``,
``int(y * H)``, as in :func:`~vlm_grpo_ma.tasks._geometry.mask_pixels`):

- ``accuracy``: per sample, the mean over its points of the mask's value there, then the mean
  over samples (0 for an unparsable answer): RoboPoint's ``robopoint/eval/summarize_vqa.py`` and
  FlagEvalMM's ``tasks/where2place/evaluate.py``.  Where the sample names its mask image
  (``meta["mask"]``: the where2place and roborefit loaders) the value is the grey level / 255,
  as those scripts read the JPEG; otherwise membership in the region (0 or 1).
- ``accuracy_points_weighted``: points whose mask value is > 0 over all points of all samples
  (an unparsable answer adds no point): Embodied-R1's ``eval/hf_inference_where2place.py``.
- with a ground-truth box (RoboRefIt): ``box_accuracy`` and ``box_accuracy_points_weighted``,
  the same two with "inside" meaning ``x1 <= x <= x2 and y1 <= y <= y2``: Embodied-R1's
  ``eval/hf_inference_roborefit.py``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlm_grpo_ma.tasks import _synthetic as syn
from vlm_grpo_ma.tasks._geometric import GeometricTask, answer_inner
from vlm_grpo_ma.tasks._geometry import box_giou, box_iou, mask_values, points_in_region
from vlm_grpo_ma.tasks._parsing import parse_boxes, parse_points
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.task import ParseError

__all__ = ["AffordanceTask", "gt_boxes", "gt_region", "points_in_box"]

_OBJECTS = ("mug", "pan")
#: default size of the synthetic objects, relative to their base size on a 112-px image (a mug
#: body of 24-34 px with a 11-15 x 13-18 px handle, a pan body of 22-30 px with a 22-32 px
#: handle).  At 1.0 the tiny demo model did not localise the handle within a CPU budget (held-out
#: mean IoU 0.043 after 1,200 SFT steps against 0.037 for the mean box); at 1.6 it reached 0.26
#: after 800 steps and 0.36 after 1,200 (mean box: 0.066).
OBJECT_SCALE = 1.6
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


class AffordanceTask(GeometricTask):
    """Grasp region as a box or as points; see the module docstring."""

    name = "affordance"
    OBJECT_SCALE = OBJECT_SCALE

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.mode = self.options.get("mode", "box")
        if self.mode not in ("box", "points"):
            raise ValueError(f"affordance mode must be 'box' or 'points', got {self.mode!r}")
        self.box_reward = self.options.get("box_reward", "iou")
        if self.box_reward not in ("iou", "giou"):
            raise ValueError(f"affordance box_reward must be 'iou' or 'giou', got {self.box_reward!r}")
        self.max_points = int(self.options.get("max_points", 10))
        self.swap_inverted = bool(self.options.get("swap_inverted", True))
        self.region_format = self.options.get("region_format", "polygon")
        self.reward_parts = ("format", "iou", "giou") if self.mode == "box" else ("format", "inside")
        self.target_keys = ("box", "boxes") if self.mode == "box" else ("region", "regions", "polygon")
        self.prompt_variant = None if self.mode == "box" else "points"

    # --- answer text ----------------------------------------------------------------------
    def sft_target(self, sample: Sample, family) -> str:
        self.check_sample(sample)
        size = sample.image_size
        if self.mode == "box":
            answer = json.dumps(family.encode_box(gt_boxes(sample)[0], size))
        else:
            points = sample.target.get("points")
            if not points:
                raise ValueError(f"{self.where(sample)}: points-mode SFT needs target['points'] (points inside the region)")
            answer = json.dumps(family.encode_points(points[: self.max_points], size))
        reasoning = sample.meta.get("reasoning") or f"I grasp the {sample.prompt.get('object', 'object')} by its handle."
        return format_sft_target(reasoning, answer)

    # --- scoring --------------------------------------------------------------------------
    def parse(self, answer_text: str, sample: Sample, family) -> Any:
        """Box mode: the first box, canonical ``[x1, y1, x2, y2]`` in the order written (an
        inverted box stays inverted); points mode: every point written, canonical
        ``[[x, y], ...]``."""
        size = sample.image_size
        text = answer_inner(answer_text)
        if self.mode == "box":
            boxes = parse_boxes(text)
            if not boxes:
                raise ParseError("no_box", "empty box list")
            return family.decode_box(boxes[0].as_written, size)
        points = parse_points(text)
        if not points:
            raise ParseError("no_points", "empty point list")
        return family.decode_points(points, size)

    def score(self, prediction: Any, sample: Sample) -> tuple[float, dict[str, float]]:
        """The reward's task score and parts (with the reward-only options ``swap_inverted``
        and ``max_points``)."""
        if self.mode == "box":
            box = list(prediction)
            if self.swap_inverted:
                box = [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])]
            iou = max(box_iou(gt, box) for gt in gt_boxes(sample))
            giou01 = max((box_giou(gt, box) + 1.0) / 2.0 for gt in gt_boxes(sample))
            return (iou if self.box_reward == "iou" else giou01), {"iou": iou, "giou": giou01}
        inside = float(np.mean(points_in_region(prediction[: self.max_points], gt_region(sample))))
        return inside, {"inside": inside}

    def point_values(self, prediction: Any, sample: Sample) -> np.ndarray:
        """(N,) the mask's value in [0, 1] at each of the N predicted points (grey level / 255
        when the sample names its mask image, else region membership)."""
        path = sample.meta.get("mask") if isinstance(sample.meta, dict) else None
        if isinstance(path, str) and path:
            return mask_values(prediction, _grey_mask(path)) / 255.0
        return points_in_region(prediction, gt_region(sample)).astype(np.float64)

    def sample_metrics(self, prediction: Any, sample: Sample) -> dict[str, float]:
        """One sample's figures (0 for an unparsable answer): box mode ``iou`` (best over the
        correct boxes, the box as written); points mode ``accuracy`` (mean mask value at the
        points) and, with a ground-truth box, ``box_accuracy`` (share of points in the box)."""
        self.check_sample(sample)
        if self.mode == "box":
            return {"iou": 0.0 if prediction is None else max(box_iou(g, prediction) for g in gt_boxes(sample))}
        has_box = "box" in sample.target
        if not prediction:
            return {"accuracy": 0.0, **({"box_accuracy": 0.0} if has_box else {})}
        out = {"accuracy": float(np.mean(self.point_values(prediction, sample)))}
        if has_box:
            out["box_accuracy"] = float(np.mean(points_in_box(prediction, sample.target["box"])))
        return out

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        if not samples:
            return {}
        per = [self.sample_metrics(p, s) for p, s in zip(predictions, samples)]
        parse_rate = float(np.mean([p is not None for p in predictions]))
        if self.mode == "box":
            ious = np.array([m["iou"] for m in per])
            return {
                "mean_iou": float(ious.mean()),
                "iou>=0.5": float((ious >= 0.5).mean()),
                "iou>=0.75": float((ious >= 0.75).mean()),
                "iou>=0.9": float((ious >= 0.9).mean()),
                "parse_rate": parse_rate,
            }
        out = {"accuracy": float(np.mean([m["accuracy"] for m in per]))}
        n_points = sum(len(p) for p in predictions if p)
        inside = sum(int((self.point_values(p, s) > 0).sum()) for p, s in zip(predictions, samples) if p)
        out["accuracy_points_weighted"] = inside / n_points if n_points else 0.0
        boxed = [(p, s) for p, s in zip(predictions, samples) if "box" in s.target]
        if boxed:
            out["box_accuracy"] = float(np.mean([m["box_accuracy"] for m in per if "box_accuracy" in m]))
            n_boxed = sum(len(p) for p, _ in boxed if p)
            in_box = sum(int(points_in_box(p, s.target["box"]).sum()) for p, s in boxed if p)
            out["box_accuracy_points_weighted"] = in_box / n_boxed if n_boxed else 0.0
        out["parse_rate"] = parse_rate
        return out

    # --- data -----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """``n`` images of a coloured mug (square body, side handle) or pan (round body, long
        tapering handle), sometimes with a distractor object of another colour.  Ground truth:
        the handle's box, its polygon (or RLE mask) and three points on its mid-line."""
        w, h = self.image_size
        scale = min(w, h) / 112 * self.object_scale
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            colours = rng.sample(list(syn.COLOURS), 2)
            kinds = [rng.choice(_OBJECTS) for _ in range(2)]
            n_obj = 1 + (rng.random() < 0.5)
            specs = [_object_spec(rng, kinds[j], scale) for j in range(n_obj)]
            try:
                frames = syn.place_boxes(rng, [sp["size"] for sp in specs], w, h, gap=4)
            except ValueError:  # no room for the distractor: the target object alone
                specs = specs[:1]
                frames = syn.place_boxes(rng, [specs[0]["size"]], w, h, gap=4)
            img, draw = syn.new_canvas((w, h))
            polys_px = []
            for sp, frame, colour in zip(specs, frames, colours):
                polys_px.append(_draw_object(draw, sp, frame, syn.COLOURS[colour]))
            (hx0, hy0, hx1, hy1), poly_px, line_px, pixel_poly = polys_px[0]
            box = syn.px_box_to_unit((hx0, hy0, hx1, hy1), w, h)
            poly = [[x / w, y / h] for x, y in poly_px]
            points = [[x / w, y / h] for x, y in line_px]
            if self.region_format == "rle":
                region = _rle_region(pixel_poly, w, h)
            else:
                region = {"polygon": poly}
            obj = f"{colours[0]} {kinds[0]}"
            fx0, fy0, fx1, fy1 = frames[0]
            where = syn.location_words((fx0 + fx1) / 2 / w, (fy0 + fy1) / 2 / h)
            reasoning = f"The {obj} is at the {where}; its handle points {specs[0]['dir']}, so I grasp the handle."
            out.append(
                syn.synthetic_sample(
                    self.name, seed, i, images=[syn.image_ref(img, self.cache_dir, self.name, seed, i)],
                    image_sizes=[(w, h)], prompt={"object": obj},
                    target={"box": box, "region": region, "points": points}, reasoning=reasoning,
                )
            )
        return out


def points_in_box(points: Sequence[Sequence[float]], box: Sequence[float]) -> np.ndarray:
    """(N,) bool: ``x1 <= x <= x2 and y1 <= y <= y2`` for canonical points (N, 2) and a box (4,)
    (edges inclusive, as Embodied-R1's RoboRefIt evaluation counts them)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x1, y1, x2, y2 = (float(v) for v in box)
    return (pts[:, 0] >= x1) & (pts[:, 0] <= x2) & (pts[:, 1] >= y1) & (pts[:, 1] <= y2)


@lru_cache(maxsize=64)
def _grey_mask(path: str) -> np.ndarray:
    """A mask image as an (H, W) uint8 array of grey levels (as ``np.array(Image.open(path))``
    reads a greyscale JPEG; colour images are converted to greyscale first)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
        if arr.ndim != 2:
            arr = np.asarray(im.convert("L"))
    return arr


def gt_boxes(sample: Sample) -> list:
    """The correct boxes of a box-mode sample: ``target["box"]`` then ``target["boxes"]``."""
    t = sample.target
    return ([t["box"]] if "box" in t else []) + list(t.get("boxes") or [])


def gt_region(sample: Sample) -> dict:
    """The ground-truth region of a points-mode sample as one region dict (a union of
    ``regions`` becomes ``{"regions": [...]}``)."""
    t = sample.target
    if "region" in t:
        return t["region"]
    if "regions" in t:
        return {"regions": t["regions"]}
    return {"polygon": t["polygon"]}


def _object_spec(rng, kind: str, scale: float) -> dict:
    """Random pixel dimensions of a mug or pan; ``size`` is its whole (w, h) footprint."""
    if kind == "mug":
        body = round(rng.randint(24, 34) * scale)
        hl, ht = round(rng.randint(11, 15) * scale), round(rng.randint(13, 18) * scale)  # handle length, height
        direction = rng.choice(["left", "right"])
        size = (body + hl, body)
    else:
        body = round(rng.randint(22, 30) * scale)
        hl, ht = round(rng.randint(22, 32) * scale), round(rng.randint(8, 11) * scale)
        direction = rng.choice(list(_DIRECTIONS))
        size = (body + hl, body) if direction in ("left", "right") else (body, body + hl)
    return {"kind": kind, "body": body, "hl": hl, "ht": ht, "dir": direction, "size": size}


def _draw_object(draw: ImageDraw.ImageDraw, sp: dict, frame: Sequence[int], colour) -> tuple:
    """Draw the object in its pixel frame; return, in pixels, the handle's box (end-exclusive),
    its polygon (continuous coordinates), three points near its mid-line (whole pixels), and the polygon as
    given to PIL (which fills boundary pixels, so its right and bottom vertices move in by one)."""
    x0, y0, _, _ = frame
    body, hl, ht, d = sp["body"], sp["hl"], sp["ht"], sp["dir"]
    dx, dy = _DIRECTIONS[d]
    # body position inside the frame: the handle takes the side it points to
    bx0 = x0 + (hl if d == "left" else 0)
    by0 = y0 + (hl if d == "up" else 0)
    body_box = (bx0, by0, bx0 + body, by0 + body)
    syn.draw_shape(draw, "square" if sp["kind"] == "mug" else "circle", body_box, colour)
    cx, cy = bx0 + body / 2, by0 + body / 2
    # handle: from the body's edge outwards, centred on the body's mid-line
    if dx:
        hx0 = bx0 - hl if dx < 0 else bx0 + body
        hx1 = hx0 + hl
        hy0 = round(cy - ht / 2)
        hy1 = hy0 + ht
        if sp["kind"] == "pan":  # handle tapers by 1 px on each side towards its end
            near, far = (hx1, hx0) if dx < 0 else (hx0, hx1)
            poly = [(near, hy0), (far, hy0 + 1), (far, hy1 - 1), (near, hy1)]
        else:
            poly = [(hx0, hy0), (hx1, hy0), (hx1, hy1), (hx0, hy1)]
        line = [(round(hx0 + f * hl), round((hy0 + hy1) / 2)) for f in (0.25, 0.5, 0.75)]
    else:
        hy0 = by0 - hl if dy < 0 else by0 + body
        hy1 = hy0 + hl
        hx0 = round(cx - ht / 2)
        hx1 = hx0 + ht
        near, far = (hy1, hy0) if dy < 0 else (hy0, hy1)
        poly = [(hx0, near), (hx0 + 1, far), (hx1 - 1, far), (hx1, near)]
        line = [(round((hx0 + hx1) / 2), round(hy0 + f * hl)) for f in (0.25, 0.5, 0.75)]
    # PIL fills polygons including their boundary pixels: pull the right and bottom vertices in
    # by one pixel
    mx, my = (hx0 + hx1) / 2, (hy0 + hy1) / 2
    pixel_poly = [(x - (x > mx), y - (y > my)) for x, y in poly]
    draw.polygon(pixel_poly, fill=colour)
    return (hx0, hy0, hx1, hy1), poly, line, pixel_poly


def _rle_region(poly_px: Sequence[Sequence[float]], w: int, h: int) -> dict:
    """The region ``{"rle": {"size": [h, w], "counts": str}, "size": [h, w]}`` (the loaders'
    canonical form) of a polygon rasterised by PIL on a w x h mask."""
    from pycocotools import mask as mask_utils

    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in poly_px], fill=1)
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    size = [int(v) for v in rle["size"]]
    return {"rle": {"size": size, "counts": rle["counts"].decode("ascii")}, "size": size}

