"""Detection task: hand-computed rewards and metrics, COCO AP equal to pycocotools run directly,
SFT targets per family, determinism of the synthetic data, fuzzed rewards."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlm_grpo_ma.tasks.common import split_completion
from vlm_grpo_ma.tasks.detection import DetectionTask, coco_ap, match_score
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.models.family import ModelFamily
from vlm_grpo_ma.task import get_task

FAMILIES = {
    "qwen2_vl": ModelFamily.from_model_type("qwen2_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    "qwen2_5_vl": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    # max_pixels below the image: the 112x112 image is resized to 56x56, so is the frame
    "qwen2_5_vl_small": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=56 * 56),
    "qwen3_vl": ModelFamily.from_model_type("qwen3_vl", patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=1280 * 32 * 32),
}
#: families whose frame is the 112x112 image's own pixel grid: synthetic geometry is exact there
EXACT = {"qwen2_5_vl"}
QWEN2 = FAMILIES["qwen2_vl"]  # 0..1000 frame: easy hand computation


def completion(answer: str, thought: str = "<think>ok</think>") -> tuple[str, str]:
    return thought, f"<answer>{answer}</answer>"


def sample(boxes, labels=None, size=(1000, 1000), sid="s") -> Sample:
    target = {"boxes": boxes}
    if labels is not None:
        target["labels"] = labels
    return Sample(id=sid, task="detection", images=["x.png"], image_sizes=[size], prompt={"object": "shape"}, target=target)


# ---------------------------------------------------------------------------------------------
# reward, by hand
# ---------------------------------------------------------------------------------------------
def test_registered():
    assert isinstance(get_task("detection"), DetectionTask)


def test_match_score_hand():
    gt = [[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]]
    # one exact box, one box with IoU 1/7 (half-shifted), one extra box
    pred = [[0.5, 0.5, 0.7, 0.7], [0.1, 0.1, 0.3, 0.3], [0.9, 0.9, 1.0, 1.0]]
    iou, label = match_score(gt, pred, ["a", "b"], ["b", "a", "c"])
    assert iou == pytest.approx((1 + 1 / 7) / 3)
    assert label == pytest.approx(2 / 3)  # both matched pairs agree (pred 0 <-> gt 1, pred 1 <-> gt 0)
    # missing box: (1 + 0) / 2 ; labels compared whole, case/space-insensitive, never as substrings
    assert match_score(gt, [[0, 0, 0.2, 0.2]], ["red circle", "b"], ["  Red   Circle "]) == (0.5, 0.5)
    assert match_score(gt, [[0, 0, 0.2, 0.2]], ["red circle", "b"], ["red circle big"])[1] == 0.0
    assert match_score(gt, [[0, 0, 0.2, 0.2]], ["red circle", "b"], [None])[1] == 0.0
    # a matched pair with IoU 0 earns no label credit
    assert match_score([[0, 0, 0.1, 0.1]], [[0.5, 0.5, 0.6, 0.6]], ["a"], ["a"]) == (0.0, 0.0)
    assert match_score([], [], [], []) == (1.0, 1.0)
    assert match_score([], [[0, 0, 1, 1]], [], ["a"]) == (0.0, 0.0)
    assert match_score([[0, 0, 1, 1]], []) == (0.0, 1.0)  # no labels to disagree with


def test_reward_hand_computed():
    task = DetectionTask()  # label_weight 0.25, w_task 0.9, w_format 0.1
    s = sample([[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]], ["red circle", "blue square"])
    # exact first box, second box shifted by half its side in x and y (IoU 1/7), labels right
    ans = json.dumps([{"bbox_2d": [0, 0, 200, 200], "label": "red circle"}, {"bbox_2d": [600, 600, 800, 800], "label": "blue square"}])
    r = task.reward(*completion(ans), s, QWEN2)
    iou = (1 + 1 / 7) / 2
    assert r.reason is None
    assert r.parts == pytest.approx({"format": 1.0, "iou": iou, "label": 1.0})
    assert r.total == pytest.approx(0.1 + 0.9 * (0.75 * iou + 0.25 * 1.0))
    assert list(r.parts) == ["format", "iou", "label"]
    # weights are options
    r2 = DetectionTask(label_weight=0.0, w_task=0.5, w_format=0.5).reward(*completion(ans), s, QWEN2)
    assert r2.total == pytest.approx(0.5 + 0.5 * iou)


def test_reward_extra_and_missing_boxes_cost():
    task = DetectionTask()
    s = sample([[0.0, 0.0, 0.2, 0.2]], ["a"])
    one = task.reward(*completion('[{"bbox_2d": [0, 0, 200, 200], "label": "a"}]'), s, QWEN2)
    two = task.reward(*completion('[{"bbox_2d": [0, 0, 200, 200], "label": "a"}, {"bbox_2d": [500, 500, 600, 600], "label": "a"}]'), s, QWEN2)
    none = task.reward(*completion("[]"), s, QWEN2)
    assert one.total == pytest.approx(1.0)
    assert two.parts["iou"] == pytest.approx(0.5) and two.parts["label"] == pytest.approx(0.5)
    assert none.reason is None and none.total == pytest.approx(0.1)  # well-formed, finds nothing


def test_reward_box_tokens_and_qwen25_pixels():
    task = DetectionTask()
    s = sample([[0.25, 0.5, 0.5, 0.75]], ["cup"], size=(112, 112))
    fam = FAMILIES["qwen2_5_vl"]  # frame = 112x112 pixels
    r = task.reward(*completion('[{"bbox_2d": [28, 56, 56, 84], "label": "cup"}]'), s, fam)
    assert r.total == pytest.approx(1.0)
    tokens = "<|object_ref_start|>cup<|object_ref_end|><|box_start|>(250,500),(500,750)<|box_end|>"
    assert task.reward(*completion(tokens), s, QWEN2).total == pytest.approx(1.0)
    # the same numbers read in the wrong frame are wrong: 0..1000 values as Qwen2.5-VL pixels
    assert task.reward(*completion('[{"bbox_2d": [250, 500, 500, 750], "label": "cup"}]'), s, fam).parts["iou"] == 0.0


@pytest.mark.parametrize(
    "thought, answer, reason",
    [
        ("<think>a</think>", "", "no_answer"),
        ("no think", "<answer>[1,2,3,4]</answer>", "bad_think"),
        ("<think>a</think>", "<answer> </answer>", "empty"),
        ("<think>a</think>", "<answer>nothing</answer>", "no_json"),
        ("<think>a</think>", "<answer>[NaN, 1, 2, 3]</answer>", "bad_number"),
        ("<think>a</think>", "<answer>[1, 2]</answer>", "bad_shape"),
        ("<think>a</think>", "<answer>[1,2,3,4]</answer><answer>[1,2,3,4]</answer>", "no_answer"),
    ],
)
def test_malformed_scores_zero_with_reason(thought, answer, reason):
    r = DetectionTask().reward(thought, answer, sample([[0, 0, 1, 1]], ["a"]), QWEN2)
    assert r.total == 0.0 and r.reason == reason
    assert r.parts == {"format": 0.0, "iou": 0.0, "label": 0.0}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def _coco_direct(gt_px, det_px, sizes, cats):
    """COCOeval run directly: gt_px[i] = [(x, y, w, h, cat)], det_px[i] = [(x, y, w, h, cat, score)]."""
    images = [{"id": i + 1, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    anns, dets = [], []
    for i, boxes in enumerate(gt_px):
        for x, y, w, h, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    for i, boxes in enumerate(det_px):
        for x, y, w, h, c, sc in boxes:
            dets.append({"image_id": i + 1, "category_id": c, "bbox": [x, y, w, h], "score": sc})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in cats]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def test_ap_hand_computed():
    # one gt box 100x100 px in a 200x200 image, one prediction 100x62 inside it: IoU 0.62 matches
    # at thresholds .50, .55, .60 of the ten -> AP = 3/10, AP50 = 1, AP75 = 0
    s = sample([[0, 0, 0.5, 0.5]], ["a"], size=(200, 200))
    out = coco_ap([[{"box": [0, 0, 0.5, 0.31], "label": "a"}]], [s])
    assert out["AP"] == pytest.approx(0.3) and out["AP50"] == pytest.approx(1.0) and out["AP75"] == 0.0
    # a perfect prediction -> 1; a wrong label -> 0 (class-aware); no predictions -> 0
    assert coco_ap([[{"box": [0, 0, 0.5, 0.5], "label": "A "}]], [s])["AP"] == pytest.approx(1.0)
    assert coco_ap([[{"box": [0, 0, 0.5, 0.5], "label": "b"}]], [s])["AP"] == 0.0
    assert coco_ap([[]], [s]) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert all(math.isnan(v) for v in coco_ap([[]], [sample([], [])]).values())


def test_ap_equals_cocoeval_direct():
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "cup"]
    samples, preds, gt_px, det_px = [], [], [], []
    sizes = [(200, 100), (64, 128), (300, 300), (100, 100), (50, 80)]
    for i, (w, h) in enumerate(sizes):
        boxes, labels, gpx = [], [], []
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 0.7, 2)
            x2, y2 = x1 + rng.uniform(0.05, 0.3), y1 + rng.uniform(0.05, 0.3)
            lab = names[int(rng.integers(0, 3))]
            boxes.append([x1, y1, x2, y2])
            labels.append(lab)
            gpx.append((x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h, names.index(lab) + 1))
        pred, dpx = [], []
        cands = [[b[0] + rng.normal(0, 0.03), b[1] + rng.normal(0, 0.03), b[2] + rng.normal(0, 0.03), b[3]] for b in boxes]
        cands.append(list(np.sort(rng.uniform(0, 1, 4)).reshape(2, 2).T.flatten()))  # a random extra box
        for rank, b in enumerate(cands):
            lab = labels[rank] if rank < len(labels) and rng.random() < 0.8 else names[int(rng.integers(0, 3))]
            pred.append({"box": b, "label": lab})
            dpx.append((b[0] * w, b[1] * h, (b[2] - b[0]) * w, (b[3] - b[1]) * h, names.index(lab) + 1, 1.0 / (1 + rank)))
        samples.append(sample(boxes, labels, size=(w, h), sid=str(i)))
        preds.append(pred)
        gt_px.append(gpx)
        det_px.append(dpx)
    # categories in the order the task meets them
    seen = []
    for s in samples:
        for lab in s.target["labels"]:
            if lab not in seen:
                seen.append(lab)
    remap = {names.index(n) + 1: seen.index(n) + 1 for n in seen}
    gt_px = [[(*b[:4], remap[b[4]]) for b in g] for g in gt_px]
    det_px = [[(*b[:4], remap.get(b[4], 99), b[5]) for b in d] for d in det_px]
    direct = _coco_direct(gt_px, det_px, sizes, range(1, len(seen) + 1))
    ours = coco_ap(preds, samples)
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(list(direct))
    assert 0.0 < ours["AP"] < 1.0


def test_metrics_mean_iou_acc_and_parse_rate():
    task = DetectionTask()
    samples = [
        sample([[0, 0, 0.2, 0.2]], ["a"], sid="1"),  # single object, hit
        sample([[0.5, 0.5, 0.7, 0.7]], ["a"], sid="2"),  # single object, IoU 1/7: miss
        sample([[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]], ["a", "a"], sid="3"),  # two objects
        sample([[0, 0, 0.2, 0.2]], ["a"], sid="4"),  # parse failure
    ]
    preds = [
        [{"box": [0, 0, 0.2, 0.2], "label": "a"}],
        [{"box": [0.6, 0.6, 0.8, 0.8], "label": "a"}],
        [{"box": [0, 0, 0.2, 0.2], "label": "a"}],
        None,
    ]
    m = task.metrics(preds, samples)
    assert m["mean_iou"] == pytest.approx((1 + 1 / 7 + 0.5 + 0) / 4)
    assert m["acc@0.5"] == pytest.approx(1 / 3)
    assert m["parse_rate"] == pytest.approx(0.75)
    assert set(m) == {"AP", "AP50", "AP75", "mean_iou", "acc@0.5", "parse_rate"}


# ---------------------------------------------------------------------------------------------
# SFT targets, families, synthetic data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_sft_target_scores_max_and_perturbed_less(fam):
    family, task = FAMILIES[fam], DetectionTask()
    for s in task.synthetic(12, seed=3):
        target = task.sft_target(s, family)
        r = task.reward(*split_completion(target), s, family)
        assert r.reason is None and r.parts["format"] == 1.0 and r.parts["label"] == 1.0
        if fam in EXACT:
            assert r.total == 1.0
        else:
            # only the frame's integer rounding is lost: each side moves by at most e, so a w x h
            # box keeps IoU >= (w - 2e)(h - 2e) / ((w + 2e)(h + 2e))
            e = family.resolution_error(s.image_size)
            bounds = [(b[2] - b[0] - 2 * e) * (b[3] - b[1] - 2 * e) / ((b[2] - b[0] + 2 * e) * (b[3] - b[1] + 2 * e)) for b in s.target["boxes"]]
            assert r.parts["iou"] >= np.mean(bounds) - 1e-9
        shifted = [[min(1, b[0] + 0.08), b[1], min(1, b[2] + 0.08), b[3]] for b in s.target["boxes"]]
        answers = {
            "shifted": task.answer_text(shifted, s.target["labels"], s, family),
            "relabelled": task.answer_text(s.target["boxes"], ["green heart"] * len(shifted), s, family),
            "extra": task.answer_text([*s.target["boxes"], [0.0, 0.0, 0.05, 0.05]], [*s.target["labels"], "x"], s, family),
            "missing": task.answer_text(s.target["boxes"][:-1], s.target["labels"][:-1], s, family),
        }
        for name, ans in answers.items():
            worse = task.reward("<think>x</think>", f"<answer>{ans}</answer>", s, family)
            assert worse.total < r.total, name


def test_messages_and_prompt():
    task, s = DetectionTask(), DetectionTask().synthetic(1, seed=0)[0]
    for family in FAMILIES.values():
        msgs = task.messages(s, family)
        assert msgs[0]["role"] == "user"
        image, text = msgs[0]["content"]
        assert image == {"type": "image", "image": s.images[0]}
        assert text["type"] == "text"
        assert family.coord_hint(112, 112) in text["text"]
        assert "<think>" in text["text"] and "<answer>" in text["text"] and '"bbox_2d"' in text["text"]
        assert "{" not in text["text"].replace('{"bbox_2d"', "")  # every field was filled
        assert len(text["text"]) < 400
    with pytest.raises(KeyError, match="object"):
        task.messages(Sample(id="q", task="detection", images=["x"], image_sizes=[(9, 9)]), QWEN2)


def test_synthetic_deterministic(tmp_path):
    task = DetectionTask()
    a, b = task.synthetic(6, seed=7), task.synthetic(6, seed=7)
    assert [x.target for x in a] == [x.target for x in b]
    assert all(x.images[0].tobytes() == y.images[0].tobytes() for x, y in zip(a, b))
    assert [x.target for x in task.synthetic(3, seed=7)] == [x.target for x in a[:3]]  # sample i does not depend on n
    assert [x.target for x in task.synthetic(6, seed=8)] != [x.target for x in a]
    for x in a:
        assert x.image_sizes == [(112, 112)] and x.images[0].size == (112, 112)
        assert 1 <= len(x.target["boxes"]) <= 3 and len(x.target["labels"]) == len(x.target["boxes"])
        assert len(set(x.target["labels"])) == len(x.target["labels"])
        for b in x.target["boxes"]:
            assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
    # PNG files under a cache dir: same bytes from two separate runs
    p1 = DetectionTask(cache_dir=tmp_path / "1").synthetic(3, seed=7)
    p2 = DetectionTask(cache_dir=tmp_path / "2").synthetic(3, seed=7)
    for x, y, z in zip(p1, p2, a):
        assert isinstance(x.images[0], str) and x.images[0].endswith(".png")
        assert open(x.images[0], "rb").read() == open(y.images[0], "rb").read()
        from PIL import Image

        assert Image.open(x.images[0]).convert("RGB").tobytes() == z.images[0].tobytes()


def test_synthetic_shapes_drawn_inside_boxes():
    """The labelled colour is found inside its box and nowhere outside all boxes."""
    from vlm_grpo_ma.tasks._synthetic import COLOURS

    for s in DetectionTask().synthetic(5, seed=1):
        arr = np.asarray(s.images[0]).astype(int)
        outside = np.ones(arr.shape[:2], dtype=bool)
        for box, lab in zip(s.target["boxes"], s.target["labels"]):
            x1, y1, x2, y2 = (round(v * 112) for v in box)
            colour = np.array(COLOURS[lab.split()[0]])
            crop = arr[y1:y2, x1:x2]
            assert (np.abs(crop - colour).sum(-1) == 0).any()
            # tight box: the colour reaches every edge of it
            hit = np.abs(crop - colour).sum(-1) == 0
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any()
            outside[y1:y2, x1:x2] = False
        assert arr[outside].max() <= 40  # only the faint gradient outside the boxes


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------
_answers = st.one_of(
    st.text(max_size=120),
    st.builds(lambda v: json.dumps(v, allow_nan=True), st.recursive(
        st.one_of(st.floats(), st.integers(-(10**20), 10**20), st.text(max_size=6), st.none()),
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(["bbox_2d", "label", "x"]), inner, max_size=3)),
        max_leaves=20,
    )),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_answers, st.booleans(), st.integers(0, 60), st.sampled_from(sorted(FAMILIES)),
       st.one_of(st.just("<think>t</think>"), st.text(max_size=40), st.builds(lambda t: f"<think>{t}</think>", st.text(max_size=20))))
def test_fuzz_reward_never_raises(answer, wrap, cut, fam, thought):
    task = DetectionTask()
    s = sample([[0.1, 0.1, 0.4, 0.4]], ["a"], size=(112, 112))
    text = f"<answer>{answer}</answer>" if wrap else answer
    if cut:
        text = text[:-cut]
    r = task.reward(thought, text, s, FAMILIES[fam])
    assert 0.0 <= r.total <= 1.0 and list(r.parts) == ["format", "iou", "label"]
    assert r.reason != "reward_error"
    if r.reason is not None:
        assert r.total == 0.0 and all(v == 0.0 for v in r.parts.values())


# ---------------------------------------------------------------------------------------------
# grounding samples, crowd regions, bad data
# ---------------------------------------------------------------------------------------------
def grounding(box, boxes=None, label="cup", size=(1000, 1000), sid="g") -> Sample:
    target = {"box": box, "label": label}
    if boxes is not None:
        target["boxes"] = boxes
    return Sample(id=sid, task="detection", images=["x.png"], image_sizes=[size], prompt={"object": label}, target=target)


def test_grounding_reward_takes_the_best_correct_box():
    task = DetectionTask()
    s = grounding([0, 0, 0.2, 0.2], boxes=[[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    other = task.reward(*completion('[{"bbox_2d": [500, 500, 700, 700], "label": "cup"}]'), s, QWEN2)
    assert other.total == pytest.approx(1.0)  # the other cup is a correct answer too
    two = task.reward(*completion('[{"bbox_2d": [500, 500, 700, 700], "label": "cup"}, {"bbox_2d": [0, 0, 200, 200], "label": "cup"}]'), s, QWEN2)
    assert two.parts["iou"] == pytest.approx(0.5)  # one object asked for: the extra box costs
    target = task.sft_target(s, QWEN2)
    assert target.endswith('<answer>[{"bbox_2d": [0, 0, 200, 200], "label": "cup"}]</answer>')


def test_grounding_acc_uses_first_box_and_any_correct_box():
    task = DetectionTask()
    s = grounding([0, 0, 0.2, 0.2], boxes=[[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    m = task.metrics([[{"box": [0.5, 0.5, 0.7, 0.7], "label": "cup"}]], [s])
    assert m["acc@0.5"] == 1.0 and m["mean_iou"] == 1.0
    m = task.metrics([[{"box": [0.9, 0.9, 1, 1], "label": "cup"}, {"box": [0, 0, 0.2, 0.2], "label": "cup"}]], [s])
    assert m["acc@0.5"] == 0.0  # RefCOCO scores the first box only
    # COCO AP on grounding samples uses the referred box only
    # the first box (score 1) is a false positive, the second (score 1/2) a hit: precision 1/2 at recall 1
    assert m["AP50"] == pytest.approx(0.5)
    assert task.metrics([[{"box": [0.5, 0.5, 0.7, 0.7], "label": "cup"}]], [s])["AP"] == 0.0


def test_crowd_boxes_are_ignore_regions_as_in_cocoeval():
    s = sample([[0, 0, 0.5, 0.5]], ["a"], size=(200, 200))
    s.target["crowd_boxes"] = [[0.6, 0.6, 1.0, 1.0]]
    s.target["crowd_labels"] = ["a"]
    pred = [{"box": [0.7, 0.7, 0.9, 0.9], "label": "a"}, {"box": [0, 0, 0.5, 0.5], "label": "a"}]
    ours = coco_ap([pred], [s])
    # directly: the first detection lies in the crowd region and is ignored, so AP = 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": 1, "width": 200, "height": 200}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 10000, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [120, 120, 80, 80], "area": 6400, "iscrowd": 1},
            ],
            "categories": [{"id": 1, "name": "a"}],
        }
        gt.createIndex()
        dets = [{"image_id": 1, "category_id": 1, "bbox": [140, 140, 40, 40], "score": 1.0}, {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.5}]
        ev = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(list(ev.stats[:3]))
    assert ours["AP"] == pytest.approx(1.0)
    s.target.pop("crowd_boxes")
    assert coco_ap([pred], [s])["AP"] < 1.0  # without the crowd region the first box is a false positive


def test_bad_data_raises_naming_the_sample():
    task = DetectionTask()
    bad = Sample(id="b7", task="detection", images=["x.png"], image_sizes=[(10, 10)], target={"objects": []}, meta={"source": "d.jsonl", "line": 7})
    with pytest.raises(ValueError, match=r"'b7' \(d.jsonl:7\).*'boxes' or 'box'"):
        task.reward("<think>a</think>", "<answer>[1, 2, 3, 4]</answer>", bad, QWEN2)
    with pytest.raises(ValueError, match="image_sizes"):
        task.reward("<think>a</think>", "<answer>[]</answer>", Sample(id="n", task="detection", target={"boxes": []}), QWEN2)
    with pytest.raises(ValueError, match="b7"):
        task.metrics([None], [bad])


def test_sample_metrics_agree_with_metrics():
    task = DetectionTask()
    s1, s2 = sample([[0, 0, 0.2, 0.2]], ["a"], sid="1"), sample([[0, 0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]], ["a", "b"], sid="2")
    p1, p2 = [{"box": [0.1, 0.1, 0.3, 0.3], "label": "a"}], [{"box": [0, 0, 0.2, 0.2], "label": "a"}]
    assert task.sample_metrics(p1, s1) == pytest.approx({"iou": 1 / 7, "acc@0.5": 0.0})
    assert task.sample_metrics(p2, s2) == pytest.approx({"iou": 0.5})
    assert task.sample_metrics(None, s1) == {"iou": 0.0, "acc@0.5": 0.0}
    assert task.metrics([p1, p2], [s1, s2])["mean_iou"] == pytest.approx((1 / 7 + 0.5) / 2)


def test_grounding_prompt_asks_for_one_object():
    task = DetectionTask()
    text = task.messages(grounding([0, 0, 0.2, 0.2], label="cup"), QWEN2)[0]["content"][1]["text"]
    assert text.startswith("Find the cup and its label.")
    multi = task.messages(sample([[0, 0, 0.2, 0.2]], ["cup"]), QWEN2)[0]["content"][1]["text"]
    assert multi.startswith("Find each shape and its label.")


def test_gradient_background():
    from vlm_grpo_ma.tasks._synthetic import gradient_background

    arr = np.asarray(gradient_background(5, 3)).astype(int)
    assert arr.shape == (3, 5, 3)
    assert arr[:, :, 0].tolist() == [[40, 30, 20, 10, 0]] * 3  # red falls with x
    assert arr[:, :, 2].tolist() == [[40] * 5, [20] * 5, [0] * 5]  # blue falls with y
    assert (arr[:, :, 1] == 0).all()
