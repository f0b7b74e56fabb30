"""Drawing ground truth and predictions on image thumbnails (PIL only).

Canonical geometry (floats in [0, 1] of the original image) is found by walking the target or
the parsed prediction: keys name what a value is (``boxes``/``box``/``bbox``, ``points``/
``point``, ``trajectory``, ``region``/``polygon``/``rle``); where there is no key the shape
decides (4 numbers: a box, 2 numbers: a point, a list of 2-number lists: points, or a
trajectory for the trajectory task).  Anything unrecognised is ignored: a report never fails
because a prediction has an odd shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Geometry", "extract_geometry", "draw_thumbnail", "GT_COLOUR", "PRED_COLOUR"]

GT_COLOUR = (30, 200, 80)
PRED_COLOUR = (235, 50, 200)

_BOX_KEYS = ("boxes", "box", "bbox", "bbox_2d", "bboxes")
_POINT_KEYS = ("points", "point", "point_2d", "keypoints")
_TRAJ_KEYS = ("trajectory", "trajectories", "traj", "path", "waypoints")
_REGION_KEYS = ("region", "regions", "mask", "polygon", "segmentation")
_IGNORED_KEYS = ("labels", "label", "scores", "score", "text", "answer", "meta")


@dataclass
class Geometry:
    """Canonical shapes to draw (all coordinates in [0, 1] of the image)."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)
    trajectories: list[list[list[float]]] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.boxes or self.points or self.trajectories or self.regions)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_pt(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) for x in v)


