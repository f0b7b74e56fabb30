"""Detection: several labelled boxes per image (and single-object grounding, RefCOCO style).

Sample:
    ``prompt = {"object": "shape"}`` (what to find, e.g. ``"shape"``, ``"person"``, or a
    referring expression for grounding).  Detection: ``target = {"boxes": [[x1, y1, x2, y2], ...],
    "labels": ["red circle", ...]}`` (canonical [0, 1] boxes; ``labels`` optional;
    ``crowd_boxes`` / ``crowd_labels`` optional, COCO's ignore regions, used by COCOeval only).
    Grounding (one object, as :func:`vlm_grpo_ma.data.coco.load_coco` writes it with
    ``mode="annotation"``): ``target = {"box": [...], "label": ..., "boxes": [...]}`` where
    ``boxes`` lists every box that is a correct answer (default ``[box]``); the reward and
    Acc@0.5 take the best of them, COCO AP uses ``box``; the prompt is
    ``prompts/detection.grounding.txt`` (one object) instead of ``prompts/detection.txt``.

Answer: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "red circle"}, ...]`` in the family's frame
(also accepted: a single object, bare ``[x1, y1, x2, y2]``, Qwen2-VL box tokens; see
:mod:`vlm_grpo_ma.tasks._parsing`).  ``parse`` returns ``[{"box": [x1, y1, x2, y2], "label": str | None}]``
in canonical coordinates, in the order written.

Reward (parts ``format``, ``iou``, ``label``): the ground truth and the predicted boxes are
matched one-to-one by the Hungarian algorithm on IoU;
``iou = sum of matched IoUs / max(#gt, #pred)`` (missing and extra boxes both cost),
``label = #(matched pairs with IoU > 0 and equal normalised labels) / max(#gt, #pred)``
(labels compared whole, lowercased and whitespace-collapsed; never by substring).
task = ``(1 - label_weight) * iou + label_weight * label`` (option ``label_weight`` = 0.25);
a sample whose ground truth has no labels scores on ``iou`` alone and reports ``label`` = 1.
An image with no objects and an empty answer list scores iou = label = 1.

Metrics: ``AP``, ``AP50``, ``AP75`` from pycocotools' COCOeval (boxes, as written, converted to
pixels of the original image: an inverted box goes to COCOeval with a negative width or height
and matches nothing; one category per distinct ground-truth label, or one category for all when some
ground truth has no label); predictions carry no confidence, so each box gets the score
``1 / (1 + rank)`` of its position in the answer (the first box written is taken as the most
confident); ``mean_iou`` (the reward's ``iou`` part, 0 for an unparsable answer);
``acc@0.5`` over single-object samples (grounding samples and samples with one ground-truth
box): RefCOCO's Acc@0.5 as VLM-R1's ``src/eval/test_rec_r1.py`` counts it: the FIRST predicted
box, as written, in pixels of the original image, has :func:`vlm_r1_iou` > 0.5 (strictly) with a
correct box; a box written with inverted corners is a miss; ``parse_rate``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from typing import Any, Sequence

import numpy as np

from vlm_grpo_ma.tasks import _synthetic as syn
from vlm_grpo_ma.tasks._geometric import GeometricTask, answer_inner
from vlm_grpo_ma.tasks._geometry import hungarian_match, iou_matrix
from vlm_grpo_ma.tasks._parsing import parse_boxes
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample

__all__ = ["DetectionTask", "coco_ap", "ground_truth", "match_score", "normalise_label", "vlm_r1_iou"]


def ground_truth(sample: Sample) -> tuple[list, list | None, list | None]:
    """(boxes, labels or None, acceptable boxes or None) of a detection or grounding sample.

    Grounding (``target["box"]``): ``([box], [label] or None, target["boxes"] or [box])``;
    detection: ``(target["boxes"], target.get("labels"), None)``.
    """
    t = sample.target
    if "box" in t:
        label = t.get("label")
        return [t["box"]], ([label] if label is not None else None), list(t.get("boxes") or [t["box"]])
    return list(t.get("boxes", [])), t.get("labels"), None


def normalise_label(label: Any) -> str | None:
    """Lowercased, whitespace-collapsed label, or None for a missing / non-text label."""
    if not isinstance(label, str):
        return None
    return " ".join(label.lower().split()) or None


def match_score(
    gt_boxes: Sequence[Sequence[float]],
    pred_boxes: Sequence[Sequence[float]],
    gt_labels: Sequence[Any] | None = None,
    pred_labels: Sequence[Any] | None = None,
) -> tuple[float, float]:
    """(iou, label) scores of predicted boxes (P, 4) against ground truth (G, 4).

    One-to-one Hungarian matching maximising total IoU; ``iou = sum(matched IoU) / max(G, P)``,
    ``label = #(matched, IoU > 0, equal normalised labels) / max(G, P)``.  With ``gt_labels``
    None the label score is 1.  Both empty -> (1, 1); exactly one empty -> (0, 0 or 1).
    """
    g, p = len(gt_boxes), len(pred_boxes)
    if g == 0 and p == 0:
        return 1.0, 1.0
    no_labels = gt_labels is None
    if g == 0 or p == 0:
        return 0.0, 1.0 if no_labels else 0.0
    ious = iou_matrix(gt_boxes, pred_boxes)
    pairs = hungarian_match(ious)
    denom = max(g, p)
    iou = sum(ious[i, j] for i, j in pairs) / denom
    if no_labels:
        return float(iou), 1.0
    pred_labels = pred_labels if pred_labels is not None else [None] * p
    agree = sum(
        1
        for i, j in pairs
        if ious[i, j] > 0 and normalise_label(gt_labels[i]) is not None and normalise_label(gt_labels[i]) == normalise_label(pred_labels[j])
    )
    return float(iou), agree / denom


def coco_ap(predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
    """COCO ``AP`` (IoU .50:.95), ``AP50`` and ``AP75`` through pycocotools' COCOeval.

    ``predictions[i]`` is the parsed prediction of ``samples[i]`` (a list of
    ``{"box", "label"}``, or None).  Boxes go to pixels of the original image
    (``Sample.image_sizes``).  Categories: one per distinct normalised ground-truth label, or a
    single one if any ground-truth box lacks a label (class-agnostic).  A predicted label that
    is no ground-truth category gets a category of its own, which COCOeval does not evaluate
    (as for any detector that predicts a class absent from the dataset).  Scores: ``1 / (1 +
    rank)`` by position in the answer.  NaN when there is no ground-truth box at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truths = [ground_truth(s) for s in samples]
    class_aware = all(labels is not None and all(normalise_label(x) for x in labels) for _, labels, _ in truths)
    cats: dict[str, int] = {}
    if class_aware:
        for _, labels, _ in truths:
            for lab in labels:
                cats.setdefault(normalise_label(lab), len(cats) + 1)
    else:
        cats["object"] = 1

    def cat_of(label: Any, extra: dict[str, int]) -> int:
        if not class_aware:
            return 1
        key = normalise_label(label) or ""
        if key in cats:
            return cats[key]
        return extra.setdefault(key, len(cats) + len(extra) + 1)

    images, anns, dets, extra = [], [], [], {}
    for k, (pred, s, (gt_boxes, gt_labels, _)) in enumerate(zip(predictions, samples, truths), start=1):
        w, h = s.image_size
        images.append({"id": k, "width": w, "height": h})
        crowd = s.target.get("crowd_boxes") or []
        crowd_labels = s.target.get("crowd_labels") or [None] * len(crowd)
        rows = [(b, lab, 0) for b, lab in zip(gt_boxes, gt_labels or [None] * len(gt_boxes))]
        rows += [(b, lab, 1) for b, lab in zip(crowd, crowd_labels)]
        for (x1, y1, x2, y2), lab, iscrowd in rows:
            bw, bh = (x2 - x1) * w, (y2 - y1) * h
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": k,
                    "category_id": cat_of(lab, extra),
                    "bbox": [x1 * w, y1 * h, bw, bh],
                    "area": bw * bh,
                    "iscrowd": iscrowd,
                }
            )
        for rank, obj in enumerate(pred or []):
            x1, y1, x2, y2 = obj.get("written", obj["box"])  # as written: pycocotools scores an inverted box
            dets.append(
                {
                    "image_id": k,
                    "category_id": cat_of(obj.get("label"), extra),
                    "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h],
                    "score": 1.0 / (1 + rank),
                }
            )
    if not any(a["iscrowd"] == 0 for a in anns):
        return {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = COCO()
    gt.dataset = {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for n, i in cats.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(v) for v in ev.stats[:3])
    return {k: (v if v >= 0 else math.nan) for k, v in (("AP", ap), ("AP50", ap50), ("AP75", ap75))}


#: default size factor of synthetic shapes (sides 0.12-0.28 of the image's shorter side, times
#: this).  At 1.5 the tiny demo model reached a held-out mean IoU of 0.17 (AP50 0.012) after 800
#: SFT steps; at 1.0 and 200 steps it was 0.04 with AP 0.
OBJECT_SCALE = 1.5


def vlm_r1_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two pixel boxes (4,) as VLM-R1's REC evaluation (``src/eval/test_rec_r1.py``)
    computes it: the intersection counts inclusive pixels (``x2 - 1``, ``+ 1``), the union uses
    the plain areas; 0 when the intersection is empty (so for an inverted box too), and 0 when
    the union is not positive (the original divides by zero there)."""
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2, iy2 = min(box1[2] - 1, box2[2] - 1), min(box1[3] - 1, box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0.0
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    return float(inter) / union if union > 0 else 0.0


class DetectionTask(GeometricTask):
    """Labelled boxes; see the module docstring.  Options: ``label_weight`` (0.25), ``w_task``,
    ``w_format``, ``image_size``, ``cache_dir``, ``max_objects`` (3, synthetic), ``object_scale``
    (:data:`OBJECT_SCALE`: synthetic box sides are 0.12-0.28 of the image times this)."""

    name = "detection"
    OBJECT_SCALE = OBJECT_SCALE
    reward_parts = ("format", "iou", "label")
    target_keys = ("boxes", "box")

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.label_weight = float(self.options.get("label_weight", 0.25))
        self.max_objects = int(self.options.get("max_objects", 3))

    def variant_for(self, sample: Sample) -> str | None:
        """``prompts/detection.grounding.txt`` for a grounding sample (one object asked for)."""
        return "grounding" if "box" in sample.target else None

    # --- answer text ----------------------------------------------------------------------
    def answer_text(self, boxes: Sequence[Sequence[float]], labels: Sequence[Any] | None, sample: Sample, family) -> str:
        """The JSON answer for canonical boxes in ``family``'s frame."""
        labels = labels if labels is not None else [None] * len(boxes)
        objs = []
        for box, lab in zip(boxes, labels):
            obj: dict[str, Any] = {"bbox_2d": family.encode_box(box, sample.image_size)}
            if lab is not None:
                obj["label"] = lab
            objs.append(obj)
        return json.dumps(objs)

    def sft_target(self, sample: Sample, family) -> str:
        self.check_sample(sample)
        boxes, labels, _ = ground_truth(sample)
        reasoning = sample.meta.get("reasoning")
        if reasoning is None:
            names = labels if labels is not None else [sample.prompt.get("object", "object")] * len(boxes)
            where = [f"{syn.article(n)} {n} at the {syn.location_words((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)}" for n, b in zip(names, boxes)]
            reasoning = f"I see {_join(where)}." if where else "I see nothing to box."
        return format_sft_target(reasoning, self.answer_text(boxes, labels, sample, family))

    # --- scoring --------------------------------------------------------------------------
    def parse(self, answer_text: str, sample: Sample, family) -> list[dict]:
        """``[{"box": [x1, y1, x2, y2], "label": str | None}, ...]`` canonical, corners ordered;
        a box written with inverted corners also carries ``"written"`` (canonical, as written)."""
        size = sample.image_size
        out = []
        for p in parse_boxes(answer_inner(answer_text)):
            item = {"box": family.decode_box(p.box, size), "label": p.label}
            if p.inverted:
                item["written"] = family.decode_box(p.as_written, size)
            out.append(item)
        return out

    def score(self, prediction: list[dict], sample: Sample) -> tuple[float, dict[str, float]]:
        boxes, labels, acceptable = ground_truth(sample)
        pred_boxes, pred_labels = [p["box"] for p in prediction], [p["label"] for p in prediction]
        if acceptable is None:
            iou, label = match_score(boxes, pred_boxes, labels, pred_labels)
        else:  # grounding: the best of the correct answers
            iou, label = max(match_score([b], pred_boxes, labels, pred_labels) for b in acceptable)
        task = iou if labels is None else (1 - self.label_weight) * iou + self.label_weight * label
        return task, {"iou": iou, "label": label}

    def sample_metrics(self, prediction: Any, sample: Sample) -> dict[str, float]:
        """Metrics of one sample (the benchmark's per-row figures): ``iou`` (the reward's iou
        term, 0 for an unparsable answer) and, for a single-object sample, ``acc@0.5``."""
        self.check_sample(sample)
        gt, _, acceptable = ground_truth(sample)
        pred_boxes = [p["box"] for p in prediction or []]
        if prediction is None:
            iou = 0.0
        elif acceptable is None:
            iou = match_score(gt, pred_boxes)[0]
        else:
            iou = max(match_score([b], pred_boxes)[0] for b in acceptable)
        out = {"iou": float(iou)}
        if acceptable is not None or len(gt) == 1:
            hit = False
            if prediction:
                first = prediction[0].get("written", prediction[0]["box"])
                w, h = sample.image_size
                px = lambda b: [b[0] * w, b[1] * h, b[2] * w, b[3] * h]  # noqa: E731
                hit = max(vlm_r1_iou(px(first), px(b)) for b in acceptable or gt) > 0.5
            out["acc@0.5"] = float(hit)
        return out

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        per = [self.sample_metrics(p, s) for p, s in zip(predictions, samples)]
        hits = [m["acc@0.5"] for m in per if "acc@0.5" in m]
        out = coco_ap(predictions, samples)
        out["mean_iou"] = float(np.mean([m["iou"] for m in per])) if per else math.nan
        out["acc@0.5"] = float(np.mean(hits)) if hits else math.nan
        out["parse_rate"] = float(np.mean([p is not None for p in predictions])) if predictions else math.nan
        return out

    # --- data -----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """``n`` images with 1..``max_objects`` coloured shapes (distinct colour+shape pairs, no
        overlap), labels ``"<colour> <shape>"``, boxes sorted left to right."""
        w, h = self.image_size
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            k = rng.randint(1, self.max_objects)
            kinds = rng.sample([(c, s) for c in syn.COLOURS for s in syn.SHAPES], k)
            side = min(w, h) * self.object_scale
            lo, hi = max(6, round(0.12 * side)), max(8, round(0.28 * side))
            sizes = [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(k)]
            boxes_px = syn.place_boxes(rng, sizes, w, h, min_side=6)  # shrinks a box only if no room
            img, draw = syn.new_canvas((w, h))
            objs = []
            for (colour, shape), box in zip(kinds, boxes_px):
                syn.draw_shape(draw, shape, box, syn.COLOURS[colour])
                objs.append((syn.px_box_to_unit(box, w, h), f"{colour} {shape}"))
            objs.sort(key=lambda o: (o[0][0], o[0][1]))
            out.append(
                syn.synthetic_sample(
                    self.name, seed, i, images=[syn.image_ref(img, self.cache_dir, self.name, seed, i)],
                    image_sizes=[(w, h)], prompt={"object": "shape"},
                    target={"boxes": [o[0] for o in objs], "labels": [o[1] for o in objs]},
                )
            )
        return out


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]
