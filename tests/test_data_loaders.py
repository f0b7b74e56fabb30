"""Data loaders: canonical geometry (hand-checked), every bad-input case's error (file, line,
field) or its count with skip_invalid, COCO against pycocotools, Hugging Face datasets, the front
door."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vlm_grpo_ma.data.errors import DataError, FieldError, LoadSummary
from vlm_grpo_ma.data.coco import coco_results, load_coco
from vlm_grpo_ma.data.loaders import (
    LoadedSamples,
    load_json,
    load_jsonl,
    record_to_sample,
)
from vlm_grpo_ma.data.sources import load_samples
from vlm_grpo_ma.data.validate import convert_box, convert_point, convert_region, convert_target

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def approx_nested(a, b, tol=1e-9):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and np.allclose(a, b, atol=tol, rtol=0)


@pytest.fixture
def datadir(tmp_path):
    """A copy of the committed fixtures (images/ and the data files) in a temporary folder."""
    shutil.copytree(FIX, tmp_path / "d")
    return tmp_path / "d"


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------
# conversion to canonical geometry (hand-computed values)
# ----------------------------------------------------------------------------------------------
def test_pixel_norm_rel1000_conversions_hand_checked():
    size = (100, 50)  # width, height
    assert convert_box([10, 5, 60, 45], "b", "pixel", size) == [0.1, 0.1, 0.6, 0.9]
    assert convert_point([25, 10], "p", "pixel", size) == [0.25, 0.2]
    assert convert_point([100, 50], "p", "pixel", size) == [1.0, 1.0]  # the far edge is inside
    assert convert_box([100, 250, 500, 1000], "b", "rel1000", None) == [0.1, 0.25, 0.5, 1.0]
    assert convert_point([0.3, 0.7], "p", "norm", None) == [0.3, 0.7]
    # within the 1 % tolerance: clamped; beyond it: an error naming the value and the image
    assert convert_point([100.5, -0.4], "p", "pixel", size) == [1.0, 0.0]
    with pytest.raises(FieldError, match=r"x = 102 is outside the 100x50 image") as e:
        convert_point([102, 10], "p", "pixel", size)
    assert e.value.kind == "out_of_image"
    # zero-width boxes are allowed (x1 == x2), inverted ones are not
    assert convert_box([10, 5, 10, 45], "b", "pixel", size) == [0.1, 0.1, 0.1, 0.9]


def test_convert_target_polygon_region_and_passthrough():
    size = (200, 100)
    t = convert_target(
        {"polygon": [0, 0, 100, 0, 100, 50], "region": {"polygon": [[20, 10], [40, 10], [40, 30]]}, "labels": [], "note": "x"},
        "pixel",
        size,
    )
    assert t["polygon"] == [[0.0, 0.0], [0.5, 0.0], [0.5, 0.5]]
    assert t["region"] == {"polygon": [[0.1, 0.1], [0.2, 0.1], [0.2, 0.3]]}
    assert t["labels"] == [] and t["note"] == "x"
    # an uncompressed RLE is compressed; its size must be the image's [h, w]
    r = convert_region({"rle": {"size": [100, 200], "counts": [10, 5, 19985]}}, "region", "pixel", size)
    from pycocotools import mask as mask_utils

    m = mask_utils.decode({"size": [100, 200], "counts": r["rle"]["counts"].encode()})
    assert r["size"] == [100, 200] and m.sum() == 5 and m[10:15, 0].all()
    with pytest.raises(FieldError, match="does not match the 200x100 image"):
        convert_region({"rle": {"size": [200, 100], "counts": [20000]}}, "region", "pixel", size)


# ----------------------------------------------------------------------------------------------
# JSONL, task fields and chat form
# ----------------------------------------------------------------------------------------------
def test_jsonl_task_fields_fixture():
    path = os.path.join(FIX, "tasks.jsonl")
    samples = load_jsonl(path)
    assert isinstance(samples, LoadedSamples) and samples.summary.loaded == 3 and samples.summary.n_skipped == 0
    det, aff, traj = samples
    assert det.id == "det-1" and det.task == "detection"
    assert det.images == [os.path.join(FIX, "images", "red_64x48.png")]
    assert det.image_sizes == [(64, 48)]
    # [16, 12, 48, 36] px of a 64x48 image
    assert det.target["boxes"] == [[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]]
    assert det.target["labels"] == ["mug", "table"] and det.prompt == {"object": "mug"}
    assert det.meta["source"] == path and det.meta["line"] == 1 and det.meta["coords"] == "pixel"
    assert aff.prompt == {"object": "handle"}  # top-level prompt fields
    assert aff.image_sizes == [(100, 50)] and aff.target["points"] == [[0.25, 0.5], [0.75, 1.0]]
    assert traj.target["trajectory"] == [[0.0, 0.5], [0.5, 0.5], [1.0, 0.25]]  # rel1000 / 1000
    # loading for one task: the other records disagree and say so
    with pytest.raises(DataError, match=r"tasks\.jsonl:2: field 'task': record is for task 'affordance'"):
        load_jsonl(path, "detection")


def test_jsonl_chat_form_fixture():
    samples = load_jsonl(os.path.join(FIX, "chat.jsonl"), "vqa")
    a, b = samples
    assert a.id == "chat:1"  # default id: file stem and line
    assert a.prompt == {"text": "Where is the mug?"}
    assert a.meta["reference_text"] == "<think>left</think><answer>[16, 12, 48, 36]</answer>"
    assert a.meta["system"] == "You are a robot."
    assert [m["role"] for m in a.meta["messages"]] == ["system", "user", "assistant"]
    assert a.target == {"box": [0.25, 0.25, 0.75, 0.75]}
    assert b.id == "c2" and b.image_sizes == [(64, 48), (100, 50)]
    assert b.target == {"answer": "no"} and b.meta["reference_text"] == "<think>no</think><answer>no</answer>"


def test_chat_content_parts_and_image_root(tmp_path, datadir):
    rec = {
        "id": "p1",
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "red_64x48.png"}, {"type": "text", "text": "Point at it."}]},
        ],
        "target": {"point": [32, 24]},
    }
    path = write_jsonl(tmp_path / "parts.jsonl", [rec])
    (s,) = load_jsonl(path, "affordance", image_root=str(datadir / "images"))
    assert s.images == [str(datadir / "images" / "red_64x48.png")]
    assert s.prompt == {"text": "Point at it."} and s.target == {"point": [0.5, 0.5]}
    assert s.meta["reference_text"] is None


GOOD = {"id": "ok", "task": "detection", "image": "images/red_64x48.png", "target": {"boxes": [[0, 0, 32, 24]]}}


def _with(**changes):
    """GOOD with id "bad" and ``changes`` applied (a None value removes the key)."""
    r = dict(json.loads(json.dumps(GOOD)), id="bad")
    for k, v in changes.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    return r


# (record or raw line, field named in the message, kind, text in the reason)
BAD_CASES = {
    "malformed_json": ('{"id": "bad", "image": ', "", "bad_json", "malformed JSON"),
    "not_an_object": ("[1, 2]", "", "bad_json", "must be a JSON object"),
    "missing_id": (_with(id=None), "id", "missing_field", "missing required field"),
    "missing_target": (_with(target=None), "target", "missing_field", "missing required field"),
    "missing_image": (_with(image="images/nope.png"), "image", "missing_image", "image file not found"),
    "corrupt_image": (_with(image="images/corrupt.png"), "image", "corrupt_image", "cannot read image"),
    "inverted_box": (_with(target={"boxes": [[0, 0, 8, 8], [50, 5, 10, 20]]}), "target.boxes[1]", "inverted_box", "box is inverted (x1 > x2"),
    "box_outside": (_with(target={"boxes": [[0, 0, 70, 20]]}), "target.boxes[0]", "out_of_image", "x2 = 70 is outside the 64x48 image"),
    "point_outside": (_with(target={"points": [[1, 1], [10, -5]]}), "target.points[1]", "out_of_image", "y = -5 is outside"),
    "norm_outside": (_with(target={"point": [0.5, 1.2]}, coords="norm"), "target.point", "out_of_image", "outside [0, 1]"),
    "non_numeric": (_with(target={"boxes": [[0, 0, "32", 24]]}), "target.boxes[0][2]", "not_numeric", "non-numeric coordinate '32'"),
    "null_coordinate": (_with(target={"point": [None, 3]}), "target.point[0]", "not_numeric", "non-numeric"),
    "box_arity": (_with(target={"boxes": [[0, 0, 32]]}), "target.boxes[0]", "bad_arity", "must have 4 numbers"),
    "point_arity": (_with(target={"points": [[1, 2, 3]]}), "target.points[0]", "bad_arity", "must have 2 numbers"),
    "short_trajectory": (_with(target={"trajectory": [[1, 2]]}), "target.trajectory", "bad_arity", "at least 2 points"),
    "labels_arity": (_with(target={"boxes": [[0, 0, 1, 1]], "labels": ["a", "b"]}), "target.labels", "bad_arity", "one entry per box"),
    "unknown_coords": (_with(coords="percent"), "coords", "bad_value", "unknown coordinate system 'percent'"),
    "image_and_images": (_with(images=["images/red_64x48.png"]), "images", "bad_value", "not both"),
    "placeholders": (
        {"id": "bad", "task": "detection", "messages": [{"role": "user", "content": "<image><image>hi"}], "images": ["images/red_64x48.png"]},
        "images",
        "bad_value",
        "2 <image> placeholder(s) in the messages but 1 image(s)",
    ),
    "bad_role": ({"id": "bad", "task": "detection", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "bad_value", "unknown role"),
    "duplicate_id": (dict(GOOD), "id", "duplicate_id", "duplicate id 'ok' (first seen at 1)"),
}


def _write_bad(datadir, bad):
    (datadir / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return write_jsonl(datadir / "data.jsonl", [GOOD, bad])


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_input_names_file_line_and_field(datadir, case):
    bad, field, kind, reason = BAD_CASES[case]
    path = _write_bad(datadir, bad)
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    err = e.value
    assert (err.file, err.line, err.field, err.kind) == (path, 2, field, kind)
    msg = str(err)
    assert msg.startswith(f"{path}:2: ")
    if field:
        assert f"field '{field}': " in msg
    assert reason in msg, msg


def test_skip_invalid_counts_every_bad_record(datadir):
    (datadir / "images" / "corrupt.png").write_bytes(b"garbage")
    bad = [BAD_CASES[c][0] for c in sorted(BAD_CASES) if c != "duplicate_id"]
    bad = [b if isinstance(b, str) or "id" not in b else dict(b, id=f"bad{i}") for i, b in enumerate(bad)]
    good2 = dict(GOOD, id="ok2", target={"point": [32, 12]})
    path = write_jsonl(datadir / "mixed.jsonl", [GOOD, *bad, good2, dict(GOOD)])  # last: duplicate id
    samples = load_jsonl(path, skip_invalid=True)
    assert [s.id for s in samples] == ["ok", "ok2"]
    assert samples[1].target == {"point": [0.5, 0.25]}
    summ = samples.summary
    expected = {}
    for c in BAD_CASES:
        expected[BAD_CASES[c][2]] = expected.get(BAD_CASES[c][2], 0) + 1
    assert summ.loaded == 2 and dict(summ.skipped) == expected and summ.n_skipped == len(BAD_CASES)
    text = str(summ)
    assert f"loaded 2 sample(s), skipped {len(BAD_CASES)} invalid" in text
    assert "out_of_image: 3" in text and f"e.g. {path}:" in text
    assert summ.to_dict()["skipped"]["inverted_box"] == 1


def test_json_list_file_names_record_index(tmp_path, datadir):
    path = str(datadir / "list.json")
    with open(path, "w") as fh:
        json.dump([GOOD, dict(GOOD, id="b", target={"box": [5, 5, 1, 9]})], fh)
    with pytest.raises(DataError, match=r"list\.json:record 1: field 'target\.box': box is inverted \(x1 > x2: 5 > 1\)"):
        load_json(path)
    assert [s.id for s in load_json(path, skip_invalid=True)] == ["ok"]
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": 1},\n  {"id": ]')
    with pytest.raises(DataError, match=r"broken\.json:2: malformed JSON") as e:
        load_samples(str(bad), "detection")
    assert e.value.kind == "bad_json"


def test_record_to_sample_directly():
    s = record_to_sample(
        {"id": 7, "image": os.path.join(FIX, "images", "blue_100x50.png"), "target": {"box": [10, 5, 60, 45]}},
        "detection",
        file="mem",
        line="record 0",
    )
    assert s.id == "7" and s.target["box"] == [0.1, 0.1, 0.6, 0.9] and s.image_sizes == [(100, 50)]
    with pytest.raises(DataError, match=r"^mem:3: field 'target\.box': pixel coordinates need an image"):
        record_to_sample({"id": "x", "target": {"box": [1, 2, 3, 4]}}, "detection", file="mem", line=3)
    # text-only tasks need no image; norm geometry needs no size
    s = record_to_sample({"id": "m", "question": "1+1?", "target": {"answer": "2"}}, "math")
    assert s.images == [] and s.prompt == {"question": "1+1?"}


def test_summary_merge_and_example_cap():
    a, b = LoadSummary(source="a", max_examples=2), LoadSummary(source="b")
    for i in range(3):
        a.add_skipped(DataError("f", i + 1, "x", "bad", "bad_value"))
    b.add_skipped(DataError("g", 1, "", "oops", "bad_json"))
    b.add_loaded(5)
    a.merge(b)
    assert a.loaded == 5 and dict(a.skipped) == {"bad_value": 3, "bad_json": 1}
    assert a.examples["bad_value"] == ["f:1: field 'x': bad", "f:2: field 'x': bad"]
    assert str(DataError("data.jsonl", 17, "target.boxes[0]", "box is inverted (x1 > x2)")) == (
        "data.jsonl:17: field 'target.boxes[0]': box is inverted (x1 > x2)"
    )


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
def _coco(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_coco_agrees_with_pycocotools():
    from pycocotools import mask as mask_utils

    path = os.path.join(FIX, "coco_instances.json")
    coco = _coco(path)
    samples = load_coco(path, with_masks=True)
    assert [s.id for s in samples] == ["coco-1", "coco-2", "coco-3"]
    # hand-checked: annotation 10, bbox [8, 4, 16, 12] on a 64x48 image
    assert approx_nested(samples[0].target["boxes"][0], [8 / 64, 4 / 48, 24 / 64, 16 / 48])
    for s in samples:
        img_id = s.meta["coco_image_id"]
        info = coco.loadImgs(img_id)[0]
        assert s.image_sizes == [(info["width"], info["height"])]
        w, h = s.image_size
        # non-crowd annotations, as COCO lists them
        assert s.meta["coco_ann_ids"] == coco.getAnnIds(imgIds=[img_id], iscrowd=False)
        for ann_id, box, label, region in zip(s.meta["coco_ann_ids"], s.target["boxes"], s.target["labels"], s.target["regions"]):
            ann = coco.loadAnns(ann_id)[0]
            x, y, bw, bh = ann["bbox"]
            assert approx_nested([box[0] * w, box[1] * h, (box[2] - box[0]) * w, (box[3] - box[1]) * h], [x, y, bw, bh])
            assert label == coco.loadCats(ann["category_id"])[0]["name"]
            mask = coco.annToMask(ann)
            if "polygon" in region:
                flat = [v for (px, py) in region["polygon"] for v in (px * w, py * h)]
                assert approx_nested(flat, ann["segmentation"][0])
            else:  # multi-part polygon: merged RLE, the same mask as pycocotools'
                ours = mask_utils.decode({"size": region["size"], "counts": region["rle"]["counts"].encode()})
                assert (ours == mask).all() and ours.sum() > 0
    # the crowd annotation (id 14) is an ignore region, not a target
    s2 = samples[1]
    assert 14 not in s2.meta["coco_ann_ids"] and s2.target["crowd_labels"] == ["cat"]
    assert approx_nested(s2.target["crowd_boxes"], [[0.3, 0.6, 0.33, 0.8]])
    assert s2.target["labels"] == ["dog", "dog"]
    assert samples[2].target["boxes"] == []  # an image without annotations is kept


def test_coco_results_round_trip_gives_perfect_ap():
    """Writing the ground truth back as predictions must give AP = 1 in COCOeval: checks the
    canonical -> COCO pixel xywh conversion and the category ids."""
    from pycocotools.cocoeval import COCOeval

    path = os.path.join(FIX, "coco_instances.json")
    samples = load_coco(path)
    results = []
    for s in samples:
        results += coco_results(s, s.target["boxes"], s.target["labels"], [0.9] * len(s.target["boxes"]))
    results += coco_results(samples[0], [[0, 0, 1, 1]], ["unicorn"])  # unknown label: left out
    assert len(results) == 4 and results[0]["bbox"] == pytest.approx([8, 4, 16, 12])
    gt = _coco(path)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_grounding_mode_and_unique_only():
    path = os.path.join(FIX, "coco_instances.json")
    samples = load_coco(path, mode="annotation")
    assert [s.id for s in samples] == ["coco-1-10", "coco-1-11", "coco-2-12", "coco-2-13"]
    s = samples[2]
    assert s.prompt == {"object": "dog"} and s.target["label"] == "dog"
    assert s.target["box"] == [0.0, 0.0, 0.5, 0.5] and len(s.target["boxes"]) == 2 and s.meta["coco_ann_id"] == 12
    uniq = load_coco(path, mode="annotation", unique_only=True)
    assert [s.id for s in uniq] == ["coco-1-10", "coco-1-11"] and uniq.summary.filtered["not_unique"] == 2
    assert "filtered 2 not_unique" in str(uniq.summary)


def _bad_coco(datadir, mutate):
    with open(datadir / "coco_instances.json") as fh:
        data = json.load(fh)
    mutate(data)
    path = str(datadir / "bad_coco.json")
    with open(path, "w") as fh:
        json.dump(data, fh)
    return path


COCO_BAD = {
    "negative_width": (lambda d: d["annotations"][0].update(bbox=[8, 4, -16, 12]), "annotation 10", "bbox", "inverted_box"),
    "outside": (lambda d: d["annotations"][2].update(bbox=[60, 10, 50, 40]), "annotation 12", "bbox", "out_of_image"),
    "non_numeric": (lambda d: d["annotations"][1].update(bbox=[30, "20", 30, 24]), "annotation 11", "bbox[1]", "not_numeric"),
    "arity": (lambda d: d["annotations"][1].update(bbox=[30, 20, 30]), "annotation 11", "bbox", "bad_arity"),
    "unknown_category": (lambda d: d["annotations"][0].update(category_id=99), "annotation 10", "category_id", "bad_value"),
    "missing_bbox": (lambda d: d["annotations"][0].pop("bbox"), "annotation 10", "bbox", "missing_field"),
    "size_mismatch": (lambda d: d["images"][0].update(width=65), "image 1", "width/height", "bad_value"),
    "missing_image": (lambda d: d["images"][0].update(file_name="images/none.png"), "image 1", "file_name", "missing_image"),
    # segmentations: checked at load whether masks are asked for or not (issue 23)
    "seg_wrong_type": (lambda d: d["annotations"][0].update(segmentation="mask"), "annotation 10", "segmentation", "bad_value"),
    "seg_wrong_type_number": (lambda d: d["annotations"][0].update(segmentation=0), "annotation 10", "segmentation", "bad_value"),
    "seg_odd_polygon": (lambda d: d["annotations"][1]["segmentation"][1].pop(), "annotation 11", "segmentation[1]", "bad_arity"),
    "seg_two_points": (lambda d: d["annotations"][0].update(segmentation=[[8, 4, 24, 4]]), "annotation 10", "segmentation[0]", "bad_arity"),
    "seg_nested_polygon": (lambda d: d["annotations"][0].update(segmentation=[[[8, 4], [24, 4], [24, 16]]]), "annotation 10",
                           "segmentation[0]", "bad_value"),
    "seg_polygon_not_a_list": (lambda d: d["annotations"][0].update(segmentation=[8, 4, 24, 4, 24, 16]), "annotation 10",
                               "segmentation[0]", "bad_value"),
    "seg_non_numeric": (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(2, "24"), "annotation 10",
                        "segmentation[0][1][0]", "not_numeric"),
    "seg_outside": (lambda d: d["annotations"][0]["segmentation"][0].__setitem__(2, 240), "annotation 10",
                    "segmentation[0][1]", "out_of_image"),
    "rle_counts_short": (lambda d: d["annotations"][4]["segmentation"].update(counts=[1530, 10, 40]), "annotation 14",
                         "segmentation.counts", "bad_value"),
    "rle_counts_negative": (lambda d: d["annotations"][4]["segmentation"]["counts"].__setitem__(1, -10), "annotation 14",
                            "segmentation.counts", "bad_value"),
    "rle_counts_garbage_string": (lambda d: d["annotations"][4]["segmentation"].update(counts="#!~"), "annotation 14",
                                  "segmentation.counts", "bad_value"),
    "rle_counts_other_mask": (lambda d: d["annotations"][4]["segmentation"].update(counts="0:"), "annotation 14",
                              "segmentation.counts", "bad_value"),
    "rle_counts_type": (lambda d: d["annotations"][4]["segmentation"].update(counts=5000), "annotation 14",
                        "segmentation.counts", "bad_value"),
    "rle_size": (lambda d: d["annotations"][4]["segmentation"].update(size=[48, 64]), "annotation 14",
                 "segmentation.size", "bad_value"),
    "rle_no_counts": (lambda d: d["annotations"][4]["segmentation"].pop("counts"), "annotation 14", "segmentation", "bad_value"),
}


@pytest.mark.parametrize("case", sorted(COCO_BAD))
def test_coco_bad_input(datadir, case):
    mutate, loc, field, kind = COCO_BAD[case]
    path = _bad_coco(datadir, mutate)
    with pytest.raises(DataError) as e:
        load_coco(path)
    assert (e.value.file, e.value.line, e.value.field, e.value.kind) == (path, loc, field, kind)
    assert str(e.value).startswith(f"{path}:{loc}: field '{field}': ")
    # skipped and counted instead: the image with the bad entry goes, with all its boxes
    samples = load_coco(path, skip_invalid=True)
    bad_image = 2 if loc in ("annotation 12", "annotation 14") else 1
    assert [s.meta["coco_image_id"] for s in samples] == [i for i in (1, 2, 3) if i != bad_image]
    assert dict(samples.summary.skipped) == {kind: 1}


def test_coco_malformed_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(DataError, match=r"x\.json:2: malformed JSON"):
        load_coco(str(p))


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------
def _records():
    return [json.loads(line) for line in open(os.path.join(FIX, "tasks.jsonl"))][:1] + [
        {"id": "det-2", "task": "detection", "image": "images/blue_100x50.png", "prompt": {"object": "cup"},
         "target": {"boxes": [[10, 5, 60, 45]], "labels": ["cup"]}, "coords": "pixel"},
    ]


def test_hf_save_to_disk_and_parquet_match_jsonl(datadir):
    datasets = pytest.importorskip("datasets")
    from vlm_grpo_ma.data.hf import load_hf

    recs = _records()
    jsonl = load_jsonl(write_jsonl(datadir / "two.jsonl", recs))
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(datadir / "saved"))
    ds.to_parquet(str(datadir / "two.parquet"))
    for src in (str(datadir / "saved"), str(datadir / "two.parquet")):
        # relative image paths: relative to the data file's folder, or to image_root
        opts = {"image_root": str(datadir)} if src.endswith("saved") else {"cache_dir": str(datadir / "cache")}
        got = load_samples(src, **opts)
        assert [(s.id, s.images, s.image_sizes, s.prompt, s.target) for s in got] == [
            (s.id, s.images, s.image_sizes, s.prompt, s.target) for s in jsonl
        ], src
        assert got[1].target["boxes"] == [[0.1, 0.1, 0.6, 0.9]]
    # a DatasetDict needs a split when it has several
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(datadir / "dd"))
    with pytest.raises(DataError, match=r"field 'split': the dataset has splits \['train', 'test'\]"):
        load_hf(str(datadir / "dd"), "detection")
    assert [s.id for s in load_hf(str(datadir / "dd"), "detection", split="test", image_root=str(datadir))] == ["det-2"]


def test_hf_pil_images_and_bad_row(datadir):
    datasets = pytest.importorskip("datasets")
    from vlm_grpo_ma.data.hf import load_hf

    img = Image.new("RGB", (40, 20), (0, 255, 0))
    rows = {
        "id": ["a", "b"],
        "image": [img, img],
        "target": [{"box": [4.0, 2.0, 20.0, 10.0]}, {"box": [30.0, 2.0, 20.0, 10.0]}],
    }
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "target": {"box": datasets.List(datasets.Value("float32"))},
    }))
    ds.save_to_disk(str(datadir / "pil"))
    with pytest.raises(DataError, match=r"pil:row 1: field 'target\.box': box is inverted"):
        load_hf(str(datadir / "pil"), "detection")
    got = load_hf(str(datadir / "pil"), "detection", skip_invalid=True)
    assert [s.id for s in got] == ["a"] and got.summary.skipped["inverted_box"] == 1
    assert isinstance(got[0].images[0], Image.Image) and got[0].image_sizes == [(40, 20)]
    assert got[0].target["box"] == pytest.approx([0.1, 0.1, 0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# the front door
# ----------------------------------------------------------------------------------------------
def test_load_samples_dispatch(datadir):
    assert [s.id for s in load_samples(str(datadir / "tasks.jsonl"))] == ["det-1", "aff-1", "traj-1"]
    coco = load_samples(str(datadir / "coco_instances.json"))  # detected as COCO
    assert [s.task for s in coco] == ["detection"] * 3
    spec = {"path": str(datadir / "coco_instances.json"), "format": "coco", "mode": "annotation", "unique_only": True}
    assert len(load_samples(spec, "grounding")) == 2
    assert len(load_samples(spec, "grounding", unique_only=False)) == 4  # keyword options win
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_samples(str(datadir / "images" / "red_64x48.png"), "detection")
    with pytest.raises(DataError, match="data file not found"):
        load_samples(str(datadir / "nope.jsonl"), "detection")


def test_load_samples_synthetic():
    from vlm_grpo_ma.data.sample import Sample
    from vlm_grpo_ma.task import Task

    class _LoaderProbe(Task):
        name = "_loader_probe"

        def synthetic(self, n, seed=0):
            return [Sample(id=f"{seed}-{i}", task=self.name) for i in range(n)]

        messages = sft_target = parse = reward = metrics = lambda *a, **k: None

    gen = _LoaderProbe().synthetic
    got = load_samples("synthetic:3", "_loader_probe", synthesize=gen, seed=5)
    assert [s.id for s in got] == ["5-0", "5-1", "5-2"] and got.summary.loaded == 3
    assert len(load_samples({"format": "synthetic", "n": 2}, "_loader_probe", synthesize=gen)) == 2
    with pytest.raises(ValueError, match="synthesize=task.synthetic"):
        load_samples("synthetic:3", "_loader_probe")  # the data layer never looks a task up


def test_jsonl_byte_order_mark_and_blank_lines(datadir):
    path = datadir / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\n   \n" + json.dumps(dict(GOOD, id="g2")).encode() + b"\n")
    got = load_jsonl(str(path))
    assert [s.id for s in got] == ["ok", "g2"] and got[1].meta["line"] == 4


def test_verify_images_catches_a_file_truncated_after_its_header(datadir):
    Image.new("RGB", (64, 48), (9, 9, 9)).save(datadir / "images" / "noise.png")
    data = (datadir / "images" / "noise.png").read_bytes()
    (datadir / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    path = write_jsonl(datadir / "cut.jsonl", [_with(id="c", image="images/cut.png")])
    assert len(load_jsonl(path, verify_images=False)) == 1  # opted out: only the header is read
    with pytest.raises(DataError, match=r"cut\.jsonl:1: field 'image': cannot read image") as e:
        load_jsonl(path)  # decoded at load by default
    assert e.value.kind == "corrupt_image"
    skipped = load_jsonl(path, skip_invalid=True)
    assert len(skipped) == 0 and skipped.summary.skipped == {"corrupt_image": 1}
