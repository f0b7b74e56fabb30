"""Public benchmark formats: each fixture (in its dataset's published layout) loads into the
canonical values computed by hand; bad records name file, record and field; every bundled
suite parses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vlm_grpo_ma.bench import formats as F
from vlm_grpo_ma.bench.suite import SuiteError, list_suites, load_suite, suite_from_dict
from vlm_grpo_ma.data.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "bench"

#: environment variables the public suites read -> fixture paths
SUITE_ENV = {
    "REFCOCO_JSONL": FIX / "refcoco" / "refcoco_val.jsonl",
    "REFCOCO_IMAGES": FIX / "refcoco" / "images",
    "COCO_INSTANCES": FIX / "coco" / "instances_val.json",
    "COCO_IMAGES": FIX / "coco" / "images",
    "SHAREROBOT_TRAJECTORY_JSON": FIX / "sharerobot" / "trajectory_test.json",
    "SHAREROBOT_AFFORDANCE_JSON": FIX / "sharerobot" / "affordance_test.json",
    "SHAREROBOT_IMAGES": FIX / "sharerobot" / "images",
    "WHERE2PLACE_ROOT": FIX / "where2place",
    "ROBOREFIT_TESTA_JSON": FIX / "roborefit" / "roborefit_testA.json",
    "ROBOREFIT_ROOT": FIX / "roborefit",
    "VQAV2_ANNOTATIONS": FIX / "vqav2" / "v2_mscoco_val2014_annotations.json",
    "VQAV2_IMAGES": FIX / "vqav2" / "images",
}


def test_refcoco_jsonl_xyxy_and_xywh():
    s = F.load_refcoco(FIX / "refcoco" / "refcoco_val.jsonl", image_root=str(FIX / "refcoco" / "images"))
    assert [x.id for x in s] == ["ref-1", "ref-2"]
    # 100x80 image, box (10, 20, 50, 60) px
    assert s[0].image_sizes == [(100, 80)]
    assert s[0].target["boxes"] == [pytest.approx([0.1, 0.25, 0.5, 0.75])]
    assert s[0].target["box"] == pytest.approx([0.1, 0.25, 0.5, 0.75]) and "labels" not in s[0].target
    assert s[0].prompt["object"] == "the red block"
    # 80x100 image, xywh (40, 0, 40, 50) -> xyxy (40, 0, 80, 50)
    assert s[1].target["boxes"] == [pytest.approx([0.5, 0.0, 1.0, 0.5])]
    assert s[1].prompt["object"] == "blue square top right"
    assert all(x.task == "detection" for x in s)


def test_sharerobot_trajectory_scaled_by_declared_frame():
    s = F.load_sharerobot_trajectory(FIX / "sharerobot" / "trajectory_test.json", image_root=str(FIX / "sharerobot" / "images"))
    assert len(s) == 2 and s[0].task == "trajectory"
    assert s[0].target["trajectory"] == [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
    # annotated in a 640x480 frame while the file is 64x48: divided by the declared frame
    assert s[1].image_sizes == [(64, 48)]
    assert s[1].target["trajectory"] == [[0.5, 0.5], [0.75, 0.5], [1.0, 0.5], [1.0, 1.0]]
    assert s[1].prompt["instruction"] == "move the mug to the right"
    assert s[0].id != s[1].id


def test_sharerobot_affordance_xywh_box():
    s = F.load_sharerobot_affordance(FIX / "sharerobot" / "affordance_test.json", image_root=str(FIX / "sharerobot" / "images"))
    assert s[0].target["box"] == pytest.approx([0.25, 0.25, 0.75, 0.75])  # (16, 12, 32, 24) on 64x48
    assert s[1].target["box"] == pytest.approx([0.625, 0.625, 0.875, 0.875])
    assert s[0].prompt["instruction"] == "grasp the handle of the pot"


def test_where2place_masks_and_prompt():
    s = F.load_where2place(FIX / "where2place")
    assert [x.id for x in s] == ["where2place-0", "where2place-1"]
    m0 = F.rle_to_mask(s[0].target["region"])
    assert m0.shape == (30, 40)
    # the JPEG mask's white rectangle x in [0, 20), y in [0, 15) survives thresholding exactly
    expect = np.zeros((30, 40), np.uint8)
    expect[:15, :20] = 1
    assert (m0 == expect).all()
    assert s[0].prompt["instruction"] == "Please point out the free space in the top left of the table."
    assert "formatted" not in s[1].prompt["instruction"]
    assert s[1].meta["category"] == "unseen"


def test_roborefit_mask_and_box():
    s = F.load_roborefit(FIX / "roborefit" / "roborefit_testA.json")
    assert [x.id for x in s] == ["roborefit-testA-0", "roborefit-testA-1"]
    m = F.rle_to_mask(s[0].target["region"])
    assert int(m.sum()) == 16 * 12 and m[6:18, 8:24].all()
    assert s[0].target["box"] == pytest.approx([0.25, 0.25, 0.75, 0.75])
    assert s[1].target["box"] == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert s[0].prompt["instruction"] == "the blue cup in the middle"


def test_coco_through_data_loader():
    s = F.load_format("coco", FIX / "coco" / "instances_val.json", image_root=str(FIX / "coco" / "images"))
    assert len(s) == 2
    assert s[0].target["boxes"] == [pytest.approx([0.1, 0.1, 0.3, 0.3]), pytest.approx([0.6, 0.6, 0.9, 0.9])]
    assert s[0].target["labels"] == ["red block", "blue block"]
    assert s[1].target["boxes"] == [pytest.approx([0.0, 0.0, 0.5, 0.5])]
    assert s[0].prompt["categories"] == "blue block, red block"


def test_rle_round_trip():
    m = np.zeros((7, 9), np.uint8)
    m[2:5, 3:8] = 1
    region = F.mask_to_rle(m)
    json.dumps(region)  # JSON-serialisable
    assert (F.rle_to_mask(region) == m).all()


# --- errors name file, record and field ---------------------------------------------------
def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_error_missing_field_names_line(tmp_path):
    p = _write(tmp_path, "r.jsonl", '{"image": "a.png", "bbox": [0, 0, 1, 1]}\n')
    with pytest.raises(DataError) as e:
        F.load_refcoco(p)
    assert str(p) in str(e.value) and "line 1" in str(e.value) and "expression" in str(e.value)


def test_error_bad_json_line(tmp_path):
    img = FIX / "refcoco" / "images" / "COCO_val2014_000000000001.png"
    good = json.dumps({"image": str(img), "expression": "x", "bbox": [1, 1, 5, 5]})
    p = _write(tmp_path, "r.jsonl", good + "\n{not json\n")
    with pytest.raises(DataError, match=r"r\.jsonl:line 2"):
        F.load_refcoco(p)


def test_error_inverted_and_outside_boxes(tmp_path):
    img = FIX / "refcoco" / "images" / "COCO_val2014_000000000001.png"  # 100 x 80
    p = _write(tmp_path, "r.jsonl", json.dumps({"image": str(img), "expression": "x", "bbox": [50, 10, 20, 30]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'bbox': inverted box"):
        F.load_refcoco(p)
    p = _write(tmp_path, "r2.jsonl", json.dumps({"image": str(img), "expression": "x", "bbox": [50, 10, 120, 30]}) + "\n")
    with pytest.raises(DataError, match="outside the image"):
        F.load_refcoco(p)


def test_error_missing_image_and_mask(tmp_path):
    rec = [{"id": "nope.png", "instruction": "go", "points": [[1, 1], [2, 2]]}]
    p = _write(tmp_path, "t.json", json.dumps(rec))
    with pytest.raises(DataError, match=r"t\.json:\[0\]: field 'id': cannot read image"):
        F.load_sharerobot_trajectory(p)
    rr = json.loads((FIX / "roborefit" / "roborefit_testA.json").read_text())
    rr[1]["mask_path"] = "final_dataset/testA/mask/missing.png"
    p = _write(tmp_path, "rr.json", json.dumps(rr))
    with pytest.raises(DataError, match=r"\[1\]: field 'mask_path': mask file .* does not exist"):
        F.load_roborefit(p, image_root=str(FIX / "roborefit"))


def test_error_short_trajectory_and_bad_number(tmp_path):
    base = {"id": "bridge/ep_0001/frame_000.png", "instruction": "go"}
    p = _write(tmp_path, "t.json", json.dumps([{**base, "points": [[1, 1]]}]))
    with pytest.raises(DataError, match="'points'"):
        F.load_sharerobot_trajectory(p, image_root=str(FIX / "sharerobot" / "images"))
    p = _write(tmp_path, "t2.json", json.dumps([{**base, "points": [[1, 1], [2, "x"]]}]))
    with pytest.raises(DataError, match=r"points\[1\].*not a finite number"):
        F.load_sharerobot_trajectory(p, image_root=str(FIX / "sharerobot" / "images"))


# --- suites ------------------------------------------------------------------------------
def test_every_bundled_suite_parses_and_public_ones_load_fixtures(monkeypatch):
    for k, v in SUITE_ENV.items():
        monkeypatch.setenv(k, str(v))
    suites = list_suites()
    for name in ("synthetic-detection", "synthetic-affordance", "synthetic-trajectory", "refcoco-grounding",
                 "coco-detection", "sharerobot-trajectory", "sharerobot-affordance", "where2place", "roborefit",
                 "vqav2"):
        assert name in suites
    from vlm_grpo_ma.bench.engine import load_samples

    for name in suites:
        suite = load_suite(name)
        assert suite.name == name
        if suite.data.format != "synthetic":
            samples = load_samples(suite)
            assert len(samples) == (4 if name == "vqav2" else 2), name
            assert all(s.task == suite.task for s in samples), name


def test_suite_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("SHAREROBOT_TRAJECTORY_JSON", raising=False)
    with pytest.raises(SuiteError, match=r"SHAREROBOT_TRAJECTORY_JSON"):
        load_suite("sharerobot-trajectory")
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("no-such-suite")
    with pytest.raises(SuiteError, match=r"unknown field\(s\) \['batchsize'\]"):
        suite_from_dict({"name": "x", "task": "detection", "generation": {"batchsize": 3}})
    with pytest.raises(SuiteError, match="missing required field 'task'"):
        suite_from_dict({"name": "x"})
    with pytest.raises(SuiteError, match="do_sample"):
        suite_from_dict({"name": "x", "task": "detection", "generation": {"num_thoughts": 2}})
    s = suite_from_dict({"name": "x", "task": "detection", "generation": {"do_sample": True, "num_thoughts": 2, "num_answers": 3}})
    assert s.generation.num_samples == 6


def test_suite_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ntask: affordance\ndata: {format: where2place, path: data}\n")
    s = load_suite(f)
    assert s.data.path == str((tmp_path / "data").resolve())
    assert os.path.isabs(s.data.path)


def test_public_suite_prompts_carry_the_instruction(monkeypatch):
    """The public suites' prompt files put each dataset's own instruction in the prompt."""
    for k, v in SUITE_ENV.items():
        monkeypatch.setenv(k, str(v))
    from vlm_grpo_ma.bench.engine import load_samples, make_task
    from vlm_grpo_ma.models.family import ModelFamily

    fam = ModelFamily.from_model_type("qwen2_vl")
    for name, expect in (("sharerobot-trajectory", "reach for the carrot"),
                         ("sharerobot-affordance", "grasp the handle of the pot"),
                         ("where2place", "free space in the top left"),
                         ("refcoco-grounding", "the red block")):
        suite = load_suite(name)
        task = make_task(suite)
        sample = load_samples(suite, task)[0]
        text = [c["text"] for c in task.messages(sample, fam)[0]["content"] if c["type"] == "text"][0]
        assert expect in text and "0 to 1000" in text, (name, text)


def test_vqav2_errors_name_file_record_and_field(tmp_path):
    import json

    ann = {"annotations": [{"question_id": 7, "image_id": 1, "answers": "yes"}]}
    q = {"data_subtype": "val2014", "questions": [{"question_id": 7, "image_id": 1, "question": "?"}]}
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(ann))
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(q))
    with pytest.raises(F.FormatError, match=r"annotations\[0\].*answers"):
        F.load_format("vqav2", tmp_path / "v2_mscoco_val2014_annotations.json")
    ann["annotations"][0]["question_id"] = 8
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(ann))
    with pytest.raises(F.FormatError, match=r"question_id.*8"):
        F.load_format("vqav2", tmp_path / "v2_mscoco_val2014_annotations.json")
