"""Trajectory task: hand-computed rewards, metrics against independent computations, SFT
targets per family, synthetic determinism and geometry, fuzzed rewards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import directed_hausdorff

from vlm_grpo_ma.tasks.common import split_completion
from vlm_grpo_ma.tasks.trajectory import FAILED_DISTANCE, TrajectoryTask, frechet_reward
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.models.family import ModelFamily
from vlm_grpo_ma.task import get_task

FAMILIES = {
    "qwen2_vl": ModelFamily.from_model_type("qwen2_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    "qwen2_5_vl": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
    "qwen2_5_vl_small": ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=56 * 56),
    "qwen3_vl": ModelFamily.from_model_type("qwen3_vl", patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=1280 * 32 * 32),
}
EXACT = {"qwen2_5_vl"}
QWEN2 = FAMILIES["qwen2_vl"]


def completion(answer: str) -> tuple[str, str]:
    return "<think>ok</think>", f"<answer>{answer}</answer>"


def sample(traj, size=(1000, 1000), sid="s") -> Sample:
    return Sample(
        id=sid, task="trajectory", images=["x.png"], image_sizes=[size],
        prompt={"start": "red dot", "goal": "blue square"}, target={"trajectory": traj},
    )


def test_registered_and_options():
    assert isinstance(get_task("trajectory"), TrajectoryTask)
    with pytest.raises(ValueError):
        TrajectoryTask(d_max=0)


def test_reward_hand_computed():
    task = TrajectoryTask()  # d_max 0.5
    s = sample([[0.0, 0.0], [0.5, 0.0]])
    r = task.reward(*completion("[[0, 100], [500, 100]]"), s, QWEN2)  # shifted by 0.1: DFD 0.1
    assert r.parts == pytest.approx({"format": 1.0, "frechet": 0.8})
    assert r.total == pytest.approx(0.1 + 0.9 * 0.8)
    # backwards: Hausdorff 0 but DFD 0.5 = d_max -> no task reward
    back = task.reward(*completion("[[500, 0], [0, 0]]"), s, QWEN2)
    assert back.parts["frechet"] == 0.0 and back.total == pytest.approx(0.1)
    # d_max is an option: DFD 0.1 with d_max 0.2 -> 0.5
    assert TrajectoryTask(d_max=0.2).reward(*completion("[[0, 100], [500, 100]]"), s, QWEN2).parts["frechet"] == pytest.approx(0.5)
    # far away: clipped at 0, never negative
    assert task.reward(*completion("[[1000, 1000]]"), s, QWEN2).parts["frechet"] == 0.0
    assert frechet_reward([[0, 0], [0.5, 0]], [[0, 0], [0.5, 0]]) == 1.0


def test_reward_frames_and_point_formats():
    s = sample([[0.25, 0.5], [0.5, 0.5], [0.75, 0.25]], size=(112, 112))
    task, fam = TrajectoryTask(), FAMILIES["qwen2_5_vl"]
    for ans in ("[[28, 56], [56, 56], [84, 28]]", '[{"point_2d": [28, 56]}, {"point_2d": [56, 56]}, {"point_2d": [84, 28]}]', "(28, 56), (56, 56), (84, 28)"):
        assert task.reward(*completion(ans), s, fam).total == 1.0, ans
    assert task.reward(*completion("[[250, 500], [500, 500], [750, 250]]"), s, QWEN2).total == 1.0
    # 0..1000 numbers read as Qwen2.5-VL pixels land far outside the image
    assert task.reward(*completion("[[250, 500], [500, 500], [750, 250]]"), s, fam).parts["frechet"] == 0.0


def test_max_points_keeps_the_first():
    task = TrajectoryTask(max_points=3)
    s = sample([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0]])
    ans = json.dumps([[0, 0], [100, 0], [200, 0], [900, 900], [1000, 1000]])
    pred = task.parse(ans, s, QWEN2)
    assert pred == [[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [0.9, 0.9], [1.0, 1.0]]  # all kept
    assert task.reward(*completion(ans), s, QWEN2).total == 1.0  # the reward reads the first 3
    # the metrics read every point: the far extra points cost (DFD to (1, 1) from (0.2, 0))
    assert task.sample_metrics(pred, s)["dfd"] == pytest.approx(math.hypot(0.8, 1.0))
    r = task.reward(*completion("[]"), s, QWEN2)
    assert r.total == 0.0 and r.reason == "no_points"


def test_metrics_hand_and_failures():
    task = TrajectoryTask()
    samples = [sample([[0, 0], [1, 0]], sid="a"), sample([[0, 0], [1, 0]], sid="b")]
    preds = [[[0, 0.5], [1, 0.5]], None]  # DFD = HD = RMSE = 0.5; failure counts sqrt(2)
    m = task.metrics(preds, samples)
    expect = (0.5 + FAILED_DISTANCE) / 2
    assert m == pytest.approx({"dfd": expect, "hd": expect, "rmse": expect, "parse_rate": 0.5})
    assert FAILED_DISTANCE == pytest.approx(math.sqrt(2))


def test_metrics_against_independent_computations():
    rng = np.random.default_rng(4)
    samples, preds, dfd, hd, rmse = [], [], [], [], []
    for i in range(20):
        gt = rng.random((int(rng.integers(2, 11)), 2))
        pred = gt[: int(rng.integers(1, len(gt) + 1))] + rng.normal(0, 0.05, (1, 2))
        samples.append(sample(gt.tolist(), sid=str(i)))
        preds.append(pred.tolist())
        hd.append(max(directed_hausdorff(pred, gt)[0], directed_hausdorff(gt, pred)[0]))
        k = min(len(pred), len(gt))
        rmse.append(np.sqrt(np.mean(np.sum((pred[:k] - gt[:k]) ** 2, axis=1))))
        dfd.append(_frechet_memo(pred, gt))
    m = TrajectoryTask().metrics(preds, samples)
    assert m["dfd"] == pytest.approx(np.mean(dfd)) and m["hd"] == pytest.approx(np.mean(hd)) and m["rmse"] == pytest.approx(np.mean(rmse))
    assert m["parse_rate"] == 1.0


def _frechet_memo(p, q):
    """Eiter & Mannila's recursive definition, memoised (independent of the task's loop)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def c(i, j):
        d = float(np.hypot(*(p[i] - q[j])))
        if i == 0 and j == 0:
            return d
        if i == 0:
            return max(c(0, j - 1), d)
        if j == 0:
            return max(c(i - 1, 0), d)
        return max(min(c(i - 1, j), c(i - 1, j - 1), c(i, j - 1)), d)

    return c(len(p) - 1, len(q) - 1)


