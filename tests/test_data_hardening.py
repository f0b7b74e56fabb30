"""Bad data found by trying the loaders as an attacker would (issue 12): every case is a
DataError naming the file, the line (or COCO locator) and the field, raised at load time, so
``skip_invalid`` skips and counts it instead of a traceback later in training."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlm_grpo_ma.data.errors import DataError
from vlm_grpo_ma.data.coco import load_coco
from vlm_grpo_ma.data.loaders import load_json, load_jsonl
from vlm_grpo_ma.data.sources import load_samples
from vlm_grpo_ma.task import get_task

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_NUMBER = "9" * 5000


def _jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _rec(**kw) -> str:
    base = {"id": "ok", "task": "math", "prompt": {"question": "1+1?"}, "target": {"answer": "2"}}
    base.update(kw)
    return json.dumps(base)


@pytest.mark.parametrize("bad, what", [
    ('{"id": "d", "task": "math", "prompt": ' + DEEP + "}", "JSON nested too deep"),
    ('{"id": "n", "task": "math", "target": {"answer": ' + HUGE_NUMBER + "}}", "unreadable JSON value"),
])
def test_jsonl_line_that_json_cannot_read(tmp_path, bad, what):
    path = _jsonl(tmp_path / "d.jsonl", [_rec(), bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {what}") as e:
        load_jsonl(path)
    assert e.value.line == 2 and e.value.kind == "bad_json"
    got = load_jsonl(path, skip_invalid=True)
    assert [s.id for s in got] == ["ok"] and got.summary.skipped == {"bad_json": 1}


@pytest.mark.parametrize("text, what", [(DEEP, "JSON nested too deep"), ("[" + HUGE_NUMBER + "]", "unreadable JSON value")])
def test_json_file_that_json_cannot_read(tmp_path, text, what):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    for load in (load_json, load_samples):
        with pytest.raises(DataError, match=rf"d\.json: {what}"):
            load(str(path), "math")


def test_lone_surrogate_in_a_prompt_is_named(tmp_path):
    line = '{"id": "s", "task": "math", "prompt": {"question": "what is \\ud800?"}, "target": {"answer": "2"}}'
    path = _jsonl(tmp_path / "s.jsonl", [_rec(), line])
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'prompt\.question': not valid Unicode text"):
        load_jsonl(path)
    assert load_jsonl(path, skip_invalid=True).summary.skipped == {"bad_value": 1}


def _coco(tmp_path, **ann_overrides) -> str:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.png")
    ann = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 10], "iscrowd": 0, "area": 100}
    ann.update(ann_overrides)
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
            "annotations": [ann], "categories": [{"id": 3, "name": "cup"}]}
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("key", ["id", "image_id", "category_id"])
def test_coco_ids_of_the_wrong_type(tmp_path, key):
    path = _coco(tmp_path, **{key: [1, 2]})
    where = "#0" if key == "id" else "1"  # an annotation is named by its id when that is an integer
    with pytest.raises(DataError, match=rf"coco\.json:annotation {where}: field '{key}': must be an integer, got list"):
        load_coco(path)
    got = load_coco(path, skip_invalid=True)
    assert got.summary.skipped == {"bad_value": 1}


def test_coco_truncated_image_is_caught_at_load(tmp_path):
    path = _coco(tmp_path)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"coco\.json:image 7: field 'file_name': cannot read image") as e:
        load_coco(path)
    assert e.value.kind == "corrupt_image"


# ---- the task's own checks, at load ---------------------------------------------------------
def _image(tmp_path) -> str:
    Image.new("RGB", (20, 20), (5, 5, 5)).save(tmp_path / "i.png")
    return "i.png"


CASES = {
    "detection target keys": ("detection", {}, lambda img: {"image": img, "prompt": {"object": "cup"},
                                                            "target": {"answer": "cup"}}, "needs target field"),
    "code tests as a string": ("code", {}, lambda img: {"prompt": {"problem": "p"},
                                                        "target": {"tests": "assert f(1) == 2"}}, "non-empty list of tests"),
    "math answer missing": ("math", {}, lambda img: {"prompt": {"question": "q"}, "target": {"solution": "2"}},
                            "non-empty 'answer'"),
    "vqa choice out of range": ("vqa", {}, lambda img: {"prompt": {"question": "q", "choices": ["a", "b"]},
                                                        "target": {"choice": 5}}, "'choice' must be an index"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_task_sample_checks_run_at_load(tmp_path, name):
    task_name, options, make, message = CASES[name]
    task = get_task(task_name, **options)
    rec = dict(id="bad", task=task_name, **make(_image(tmp_path)))
    path = _jsonl(tmp_path / "t.jsonl", [json.dumps(rec)])
    with pytest.raises(DataError, match=rf"t\.jsonl:1: field 'target': not usable by the {task_name} task: .*{message}"):
        load_samples(path, task_name, check_sample=task.check_sample)
    got = load_samples(path, task_name, check_sample=task.check_sample, skip_invalid=True)
    assert len(got) == 0 and got.summary.skipped == {"bad_value": 1}
    assert len(load_samples(path, task_name)) == 1  # without the task's check it loads (and fails later)


def test_benchmark_suites_run_the_task_check_at_load(tmp_path):
    from vlm_grpo_ma.bench.engine import BenchError, load_samples as load_suite_samples, make_task
    from vlm_grpo_ma.bench.suite import load_suite

    path = _jsonl(tmp_path / "c.jsonl", [json.dumps({"id": "c1", "task": "code", "prompt": {"problem": "p"},
                                                      "target": {"tests": "assert f(1) == 2"}})])
    suite_file = tmp_path / "bad-code.yaml"
    suite_file.write_text(f"name: bad-code\ntask: code\ndata:\n  format: jsonl\n  path: {path}\n"
                          "generation:\n  max_new_tokens: 8\nmetrics: [pass@1]\n")
    suite = load_suite(str(suite_file))
    with pytest.raises(BenchError, match=r"record 0 .*c\.jsonl.*non-empty list of tests"):
        load_suite_samples(suite, make_task(suite))