def _is_box(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 4 and all(_num(x) for x in v)


def _as_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _walk(obj: Any, g: Geometry, kind: str | None, task: str, depth: int = 0) -> None:
    obj = _as_plain(obj)
    if depth > 6 or obj is None:
        return
    if isinstance(obj, dict):
        if "rle" in obj or "polygon" in obj or "counts" in obj:
            g.regions.append(obj if ("rle" in obj or "polygon" in obj) else {"rle": obj, "size": obj.get("size")})
            return
        labels = obj.get("labels") if isinstance(obj.get("labels"), list) else None
        for k, v in obj.items():
            lk = str(k).lower()
            if lk in _BOX_KEYS:
                n0 = len(g.boxes)
                _walk(v, g, "box", task, depth + 1)
                if labels is not None and len(g.boxes) - n0 == len(labels):
                    g.labels.extend(str(x) for x in labels)
                elif "label" in obj and len(g.boxes) - n0 == 1:
                    g.labels.append(str(obj["label"]))
            elif lk in _POINT_KEYS:
                _walk(v, g, "point", task, depth + 1)
            elif lk in _TRAJ_KEYS:
                _walk(v, g, "trajectory", task, depth + 1)
            elif lk in _REGION_KEYS:
                _walk(v, g, "region", task, depth + 1)
            elif lk in _IGNORED_KEYS:
                continue
            elif isinstance(v, (dict, list, tuple)):
                _walk(v, g, kind, task, depth + 1)
        return
    if not isinstance(obj, (list, tuple)):
        return
    if kind == "region" and obj and all(_is_pt(p) for p in obj):
        g.regions.append({"polygon": [list(map(float, p)) for p in obj]})
        return
    if _is_box(obj) and kind in (None, "box"):
        g.boxes.append([float(x) for x in obj])
        return
    if _is_pt(obj):
        g.points.append([float(x) for x in obj])
        return
    if obj and all(_is_pt(p) for p in obj) and len(obj) >= 2 and (kind == "trajectory" or (kind is None and task == "trajectory")):
        g.trajectories.append([[float(x) for x in p] for p in obj])
        return
    for item in obj:
        _walk(item, g, kind, task, depth + 1)


def extract_geometry(obj: Any, task: str = "") -> Geometry:
    """The drawable canonical shapes in a target dict or a parsed prediction."""
    g = Geometry()
    try:
        _walk(obj, g, None, task)
    except Exception:  # never let an odd prediction break a report
        pass
    return g


def _region_mask(region: dict, size: tuple[int, int]) -> Image.Image | None:
    """An L-mode mask of ``region`` at thumbnail ``size`` (w, h)."""
    w, h = size
    try:
        if "polygon" in region:
            m = Image.new("L", size, 0)
            pts = [(float(x) * w, float(y) * h) for x, y in region["polygon"]]
            if len(pts) >= 3:
                ImageDraw.Draw(m).polygon(pts, fill=255)
            return m
        if "rle" in region:
            from vlm_grpo_ma.bench.formats import rle_to_mask

            arr = rle_to_mask(region)
            return Image.fromarray((arr > 0).astype(np.uint8) * 255).resize(size, Image.NEAREST)
    except Exception:
        return None
    return None


def _open(ref: Any) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    from vlm_grpo_ma.data.images import load_image

    return load_image(ref)


def draw_thumbnail(image_ref: Any, target: Any, prediction: Any, task: str = "", size: int = 320) -> Image.Image:
    """The image scaled so its longer side is ``size`` px, ground truth drawn in green (regions
    filled, boxes and trajectories solid) and the prediction in magenta (points as rings,
    trajectories dashed by their markers).  A missing image gives a grey placeholder."""
    try:
        img = _open(image_ref)
    except Exception:
        img = Image.new("RGB", (size, size * 3 // 4), (90, 90, 90))
    scale = size / max(img.size)
    tw, th = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    img = img.resize((tw, th), Image.LANCZOS if scale < 1 else Image.BICUBIC).convert("RGBA")
    lw = max(2, size // 120)
    gt = extract_geometry(target, task)
    pr = extract_geometry(prediction, task)

    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    for region in gt.regions:
        m = _region_mask(region, (tw, th))
        if m is not None:
            fill = Image.new("RGBA", img.size, GT_COLOUR + (110,))
            overlay = Image.composite(fill, overlay, m)
    img = Image.alpha_composite(img, overlay)
    d = ImageDraw.Draw(img)
    for region in pr.regions:
        if "polygon" in region:
            pts = [(x * tw, y * th) for x, y in region["polygon"]]
            if len(pts) >= 2:
                d.line(pts + pts[:1], fill=PRED_COLOUR, width=lw)

    def px(p: list[float]) -> tuple[float, float]:
        return p[0] * tw, p[1] * th

    def box(b: list[float], colour: tuple[int, int, int], label: str | None) -> None:
        x1, y1 = px(b[:2])
        x2, y2 = px(b[2:])
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        d.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(0, 0, 0), width=lw + 2)  # halo: visible on any colour
        d.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
        if label:
            ty = y1 - 12 if y1 >= 12 else y2 + 2
            d.text((x1 + 1, ty + 1), label[:24], fill=(0, 0, 0))
            d.text((x1, ty), label[:24], fill=colour)

    def traj(t: list[list[float]], colour: tuple[int, int, int], dashed: bool) -> None:
        pts = [px(p) for p in t]
        if dashed:
            for a, b in zip(pts[:-1], pts[1:]):
                n = max(1, int(math.dist(a, b) / (3 * lw)))
                for i in range(0, n, 2):
                    s = (a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n)
                    e = (a[0] + (b[0] - a[0]) * (i + 1) / n, a[1] + (b[1] - a[1]) * (i + 1) / n)
                    d.line((s, e), fill=colour, width=lw)
        else:
            d.line(pts, fill=(0, 0, 0), width=lw + 2, joint="curve")
            d.line(pts, fill=colour, width=lw, joint="curve")
        for i, p in enumerate(pts):
            r = lw + (2 if i == len(pts) - 1 else 0)  # the end point is larger
            d.ellipse((p[0] - r - 1, p[1] - r - 1, p[0] + r + 1, p[1] + r + 1), fill=(0, 0, 0))
            d.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=colour)

    def point(p: list[float], colour: tuple[int, int, int], ring: bool) -> None:
        x, y = px(p)
        r = lw + 2
        if ring:
            d.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), outline=(0, 0, 0), width=max(1, lw - 1) + 2)
            d.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=max(1, lw - 1))
            d.line((x - r - 2, y, x + r + 2, y), fill=colour, width=1)
            d.line((x, y - r - 2, x, y + r + 2), fill=colour, width=1)
        else:
            d.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), fill=(0, 0, 0))
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    for i, b in enumerate(gt.boxes):
        box(b, GT_COLOUR, gt.labels[i] if i < len(gt.labels) else None)
    for t in gt.trajectories:
        traj(t, GT_COLOUR, dashed=False)
    for p in gt.points:
        point(p, GT_COLOUR, ring=False)
    for i, b in enumerate(pr.boxes):
        box(b, PRED_COLOUR, pr.labels[i] if i < len(pr.labels) else None)
    for t in pr.trajectories:
        traj(t, PRED_COLOUR, dashed=True)
    for p in pr.points:
        point(p, PRED_COLOUR, ring=True)
    return img.convert("RGB")