# ---------------------------------------------------------------------------------------------
# SFT targets, families, synthetic data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_sft_target_scores_max_and_perturbed_less(fam):
    family, task = FAMILIES[fam], TrajectoryTask()
    for s in task.synthetic(12, seed=9):
        r = task.reward(*split_completion(task.sft_target(s, family)), s, family)
        assert r.reason is None and r.parts["format"] == 1.0
        if fam in EXACT:
            assert r.total == 1.0
        else:
            # every point moves by at most e in x and in y: DFD <= e * sqrt(2)
            e = family.resolution_error(s.image_size)
            assert r.parts["frechet"] >= 1 - e * math.sqrt(2) / task.d_max - 1e-9
        traj = s.target["trajectory"]
        for name, pts in {
            "shifted": [[x + 0.05, y - 0.05] for x, y in traj],
            "reversed": traj[::-1],
            "truncated": traj[: len(traj) // 2],
        }.items():
            answer = json.dumps(family.encode_points(pts, s.image_size))
            worse = task.reward("<think>x</think>", f"<answer>{answer}</answer>", s, family)
            assert worse.reason is None and worse.total < r.total, name


def test_synthetic_geometry():
    from vlm_grpo_ma.tasks._synthetic import COLOURS

    samples = TrajectoryTask().synthetic(30, seed=1)
    assert 5 < sum(s.meta["obstacle"] for s in samples) < 25
    for s in samples:
        traj = np.array(s.target["trajectory"])
        assert traj.shape == (10, 2) and (traj > 0).all() and (traj < 1).all()
        arr = np.asarray(s.images[0]).astype(int)
        start_colour = np.array(COLOURS[s.prompt["start"].split()[0]])
        goal_colour = np.array(COLOURS[s.prompt["goal"].split()[0]])
        (sx, sy), (gx, gy) = (traj[0] * 112).astype(int), (traj[-1] * 112).astype(int)
        assert (arr[sy, sx] == start_colour).all() and (arr[gy, gx] == goal_colour).all()
        if s.meta["obstacle"]:  # no path point on the grey block
            assert all((arr[int(y * 112), int(x * 112)] != [150, 150, 150]).any() for x, y in traj)
            assert (np.abs(arr - 150).sum(-1) == 0).any()
        else:  # a straight line: every point on the start-goal segment
            d = traj[-1] - traj[0]
            cross = np.abs(d[0] * (traj[:, 1] - traj[0, 1]) - d[1] * (traj[:, 0] - traj[0, 0])) / np.linalg.norm(d)
            assert cross.max() < 1 / 112


def test_synthetic_deterministic(tmp_path):
    task = TrajectoryTask()
    a, b = task.synthetic(5, seed=3), task.synthetic(5, seed=3)
    assert [x.target for x in a] == [x.target for x in b] and [x.meta for x in a] == [x.meta for x in b]
    assert all(x.images[0].tobytes() == y.images[0].tobytes() for x, y in zip(a, b))
    assert [x.target for x in task.synthetic(5, seed=4)] != [x.target for x in a]
    p = TrajectoryTask(cache_dir=tmp_path).synthetic(2, seed=3)
    assert all(isinstance(x.images[0], str) and x.image_sizes == [(112, 112)] for x in p)


def test_messages_prompt():
    task = TrajectoryTask(max_points=8)
    s = task.synthetic(1)[0]
    for family in FAMILIES.values():
        image, text = task.messages(s, family)[0]["content"]
        assert image["image"] is s.images[0]
        t = text["text"]
        assert s.prompt["start"] in t and s.prompt["goal"] in t and "at most 8 points" in t
        assert family.coord_hint(112, 112) in t and "[[x, y], ...]" in t and len(t) < 400


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------
_answers = st.one_of(
    st.text(max_size=100),
    st.builds(lambda v: json.dumps(v, allow_nan=True), st.recursive(
        st.one_of(st.floats(), st.integers(-(10**20), 10**20), st.text(max_size=5), st.none()),
        lambda inner: st.one_of(st.lists(inner, max_size=12), st.dictionaries(st.sampled_from(["point_2d", "x", "y"]), inner, max_size=3)),
        max_leaves=30,
    )),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_answers, st.sampled_from(sorted(FAMILIES)), st.integers(0, 40))
def test_fuzz_reward_never_raises(answer, fam, cut):
    s = sample([[0.1, 0.1], [0.5, 0.5], [0.9, 0.2]], size=(112, 112))
    text = f"<answer>{answer}</answer>"
    r = TrajectoryTask().reward("<think>t</think>", text[: len(text) - cut], s, FAMILIES[fam])
    assert 0.0 <= r.total <= 1.0 and list(r.parts) == ["format", "frechet"] and r.reason != "reward_error"
    if r.reason is not None:
        assert r.total == 0.0


def test_bad_data_raises_naming_the_sample():
    s = Sample(id="t3", task="trajectory", images=["x"], image_sizes=[(10, 10)], target={"path": [[0, 0], [1, 1]]})
    with pytest.raises(ValueError, match="'t3'.*'trajectory'"):
        TrajectoryTask().reward("<think>a</think>", "<answer>[[1, 2]]</answer>", s, QWEN2)
    with pytest.raises(ValueError, match="'t3'"):
        TrajectoryTask().metrics([None], [s])


def test_sample_metrics():
    s = sample([[0, 0], [1, 0]])
    assert TrajectoryTask().sample_metrics([[0, 0.5], [1, 0.5]], s) == pytest.approx({"dfd": 0.5, "hd": 0.5, "rmse": 0.5})
    assert TrajectoryTask().sample_metrics(None, s) == {"dfd": FAILED_DISTANCE, "hd": FAILED_DISTANCE, "rmse": FAILED_DISTANCE}


def test_prompt_template_override():
    """A suite's prompt_file replaces the template (the bench engine sets ``_template``)."""
    task = TrajectoryTask()
    s = task.synthetic(1)[0]
    task._template = "Go from {start} to {goal}. {coord_hint}"
    assert task.prompt_text(s, QWEN2) == f"Go from {s.prompt['start']} to {s.prompt['goal']}. {QWEN2.coord_hint(112, 112)}"
    task.set_prompt_template(None)
    assert task.prompt_text(s, QWEN2).startswith("Draw a path of at most 10 points")


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_object_scale_grows_the_markers_and_keeps_them_inside(scale):
    from vlm_grpo_ma.tasks._synthetic import COLOURS

    t = TrajectoryTask(object_scale=scale)
    counts = []
    for s in t.synthetic(12, seed=4):
        img = np.asarray(s.images[0].convert("RGB")).astype(int)
        h, w = img.shape[:2]
        start_colour = COLOURS[s.prompt["start"].split()[0]]
        mask = (np.abs(img - np.array(start_colour)).sum(-1) == 0)
        counts.append(int(mask.sum()))
        x, y = round(s.target["trajectory"][0][0] * w), round(s.target["trajectory"][0][1] * h)
        assert mask[y, x], "the start dot is drawn at the path's first point"
        r = max(2, round(0.04 * min(w, h) * scale))
        q = max(3, round(0.05 * min(w, h) * scale))
        for px, py in s.target["trajectory"][:: len(s.target["trajectory"]) - 1]:
            assert max(r, q) < px * w < w - max(r, q) and max(r, q) < py * h < h - max(r, q)
    expected = math.pi * max(2, round(0.04 * 112 * scale)) ** 2
    assert 0.6 * expected < np.mean(counts) < 1.4 * expected


def test_fixed_marker_colours_keep_the_layouts():
    from vlm_grpo_ma.tasks._synthetic import COLOURS

    rand, fixed = TrajectoryTask().synthetic(12, seed=5), TrajectoryTask(marker_colours="fixed").synthetic(12, seed=5)
    assert [s.target for s in rand] == [s.target for s in fixed]  # the same paths and blocks
    assert [s.meta["obstacle"] for s in rand] == [s.meta["obstacle"] for s in fixed]
    assert {s.prompt["start"] for s in fixed} == {"red dot"} and {s.prompt["goal"] for s in fixed} == {"blue square"}
    assert len({s.prompt["start"] for s in rand}) > 1
    for s in fixed:  # the markers are drawn in the named colours
        arr = np.asarray(s.images[0]).astype(int)
        (sx, sy), (gx, gy) = (np.array(s.target["trajectory"])[[0, -1]] * 112).astype(int)
        assert (arr[sy, sx] == COLOURS["red"]).all() and (arr[gy, gx] == COLOURS["blue"]).all()
    with pytest.raises(ValueError, match="marker_colours"):
        TrajectoryTask(marker_colours="green")
