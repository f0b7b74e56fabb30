"""Metrics of the public-format suites on their fixtures, from hand-written model outputs, equal
values computed by hand (and pycocotools' COCOeval for AP).  Outputs are written in Qwen2-VL's
0..1000 frame (``--family qwen2_vl``) so that the canonical values are exact."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.test_bench_formats import SUITE_ENV
from vlm_grpo_ma.bench.engine import read_predictions, score_predictions
from vlm_grpo_ma.bench.suite import load_suite


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k, v in SUITE_ENV.items():
        monkeypatch.setenv(k, str(v))


def _ans(answer: str, thought: str = "I look at the image.") -> str:
    return f"<think>{thought}</think><answer>{answer}</answer>"


def _score(tmp_path: Path, suite_name: str, raws: dict[str, str]) -> tuple[dict, dict[str, dict]]:
    pred = tmp_path / "outputs.jsonl"
    pred.write_text("".join(json.dumps({"id": k, "raw": v}) + "\n" for k, v in raws.items()))
    res = score_predictions(load_suite(suite_name), pred, tmp_path / "out", family="qwen2_vl", report=False)
    rows = {r["id"]: r for r in read_predictions(tmp_path / "out" / "predictions.jsonl")}
    return res, rows


def test_where2place_fraction_inside_mask(tmp_path):
    res, rows = _score(tmp_path, "where2place", {
        # mask 0: x in [0, 20), y in [0, 15) of 40x30 -> (0.1, 0.1) and (0.25, 0.25) in, (0.75, 0.75) out
        "where2place-0": _ans("[[100, 100], [250, 250], [750, 750]]"),
        # mask 1: bottom-right quarter -> (0.6, 0.6) in; (1.2, 0.5) is outside the image: a miss
        "where2place-1": _ans("[(600, 600), (1200, 500)]"),
    })
    m = res["metrics"]
    assert m["accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["parse_rate"] == 1.0 and m["format_rate"] == 1.0
    assert rows["where2place-0"]["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert rows["where2place-0"]["metrics"]["reward"] == pytest.approx(0.9 * 2 / 3 + 0.1)
    assert rows["where2place-0"]["prediction"] == [pytest.approx([0.1, 0.1]), pytest.approx([0.25, 0.25]),
                                                   pytest.approx([0.75, 0.75])]


def test_roborefit_points_and_parse_failure(tmp_path):
    res, rows = _score(tmp_path, "roborefit", {
        "roborefit-testA-0": _ans("[[500, 500]]"),  # (16, 12) px on 32x24: inside the cup's mask
        "roborefit-testA-1": "<think>no idea</think>",  # no answer block
    })
    assert res["metrics"]["accuracy"] == pytest.approx(0.5)
    assert res["metrics"]["parse_rate"] == pytest.approx(0.5)
    assert res["parse_failures"] == {"no_answer": 1}
    assert rows["roborefit-testA-1"]["parse_error"] == "no_answer"
    assert rows["roborefit-testA-1"]["prediction"] is None
    assert rows["roborefit-testA-1"]["metrics"]["reward"] == 0.0


def test_sharerobot_affordance_iou_shares(tmp_path):
    ids = [s for s in _ids("sharerobot-affordance")]
    res, _ = _score(tmp_path, "sharerobot-affordance", {
        ids[0]: _ans("[250, 250, 750, 500]"),  # GT (.25, .25, .75, .75): IoU = 0.125 / 0.25 = 0.5
        ids[1]: _ans("[625, 625, 875, 875]"),  # exact: IoU 1
    })
    m = res["metrics"]
    assert m["mean_iou"] == pytest.approx(0.75)
    assert m["iou>=0.5"] == pytest.approx(1.0)
    assert m["iou>=0.75"] == pytest.approx(0.5)
    assert m["iou>=0.9"] == pytest.approx(0.5)


def test_sharerobot_trajectory_distances(tmp_path):
    ids = _ids("sharerobot-trajectory")
    res, rows = _score(tmp_path, "sharerobot-trajectory", {
        # GT (0,0) (.5,.5) (1,1); the prediction stops half-way
        ids[0]: _ans("[[0, 0], [500, 500]]"),
        ids[1]: _ans("[[500, 500], [750, 500], [1000, 500], [1000, 1000]]"),  # exact
    })
    half_diag = math.sqrt(0.5)  # distance from (1, 1) to (.5, .5)
    m = res["metrics"]
    assert m["dfd"] == pytest.approx(half_diag / 2)
    assert m["hd"] == pytest.approx(half_diag / 2)
    assert m["rmse"] == pytest.approx(0.0)  # the first two points match exactly
    assert rows[ids[0]]["metrics"]["dfd"] == pytest.approx(half_diag)


def _ids(suite_name: str) -> list[str]:
    from vlm_grpo_ma.bench.engine import load_samples

    return [s.id for s in load_samples(load_suite(suite_name))]


def _cocoeval(gt_images, gt_anns, cats, dets) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": gt_images, "annotations": gt_anns, "categories": cats}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def _xywh(x1, y1, x2, y2):
    return [x1, y1, x2 - x1, y2 - y1]


def test_refcoco_grounding_acc_and_ap_vs_pycocotools(tmp_path):
    res, _ = _score(tmp_path, "refcoco-grounding", {
        "ref-1": _ans('[{"bbox_2d": [100, 250, 500, 750], "label": "block"}]'),  # exact: IoU 1
        "ref-2": _ans('[{"bbox_2d": [500, 0, 1000, 200], "label": "square"}]'),  # GT (.5, 0, 1, .5): IoU 0.4
    })
    m = res["metrics"]
    assert m["acc@0.5"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx((1.0 + 0.4) / 2)
    # independent COCOeval: one category (grounding boxes carry no labels), pixel boxes
    images = [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 80, "height": 100}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": _xywh(10, 20, 50, 60), "area": 1600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": _xywh(40, 0, 80, 50), "area": 2000, "iscrowd": 0},
    ]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": _xywh(10, 20, 50, 60), "score": 1.0},
        {"image_id": 2, "category_id": 1, "bbox": _xywh(40, 0, 80, 20), "score": 1.0},
    ]
    ref = _cocoeval(images, anns, [{"id": 1, "name": "object"}], dets)
    for k in ("AP", "AP50", "AP75"):
        assert m[k] == pytest.approx(ref[k], abs=1e-9), k


def test_coco_detection_ap_vs_pycocotools(tmp_path):
    res, rows = _score(tmp_path, "coco-detection", {
        # image 1 (100x100): red block exact; blue block (60,60,90,90) predicted (60,60,90,80): IoU 2/3
        "coco-1": _ans('[{"bbox_2d": [100, 100, 300, 300], "label": "red block"}, '
                       '{"bbox_2d": [600, 600, 900, 800], "label": "blue block"}]'),
        # image 2 (100x50): blue block (0,0,50,25) predicted with the wrong label
        "coco-2": _ans('[{"bbox_2d": [0, 0, 500, 500], "label": "red block"}]'),
    })
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 50}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50, 25], "area": 1250, "iscrowd": 0},
    ]
    dets = [  # score 1 / (1 + rank in the answer), as the task documents
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 1.0},
        {"image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 20], "score": 0.5},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 25], "score": 1.0},
    ]
    ref = _cocoeval(images, anns, [{"id": 1, "name": "red block"}, {"id": 2, "name": "blue block"}], dets)
    m = res["metrics"]
    for k in ("AP", "AP50", "AP75"):
        assert m[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 0 < m["AP"] < 1
    # the per-sample reward: Hungarian IoU over max(#gt, #pred) and label agreement
    r1 = rows["coco-1"]["metrics"]
    assert r1["reward/iou"] == pytest.approx((1 + 2 / 3) / 2)
    assert r1["reward/label"] == pytest.approx(1.0)


def test_missing_rows_count_as_failures_and_unknown_ids_are_errors(tmp_path):
    res, _ = _score(tmp_path, "where2place", {"where2place-0": _ans("[[100, 100]]")})
    assert res["parse_failures"] == {"missing": 1}
    assert res["metrics"]["accuracy"] == pytest.approx(0.5)
    from vlm_grpo_ma.bench.engine import BenchError

    with pytest.raises(BenchError, match="not in suite where2place"):
        _score(tmp_path, "where2place", {"where2place-9": _ans("[[1, 1]]")})


def test_lenient_scoring_of_untagged_outputs(tmp_path):
    pred = tmp_path / "api.jsonl"
    pred.write_text(json.dumps({"id": "where2place-0", "text": "Sure! [[100, 100], [900, 900]]"}) + "\n"
                    + json.dumps({"id": "where2place-1", "response": "<answer>[[600, 600]]</answer>"}) + "\n")
    suite = load_suite("where2place")
    strict = score_predictions(suite, pred, tmp_path / "strict", family="qwen2_vl", report=False)
    assert strict["metrics"]["accuracy"] == 0.0
    lenient = score_predictions(suite, pred, tmp_path / "lenient", family="qwen2_vl", strict=False, report=False)
    assert lenient["metrics"]["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
