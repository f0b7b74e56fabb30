"""Affordance task (box and points modes): hand-computed rewards and metrics, polygon and RLE
regions, SFT targets per family, synthetic determinism, fuzzed rewards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from vlm_grpo_ma.tasks._geometry import _decode_rle
from vlm_grpo_ma.tasks.affordance import AffordanceTask
from vlm_grpo_ma.tasks.common import split_completion
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.models.family import ModelFamily
from vlm_grpo_ma.task import get_task

FAMILIES = {
    "qwen2_vl": ModelFamily.from_model_type("qwen2_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    "qwen2_5_vl": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    "qwen2_5_vl_small": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=56 * 56),
    "qwen3_vl": ModelFamily.from_model_type("qwen3_vl", patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=1280 * 32 * 32),
}
EXACT = {"qwen2_5_vl"}  # frame = the 112x112 image's own pixels
QWEN2 = FAMILIES["qwen2_vl"]

TRI = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # lower-left half of the image (x + y <= 1)


def completion(answer: str) -> tuple[str, str]:
    return "<think>ok</think>", f"<answer>{answer}</answer>"


def sample(box=None, region=None, size=(1000, 1000), sid="s") -> Sample:
    target = {}
    if box is not None:
        target["box"] = box
    if region is not None:
        target["region"] = region
    return Sample(id=sid, task="affordance", images=["x.png"], image_sizes=[size], prompt={"object": "mug"}, target=target)


def test_registered_and_options():
    assert get_task("affordance").mode == "box"
    assert get_task("affordance", mode="points").reward_parts == ("format", "inside")
    with pytest.raises(ValueError):
        AffordanceTask(mode="mask")
    with pytest.raises(ValueError):
        AffordanceTask(box_reward="dice")


# ---------------------------------------------------------------------------------------------
# box mode
# ---------------------------------------------------------------------------------------------
def test_box_reward_iou_and_giou_hand():
    s = sample(box=[0, 0, 0.5, 0.5])
    # pred [0.25, 0.25, 0.75, 0.75]: inter 1/16, union 7/16 -> IoU 1/7; hull 9/16 -> GIoU 1/7 - 2/9
    giou01 = (1 / 7 - 2 / 9 + 1) / 2
    r = AffordanceTask().reward(*completion("[250, 250, 750, 750]"), s, QWEN2)
    assert r.parts == pytest.approx({"format": 1.0, "iou": 1 / 7, "giou": giou01})
    assert r.total == pytest.approx(0.1 + 0.9 / 7)
    rg = AffordanceTask(box_reward="giou").reward(*completion("[250, 250, 750, 750]"), s, QWEN2)
    assert rg.total == pytest.approx(0.1 + 0.9 * giou01)
    # disjoint boxes: IoU 0 but GIoU still prefers the nearer one
    near = AffordanceTask(box_reward="giou").reward(*completion("[500, 0, 600, 500]"), s, QWEN2)
    far = AffordanceTask(box_reward="giou").reward(*completion("[900, 0, 1000, 500]"), s, QWEN2)
    assert near.parts["iou"] == far.parts["iou"] == 0.0 and near.total > far.total


def test_box_accepts_first_of_several_and_bbox_objects():
    s = sample(box=[0, 0, 0.5, 0.5])
    task = AffordanceTask()
    assert task.reward(*completion('{"bbox_2d": [0, 0, 500, 500], "label": "handle"}'), s, QWEN2).total == pytest.approx(1.0)
    assert task.reward(*completion("[[0, 0, 500, 500], [600, 600, 700, 700]]"), s, QWEN2).total == pytest.approx(1.0)
    r = task.reward(*completion("[]"), s, QWEN2)
    assert r.total == 0.0 and r.reason == "no_box"


def test_box_metrics_hand():
    task = AffordanceTask()
    gt = [0, 0, 1, 1]
    samples = [sample(box=gt, sid=str(i)) for i in range(4)]
    # IoU 1.0, 0.8, 0.6, and a parse failure (counts 0)
    preds = [[0, 0, 1, 1], [0, 0, 1, 0.8], [0, 0, 0.6, 1], None]
    m = task.metrics(preds, samples)
    assert m == pytest.approx({"mean_iou": 0.6, "iou>=0.5": 0.75, "iou>=0.75": 0.5, "iou>=0.9": 0.25, "parse_rate": 0.75})


# ---------------------------------------------------------------------------------------------
# points mode
# ---------------------------------------------------------------------------------------------
def test_points_reward_hand_polygon():
    task = AffordanceTask(mode="points")
    s = sample(region={"polygon": TRI})
    # in, in, on the edge (counts in), out
    r = task.reward(*completion("[[100, 100], [200, 700], [500, 500], [800, 800]]"), s, QWEN2)
    assert r.parts == pytest.approx({"format": 1.0, "inside": 0.75})
    assert r.total == pytest.approx(0.1 + 0.9 * 0.75)
    # points outside the image miss even where the region would contain them
    big = sample(region={"polygon": [[-1, -1], [2, -1], [2, 2], [-1, 2]]})
    r = task.reward(*completion("[[-10, 500], [500, 500], [500, 1001]]"), big, QWEN2)
    assert r.parts["inside"] == pytest.approx(1 / 3)
    assert task.reward(*completion("(100, 100), (900, 900)"), s, QWEN2).parts["inside"] == pytest.approx(0.5)


def test_points_reward_hand_rle_and_frame():
    mask = np.zeros((112, 112), dtype=np.uint8)
    mask[28:56, 56:84] = 1  # rows 28..55, cols 56..83
    enc = mask_utils.encode(np.asfortranarray(mask))
    s = sample(region={"rle": {"size": [112, 112], "counts": enc["counts"].decode()}}, size=(112, 112))
    task = AffordanceTask(mode="points")
    fam = FAMILIES["qwen2_5_vl"]  # pixel frame
    r = task.reward(*completion("[[60, 30], [83, 55], [84, 55], [56, 27]]"), s, fam)
    assert r.parts["inside"] == pytest.approx(0.5)  # the last two are one pixel off
    # 0..1000 frame: pixel 60 -> 536
    assert task.reward(*completion("[[536, 268]]"), s, QWEN2).parts["inside"] == 1.0


def test_points_max_points_and_empty():
    s = sample(region={"polygon": TRI})
    task = AffordanceTask(mode="points", max_points=2)
    # only the first two points count: both inside
    assert task.reward(*completion("[[100, 100], [200, 200], [900, 900]]"), s, QWEN2).parts["inside"] == 1.0
    r = task.reward(*completion("[]"), s, QWEN2)
    assert r.total == 0.0 and r.reason == "no_points"


def test_points_metrics_hand():
    task = AffordanceTask(mode="points")
    samples = [sample(region={"polygon": TRI}, sid=str(i)) for i in range(3)]
    preds = [[[0.1, 0.1], [0.9, 0.9]], [[0.2, 0.2]], None]
    # per sample (RoboPoint): (0.5 + 1 + 0) / 3; points-weighted (Embodied-R1): 2 of 3 points
    assert task.metrics(preds, samples) == pytest.approx(
        {"accuracy": 0.5, "accuracy_points_weighted": 2 / 3, "parse_rate": 2 / 3})


# ---------------------------------------------------------------------------------------------
# SFT targets, families, synthetic data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", sorted(FAMILIES))
@pytest.mark.parametrize("options", [{}, {"box_reward": "giou"}, {"mode": "points"}, {"mode": "points", "region_format": "rle"}])
def test_sft_target_scores_max_and_perturbed_less(fam, options):
    family, task = FAMILIES[fam], AffordanceTask(**options)
    for s in task.synthetic(12, seed=5):
        r = task.reward(*split_completion(task.sft_target(s, family)), s, family)
        assert r.reason is None and r.parts["format"] == 1.0
        if task.mode == "points" or fam in EXACT:
            assert r.total == 1.0
        else:
            e = family.resolution_error(s.image_size)
            b = s.target["box"]
            bound = (b[2] - b[0] - 2 * e) * (b[3] - b[1] - 2 * e) / ((b[2] - b[0] + 2 * e) * (b[3] - b[1] + 2 * e))
            assert r.parts["iou"] >= bound - 1e-9
        if task.mode == "box":
            b = s.target["box"]
            moved = family.encode_box([b[0] + 0.06, b[1] + 0.03, b[2] + 0.06, b[3] + 0.03], s.image_size)
            answer = json.dumps(moved)
        else:
            pts = [[x + 0.25, y] for x, y in s.target["points"]]  # a quarter image to the right: off the handle
            answer = json.dumps(family.encode_points(pts, s.image_size))
        worse = task.reward("<think>x</think>", f"<answer>{answer}</answer>", s, family)
        assert worse.reason is None and worse.total < r.total


def test_synthetic_ground_truth_is_consistent():
    """The box is the polygon's bounding box, the points lie in the polygon and on the object's
    colour, and the RLE region covers the drawn handle."""
    from shapely import Point, Polygon

    from vlm_grpo_ma.tasks._synthetic import COLOURS

    polys = AffordanceTask().synthetic(10, seed=2)
    rles = AffordanceTask(region_format="rle").synthetic(10, seed=2)
    for s, q in zip(polys, rles):
        assert s.target["box"] == q.target["box"] and s.images[0].tobytes() == q.images[0].tobytes()
        poly = Polygon(s.target["region"]["polygon"])
        assert list(poly.bounds) == pytest.approx(s.target["box"])
        colour = np.array(COLOURS[s.prompt["object"].split()[0]])
        arr = np.asarray(s.images[0]).astype(int)
        for x, y in s.target["points"]:
            assert poly.contains(Point(x, y))
            assert (arr[int(y * 112), int(x * 112)] == colour).all()
        mask = _decode_rle(q.target["region"]["rle"])
        on = np.abs(arr - colour).sum(-1) == 0
        assert mask.sum() > 0 and on[mask.astype(bool)].all()  # the mask is drawn in the object's colour
        assert s.prompt["object"].split()[1] in ("mug", "pan")


def test_synthetic_deterministic():
    task = AffordanceTask()
    a, b = task.synthetic(5, seed=11), task.synthetic(5, seed=11)
    assert [x.target for x in a] == [x.target for x in b] and [x.prompt for x in a] == [x.prompt for x in b]
    assert all(x.images[0].tobytes() == y.images[0].tobytes() for x, y in zip(a, b))
    assert [x.target for x in task.synthetic(2, seed=11)] == [x.target for x in a[:2]]
    assert [x.target for x in task.synthetic(5, seed=12)] != [x.target for x in a]


def test_messages_prompt_per_mode():
    for mode, shape in (("box", "[x1, y1, x2, y2]"), ("points", "[[x, y], ...]")):
        task = AffordanceTask(mode=mode)
        s = task.synthetic(1)[0]
        for family in FAMILIES.values():
            image, text = task.messages(s, family)[0]["content"]
            assert image["image"] is s.images[0]
            assert s.prompt["object"] in text["text"] and shape in text["text"]
            assert family.coord_hint(112, 112) in text["text"] and len(text["text"]) < 400


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------
_answers = st.one_of(
    st.text(max_size=100),
    st.builds(lambda v: json.dumps(v, allow_nan=True), st.recursive(
        st.one_of(st.floats(), st.integers(-(10**20), 10**20), st.text(max_size=5), st.none(), st.booleans()),
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(["bbox_2d", "point_2d", "x", "y"]), inner, max_size=3)),
        max_leaves=20,
    )),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_answers, st.sampled_from(["box", "points", "points-rle"]), st.sampled_from(sorted(FAMILIES)), st.integers(0, 40))
def test_fuzz_reward_never_raises(answer, mode, fam, cut):
    mask = np.zeros((112, 112), dtype=np.uint8)
    mask[10:30, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    region = {"rle": rle} if mode == "points-rle" else {"polygon": TRI}
    task = AffordanceTask(mode=mode.split("-")[0])
    s = sample(box=[0.1, 0.1, 0.3, 0.3], region=region, size=(112, 112))
    text = f"<answer>{answer}</answer>"
    r = task.reward("<think>t</think>", text[: len(text) - cut], s, FAMILIES[fam])
    assert 0.0 <= r.total <= 1.0 and tuple(r.parts) == task.reward_parts and r.reason != "reward_error"
    if r.reason is not None:
        assert r.total == 0.0


def test_several_correct_boxes_and_region_unions():
    task = AffordanceTask()
    s = sample(box=[0, 0, 0.2, 0.2])
    s.target["boxes"] = [[0.5, 0.5, 0.7, 0.7]]
    assert task.reward(*completion("[500, 500, 700, 700]"), s, QWEN2).total == pytest.approx(1.0)
    assert task.reward(*completion("[0, 0, 200, 200]"), s, QWEN2).total == pytest.approx(1.0)
    assert task.metrics([[0.5, 0.5, 0.7, 0.7]], [s])["mean_iou"] == pytest.approx(1.0)
    pts = AffordanceTask(mode="points")
    union = sample(region=None)
    union.target["regions"] = [{"polygon": [[0, 0], [0.2, 0], [0.2, 0.2], [0, 0.2]]}, {"polygon": [[0.8, 0.8], [1, 0.8], [1, 1], [0.8, 1]]}]
    r = pts.reward(*completion("[[100, 100], [900, 900], [500, 500]]"), union, QWEN2)
    assert r.parts["inside"] == pytest.approx(2 / 3)
    bare = sample(region=None)
    bare.target["polygon"] = TRI
    assert pts.reward(*completion("[[100, 100]]"), bare, QWEN2).parts["inside"] == 1.0


def test_bad_data_raises_naming_the_sample():
    s = Sample(id="a9", task="affordance", images=["x"], image_sizes=[(10, 10)], target={"box": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="'a9'.*'region' or 'regions' or 'polygon'"):
        AffordanceTask(mode="points").reward("<think>a</think>", "<answer>[[1, 2]]</answer>", s, QWEN2)
    with pytest.raises(ValueError, match="'a9'.*target\\['points'\\]"):
        AffordanceTask(mode="points").sft_target(Sample(id="a9", task="affordance", images=["x"], image_sizes=[(10, 10)], target={"region": {"polygon": TRI}}), QWEN2)


def test_sample_metrics():
    s = sample(box=[0, 0, 0.5, 0.5], region={"polygon": TRI})
    assert AffordanceTask().sample_metrics([0.25, 0.25, 0.75, 0.75], s) == pytest.approx({"iou": 1 / 7})
    assert AffordanceTask().sample_metrics(None, s) == {"iou": 0.0}
    # the sample has a box too: the share of points inside it (edges inclusive) is reported
    assert AffordanceTask(mode="points").sample_metrics([[0.1, 0.1], [0.9, 0.9]], s) == {"accuracy": 0.5, "box_accuracy": 0.5}
    assert AffordanceTask(mode="points").sample_metrics([[0.5, 0.5], [0.5, 0.51]], s)["box_accuracy"] == 0.5


def test_reward_leniencies_are_options_and_metrics_ignore_them():
    """The reward may swap inverted corners and cap the points; the metrics never do."""
    s = sample(box=[0.2, 0.2, 0.6, 0.6], region={"polygon": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]})
    inverted = "[600, 600, 200, 200]"
    box = AffordanceTask(w_task=1.0, w_format=0.0)
    pred = box.parse(inverted, s, QWEN2)
    assert pred == pytest.approx([0.6, 0.6, 0.2, 0.2])  # kept as written
    assert box.reward(*completion(inverted), s, QWEN2).total == pytest.approx(1.0)
    assert box.sample_metrics(pred, s) == {"iou": 0.0}  # FlagEvalMM: an inverted box is a miss
    strict = AffordanceTask(w_task=1.0, w_format=0.0, swap_inverted=False)
    r = strict.reward(*completion(inverted), s, QWEN2)
    assert r.parts["iou"] == 0.0 and r.parts["giou"] == 0.0
    # points: 10 inside then 2 outside -> reward (first 10) 1.0, metric (all 12) 10/12
    pts = AffordanceTask(mode="points", w_task=1.0, w_format=0.0)
    text = json.dumps([[100, 100]] * 10 + [[900, 900]] * 2)
    assert pts.reward(*completion(text), s, QWEN2).total == 1.0
    m = pts.metrics([pts.parse(text, s, QWEN2)], [s])
    assert m["accuracy"] == pytest.approx(10 / 12) and m["accuracy_points_weighted"] == pytest.approx(10 / 12)
