"""Parity of the benchmark's metrics with the field's official evaluators.

Each official evaluator's logic is re-expressed here, in the tests, following its published
code line by line (repository and file named at each one), and compared with the project's
metric on randomized and adversarial predictions: the numbers must be exactly equal.  Fixtures
are in each benchmark's own format (tests/fixtures/bench/)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from vlm_grpo_ma.bench.formats import load_format
from vlm_grpo_ma.tasks.vqa import VQA_CONTRACTIONS, VQATask

FIX = Path(__file__).parent / "fixtures" / "bench"


# =============================================================================================
# VQAv2: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master, a013f00,
# "Fixed processing answers bug", 2021)
# =============================================================================================
class OfficialVQAEval:
    """``VQAEval.evaluate`` on in-memory ``{question_id: annotation}`` and ``{question_id:
    answer}``; returns (overall, perQuestionType, perAnswerType, evalQA) UNROUNDED (the script
    rounds ``100 * x`` to 2 decimals)."""

    manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    articles = ["a", "an", "the"]
    periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    commaStrip = re.compile(r"(\d)(\,)(\d)")
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
    contractions = VQA_CONTRACTIONS  # the table (data) is shared; spot-checked below

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        outText = self.periodStrip.sub("", outText, re.UNICODE)
        return outText

    def processDigitArticle(self, inText):
        outText = []
        for word in inText.lower().split():
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return " ".join(outText)

    def evaluate(self, gts, res):
        accQA, accQuesType, accAnsType, evalQA = [], {}, {}, {}
        for quesId in gts:
            answers = [dict(a) for a in gts[quesId]["answers"]]
            for ansDic in answers:
                ansDic["answer"] = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
            resAns = res[quesId].replace("\n", " ").replace("\t", " ").strip()
            if len(set(a["answer"] for a in answers)) > 1:
                for ansDic in answers:
                    ansDic["answer"] = self.processDigitArticle(self.processPunctuation(ansDic["answer"]))
                resAns = self.processDigitArticle(self.processPunctuation(resAns))
            gtAcc = []
            for gtAnsDatum in answers:
                otherGTAns = [item for item in answers if item != gtAnsDatum]
                matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
                gtAcc.append(min(1, float(len(matchingAns)) / 3))
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
            accQA.append(avgGTAcc)
            accQuesType.setdefault(gts[quesId]["question_type"], []).append(avgGTAcc)
            accAnsType.setdefault(gts[quesId]["answer_type"], []).append(avgGTAcc)
            evalQA[quesId] = avgGTAcc
        mean = lambda v: float(sum(v)) / len(v)  # noqa: E731
        return (mean(accQA), {k: mean(v) for k, v in accQuesType.items()},
                {k: mean(v) for k, v in accAnsType.items()}, evalQA)


def test_vqa_contraction_table_spot_checks():
    assert VQA_CONTRACTIONS["dont"] == "don't" and VQA_CONTRACTIONS["whats"] == "what's"
    assert VQA_CONTRACTIONS["somebody'd"] == "somebodyd" and len(VQA_CONTRACTIONS) == 120  # as in the official table


_VQA_WORDS = ["2", "two", "Two", "3", "three", "eleven", "11", "ten", "10", "none", "0", "yes", "Yes", "Yes.", "no",
              "NO!", "red", "Red", "red-blue", "red blue", "1,000", "1000", "50%", "50", "$5", "5", "3.50", "3.5",
              "it's", "its", "dont", "don't", "a", "the", "an", "A", "U.S.A.", "stop", "dark", "maroon", "t-shirt",
              "(red)", "red?", "red ,", "well:", "x/y", "...", "", " ", "\t", "\n", "whats", "cant"]


def _random_answer(rng: random.Random) -> str:
    words = [rng.choice(_VQA_WORDS) for _ in range(rng.randint(1, 3))]
    sep = rng.choice([" ", "  ", "", "\n", "-", ","])
    return sep.join(words)


def _vqav2_fixture():
    import json

    d = FIX / "vqav2"
    anns = json.loads((d / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    samples = load_format("vqav2", d / "v2_mscoco_val2014_annotations.json", image_root=str(d / "images"))
    return {a["question_id"]: a for a in anns}, samples


def _compare_vqa(gts, samples, preds):
    official = OfficialVQAEval().evaluate(gts, {qid: p for qid, p in zip(gts, preds)})
    task = VQATask()
    ours = task.metrics(preds, samples)
    assert ours["accuracy"] == official[0]
    for qt, v in official[1].items():
        assert ours[f"accuracy/question_type/{qt}"] == v
    for at, v in official[2].items():
        assert ours[f"accuracy/{at}"] == v
    for (qid, v), p, s in zip(official[3].items(), preds, samples):
        assert task.metric_score(p, s) == v, (p, s.target["answers"])
    assert round(100 * ours["accuracy"], 2) == round(100 * official[0], 2)


def test_vqa_loader_reads_the_official_files():
    gts, samples = _vqav2_fixture()
    assert [s.id for s in samples] == [f"vqav2-{q}" for q in gts]
    s = samples[2]
    assert s.target["answers"][0] == "1,000 red-blue" and s.target["answer_type"] == "other"
    assert s.target["question_type"] == "what does the" and s.image_sizes == [(32, 24)]
    assert s.prompt["question"] == "What does the sign say?"


def test_vqa_adversarial_cases_match_official():
    gts, samples = _vqav2_fixture()
    cases = [
        ["two", "Yes.", "1,000 red-blue", "red"],
        ["2", "yes", "1000 red blue", "dark red"],  # "yes" vs 10 x "Yes." (not normalised): 0
        ["eleven", "Yes", "its", "Red."],
        ["3", "yes.", "it's", "maroon"],
        ["  3 \n", "Yes", "50%", "the red"],
        ["three", "YES", "stop!", "a red"],
    ]
    for preds in cases:
        _compare_vqa(gts, samples, preds)
    # hand values of the official script on the first row
    task = VQATask()
    # "two" -> "2", and the reference "two" -> "2" too: 4 matches
    assert task.metric_score("two", samples[0]) == 1.0
    # ten identical references: nothing is normalised, on either side
    assert task.metric_score("Yes.", samples[1]) == 1.0
    assert task.metric_score("yes", samples[1]) == 0.0
    # "1,000 red-blue" -> "1000 redblue" (a comma between digits deletes every mark), and so
    # does the reference written that way: one match; "1000 red blue" matches two references
    assert task.metric_score("1,000 red-blue", samples[2]) == pytest.approx(0.3)
    assert task.metric_score("1000 red blue", samples[2]) == pytest.approx(0.6)


def test_vqa_randomized_predictions_match_official():
    gts, samples = _vqav2_fixture()
    rng = random.Random(0)
    for _ in range(300):
        _compare_vqa(gts, samples, [_random_answer(rng) for _ in samples])


def test_vqa_randomized_references_match_official():
    """Random references (mixed and identical sets) against random predictions."""
    rng = random.Random(1)
    task = VQATask()
    official = OfficialVQAEval()
    from vlm_grpo_ma.data.sample import Sample

    for i in range(400):
        refs = [_random_answer(rng) for _ in range(10)] if i % 3 else [_random_answer(rng)] * 10
        pred = rng.choice(refs + [_random_answer(rng)])
        if i % 5 == 0:
            pred = pred.upper()
        gts = {1: {"question_type": "q", "answer_type": "other",
                   "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j} for j, a in enumerate(refs)]}}
        s = Sample(id="x", task="vqa", prompt={"question": "?"}, target={"answers": refs})
        assert task.metric_score(pred, s) == official.evaluate(gts, {1: pred})[0], (pred, refs)


# =============================================================================================
# Trajectory: FlagEvalMM tasks/trajectory/evaluate.py (the evaluator RoboBrain 2.0 names)
# =============================================================================================
def official_trajectory_metrics(pairs):
    """``calculate_metrics`` of FlagEvalMM on [(pred points, gt points)] already in [0, 1]:
    memoised recursive DFD over ``cdist``, HD from ``directed_hausdorff`` both ways, RMSE over
    the first min(len) index-matched points; a prediction without points is [(0, 0)]."""
    from scipy.spatial.distance import cdist, directed_hausdorff

    def dfd(P, Q):
        ca = np.full((len(P), len(Q)), -1.0)
        d = cdist(P, Q, "euclidean")

        def c(i, j):
            if ca[i, j] > -1.0:
                return ca[i, j]
            if i == 0 and j == 0:
                ca[i, j] = d[0, 0]
            elif i == 0:
                ca[i, j] = max(c(0, j - 1), d[i, j])
            elif j == 0:
                ca[i, j] = max(c(i - 1, 0), d[i, j])
            else:
                ca[i, j] = max(min(c(i - 1, j), c(i - 1, j - 1), c(i, j - 1)), d[i, j])
            return ca[i, j]

        return c(len(P) - 1, len(Q) - 1)

    def rmse(P, Q):
        n = min(len(P), len(Q))
        return np.sqrt(np.mean([np.sum((np.array(P[i]) - np.array(Q[i])) ** 2) for i in range(n)]))

    out = {"dfd": [], "hd": [], "rmse": []}
    for pred, gt in pairs:
        pred = pred or [(0, 0)]
        P, Q = np.array(pred), np.array(gt)
        out["dfd"].append(dfd(P, Q))
        out["hd"].append(max(directed_hausdorff(P, Q)[0], directed_hausdorff(Q, P)[0]))
        out["rmse"].append(rmse(pred, gt))
    return {k: float(np.mean(v)) for k, v in out.items()}


def _sharerobot_trajectories():
    d = FIX / "sharerobot"
    return load_format("sharerobot_trajectory", d / "trajectory_test.json", image_root=str(d / "images"))


def _compare_trajectory(samples, preds):
    from vlm_grpo_ma.tasks.trajectory import TrajectoryTask

    ours = TrajectoryTask().metrics(preds, samples)
    official = official_trajectory_metrics([(p, s.target["trajectory"]) for p, s in zip(preds, samples)])
    for k in ("dfd", "hd", "rmse"):
        assert ours[k] == pytest.approx(official[k], rel=1e-12, abs=1e-15), k


def test_trajectory_adversarial_paths_match_official():
    samples = _sharerobot_trajectories()
    gts = [s.target["trajectory"] for s in samples]
    cases = [
        [g + [[1.0, 0.0], [0.0, 1.0]] for g in gts],  # the ground truth plus two far points
        [g[::-1] for g in gts],  # backwards: HD 0, DFD large
        [[g[0]] for g in gts],  # one point
        [[p for p in g for _ in range(7)] for g in gts],  # every point repeated: 21-28 points
        [[[0.5, 0.5]] * 15 for _ in gts],
    ]
    for preds in cases:
        _compare_trajectory(samples, preds)
    # the case: 10 ground-truth points plus two far ones scores DFD > 0 now
    from vlm_grpo_ma.data.sample import Sample
    from vlm_grpo_ma.tasks.trajectory import TrajectoryTask

    gt = [[0.1 * i, 0.05 * i] for i in range(10)]
    s = Sample(id="t", task="trajectory", images=["x"], image_sizes=[(64, 48)], target={"trajectory": gt})
    pred = gt + [[1.0, 1.0], [0.0, 1.0]]
    assert TrajectoryTask().sample_metrics(pred, s)["dfd"] == pytest.approx(official_trajectory_metrics([(pred, gt)])["dfd"])
    assert TrajectoryTask().sample_metrics(pred, s)["dfd"] > 0.5


def test_trajectory_randomized_paths_match_official():
    samples = _sharerobot_trajectories()
    rng = np.random.default_rng(0)
    for _ in range(60):
        preds = [rng.uniform(0, 1, (int(rng.integers(1, 25)), 2)).tolist() for _ in samples]
        _compare_trajectory(samples, preds)


# =============================================================================================
# Points in a mask: RoboPoint robopoint/eval/summarize_vqa.py (= FlagEvalMM
# tasks/where2place/evaluate.py), Embodied-R1 eval/hf_inference_where2place.py and
# eval/hf_inference_roborefit.py
# =============================================================================================
def official_robopoint_accuracy(texts, mask_files, width, height):
    """summarize_vqa.py: points parsed from "(x, y)" text, floats scaled by ``int(x * width)``;
    the JPEG mask read as grey / 255; a point outside the image scores 0; mean per question then
    over questions."""
    from PIL import Image

    accuracy = []
    for text, mask_file in zip(texts, mask_files):
        pattern = r"\(([-+]?\d+\.?\d*(?:,\s*[-+]?\d+\.?\d*)*?)\)"
        points = []
        for match in re.findall(pattern, text):
            vector = [float(num) if "." in num else int(num) for num in match.split(",")]
            if len(vector) == 2:
                x, y = vector
                if isinstance(x, float) or isinstance(y, float):
                    x, y = int(x * width), int(y * height)
                points.append((x, y))
        points = np.array(points)
        mask = np.array(Image.open(mask_file)) / 255.0
        acc = 0
        if len(points) > 0:
            in_range = (points[:, 0] >= 0) & (points[:, 0] < mask.shape[1]) & (points[:, 1] >= 0) & (points[:, 1] < mask.shape[0])
            acc = np.concatenate([mask[points[in_range, 1], points[in_range, 0]], np.zeros(points.shape[0] - in_range.sum())]).mean()
        accuracy.append(acc)
    return float(np.mean(accuracy))


def official_embodied_r1_weighted(point_lists, mask_files):
    """hf_inference_where2place.py: ``int(x * width)`` for x <= 1, the mask converted to L and
    > 0; points in mask over all points of all samples."""
    from PIL import Image

    total, inside = 0, 0
    for points, mask_file in zip(point_lists, mask_files):
        if not points:
            continue
        mask_image = Image.open(mask_file)
        width, height = mask_image.size
        arr = np.array(mask_image.convert("L"))
        for x, y in points:
            xp = int(x * width) if x <= 1 else int(x)
            yp = int(y * height) if y <= 1 else int(y)
            if 0 <= xp < width and 0 <= yp < height and arr[yp, xp] > 0:
                inside += 1
        total += len(points)
    return inside / total if total > 0 else 0


def official_embodied_r1_box(point_lists, boxes):
    """hf_inference_roborefit.py: ``x1 <= x <= x2 and y1 <= y <= y2``; per-sample mean (0 without
    points) and points-weighted."""
    scores, total, inside = [], 0, 0
    for points, (x1, y1, x2, y2) in zip(point_lists, boxes):
        k = sum(1 for x, y in points if x1 <= x <= x2 and y1 <= y <= y2) if points else 0
        scores.append(k / len(points) if points else 0)
        total += len(points or [])
        inside += k
    return sum(scores) / len(scores), (inside / total if total else 0)


def _fmt(v: float) -> str:
    r = repr(float(v))
    return "0.0" if "e" in r else r


def _random_points(rng, n_max=14, lo=-0.06, hi=1.0):
    edge = [0.0, 1.0, -0.01, 0.999, 0.5]
    pts = []
    for _ in range(int(rng.integers(1, n_max))):
        x = float(rng.choice(edge)) if rng.random() < 0.2 else float(rng.uniform(lo, hi))
        y = float(rng.choice(edge)) if rng.random() < 0.2 else float(rng.uniform(lo, hi))
        pts.append([x, y])
    return pts


def test_where2place_masks_match_robopoint_and_embodied_r1():
    from vlm_grpo_ma.tasks.affordance import AffordanceTask

    d = FIX / "where2place"
    samples = load_format("where2place", d)
    task = AffordanceTask(mode="points")
    masks = [s.meta["mask"] for s in samples]
    (w, h), = {s.image_size for s in samples}
    rng = np.random.default_rng(0)
    cases = [
        [[[0.1, 0.1]] * 10 + [[0.9, 0.9]] * 2, [[0.75, 0.75]] * 10 + [[0.1, 0.1]] * 2],  # 10 in + 2 out
        [[[1.0, 0.2], [-0.001, 0.2]], [[1.0, 1.0], [0.999, 0.999]]],  # edges: x = 1, slightly negative
        [[[0.49, 0.49], [0.5, 0.5], [0.51, 0.51]], [[0.5, 0.5], [0.49, 0.49]]],  # JPEG-blurred mask edge
    ] + [[_random_points(rng) for _ in samples] for _ in range(150)]
    for preds in cases:
        texts = ["[" + ", ".join(f"({_fmt(x)}, {_fmt(y)})" for x, y in p) + "]" for p in preds]
        ours = task.metrics(preds, samples)
        assert ours["accuracy"] == official_robopoint_accuracy(texts, masks, w, h)
        assert ours["accuracy_points_weighted"] == official_embodied_r1_weighted(preds, masks)
    m = task.metrics(cases[0], samples)
    assert m["accuracy"] == pytest.approx(10 / 12, abs=0.02)  # not 1.0: all 12 points count


def test_roborefit_box_variant_matches_embodied_r1():
    from vlm_grpo_ma.tasks.affordance import AffordanceTask

    d = FIX / "roborefit"
    samples = load_format("roborefit", d / "roborefit_testA.json")
    task = AffordanceTask(mode="points")
    boxes = [s.target["box"] for s in samples]
    rng = np.random.default_rng(1)
    cases = [[[b[:2], b[2:], [b[0], b[3] + 1e-9]] for b in boxes]]  # corners: inclusive edges
    cases += [[_random_points(rng, lo=-0.1, hi=1.1) for _ in samples] for _ in range(150)]
    for preds in cases:
        ours = task.metrics(preds, samples)
        per_sample, weighted = official_embodied_r1_box(preds, boxes)
        assert ours["box_accuracy"] == pytest.approx(per_sample, abs=1e-15)
        assert ours["box_accuracy_points_weighted"] == weighted


# =============================================================================================
# Boxes: FlagEvalMM tasks/affordance/evaluate.py (ShareRobot affordance)
# =============================================================================================
def official_affordance_metrics(pairs, thresholds=(0.5, 0.75, 0.9)):
    def calculate_iou(box1, box2):
        x1_1, y1_1, x2_1, y2_1 = box1
        x1_2, y1_2, x2_2, y2_2 = box2
        x_left, y_top = max(x1_1, x1_2), max(y1_1, y1_2)
        x_right, y_bottom = min(x2_1, x2_2), min(y2_1, y2_2)
        if x_right < x_left or y_bottom < y_top:
            return 0.0
        intersection = (x_right - x_left) * (y_bottom - y_top)
        union = (x2_1 - x1_1) * (y2_1 - y1_1) + (x2_2 - x1_2) * (y2_2 - y1_2) - intersection
        return intersection / union

    ious = [calculate_iou(p, g) for p, g in pairs]
    return {"mean_iou": sum(ious) / len(ious),
            **{f"iou>={t}": sum(i >= t for i in ious) / len(ious) for t in thresholds}}


def test_affordance_boxes_match_flagevalmm():
    from vlm_grpo_ma.models.family import ModelFamily
    from vlm_grpo_ma.tasks.affordance import AffordanceTask

    d = FIX / "sharerobot"
    samples = load_format("sharerobot_affordance", d / "affordance_test.json", image_root=str(d / "images"))
    task = AffordanceTask()
    fam = ModelFamily.from_model_type("qwen2_vl")
    rng = np.random.default_rng(2)
    n_inverted = 0
    for k in range(400):
        preds = []
        for s in samples:
            g = s.target["box"]
            if k % 4 == 0:  # the ground truth with its corners swapped (IoU 1.0 if forgiven)
                b = [g[2], g[3], g[0], g[1]]
            elif k % 4 == 1:  # about half the box: IoU near the 0.5 threshold
                b = [g[0], g[1], (g[0] + g[2]) / 2, g[3]]
            else:
                b = sorted(rng.uniform(0, 1, 2).tolist()) + sorted(rng.uniform(0, 1, 2).tolist())
                b = [b[0], b[2], b[1], b[3]]
                if rng.random() < 0.3:
                    b = [b[2], b[1], b[0], b[3]]
            # through the parser, as a model writes it (Qwen2-VL's 0..1000 integers)
            text = "[" + ", ".join(str(round(v * 1000)) for v in b) + "]"
            n_inverted += b[0] > b[2] or b[1] > b[3]
            preds.append(task.parse(text, s, fam))
        ours = task.metrics(preds, samples)
        official = official_affordance_metrics([(p, s.target["box"]) for p, s in zip(preds, samples)])
        for key, v in official.items():
            assert ours[key] == pytest.approx(v, abs=1e-12), (key, preds)
    assert n_inverted > 100
    # IoU exactly 0.5 is a hit (>=, as FlagEvalMM and this suite's thresholds)
    from vlm_grpo_ma.data.sample import Sample

    half = Sample(id="h", task="affordance", images=["x"], image_sizes=[(100, 100)], target={"box": [0.0, 0.0, 0.5, 1.0]})
    assert task.metrics([[0.0, 0.0, 0.25, 1.0]], [half])["iou>=0.5"] == 1.0


# =============================================================================================
# Code: huggingface/open-r1 src/open_r1/rewards.py (extract_code) and openai/human-eval
# human_eval/evaluation.py (estimate_pass_at_k)
# =============================================================================================
def official_open_r1_extract_code(completion: str, language: str = "python") -> str:
    matches = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).findall(completion)
    return matches[-1] if len(matches) >= 1 else ""


def official_estimate_pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def test_code_block_selection_matches_open_r1():
    from vlm_grpo_ma.tasks.code import extract_code

    pieces = ["```python\ndef f(x):\n    return x\n```", "```python\ndef f(x):\n    return 2 * x\n```",
              "some text\n", "```cpp\nint f(int x);\n```", "```python\nunterminated = 1\n", "x = 3\n", "\n"]
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
        official = official_open_r1_extract_code(text)
        # where open-r1 finds a python block we run the same code; where it finds none, we run
        # nothing either (these pieces hold no untagged or py-tagged fence)
        assert extract_code(text) == official.strip("\n"), text


def test_pass_at_k_matches_human_eval():
    from vlm_grpo_ma.tasks.code import CodeTask, estimate_pass_at_k

    for n in range(1, 40):
        for c in range(0, n + 1):
            for k in (1, 2, 5, 10, n):
                if k <= n:
                    assert estimate_pass_at_k(n, c, k) == pytest.approx(official_estimate_pass_at_k(n, c, k), abs=1e-12)
    assert estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert estimate_pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    # human-eval reports a k only when every problem has n >= k
    assert CodeTask().pass_at_k_metrics([10, 10], [3, 0]) == {"pass@1": pytest.approx(0.15), "pass@10": 0.5}
    assert CodeTask().pass_at_k_metrics([4, 10], [1, 0]) == {"pass@1": pytest.approx(0.125)}


def test_benchmark_reports_pass_at_k_over_drawn_completions(tmp_path):
    """Scoring several completions per problem gives human-eval's unbiased pass@k."""
    import json

    from vlm_grpo_ma.bench import load_suite
    from vlm_grpo_ma.bench.engine import make_task, score_predictions

    suite = load_suite("synthetic-code", limit=2)
    samples = make_task(suite).synthetic(2, seed=1000)
    think = "<think>plan</think>"
    good = [f"{think}<answer>```python\n{s.target['solution']}\n```</answer>" for s in samples]
    bad = f"{think}<answer>```python\nraise SystemExit(1)\n```</answer>"
    rows = [{"id": samples[0].id, "completions": [bad, good[0], good[0], bad]},  # c = 2 of 4
            {"id": samples[1].id, "completions": [good[1], bad, bad, bad]}]  # c = 1 of 4
    path = tmp_path / "outputs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = score_predictions(suite, path, tmp_path / "scored", family="qwen2_vl", report=False)["metrics"]
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@1_first_completion"] == 0.5  # the first completion: bad, good
    assert "pass@10" not in m


# =============================================================================================
# RefCOCO Acc@0.5: VLM-R1 src/eval/test_rec_r1.py
# =============================================================================================
def official_vlm_r1_correct(model_answer, ground_truth) -> int:
    def iou(box1, box2):
        inter_x1 = max(box1[0], box2[0])
        inter_y1 = max(box1[1], box2[1])
        inter_x2 = min(box1[2] - 1, box2[2] - 1)
        inter_y2 = min(box1[3] - 1, box2[3] - 1)
        if inter_x1 < inter_x2 and inter_y1 < inter_y2:
            inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
        else:
            inter = 0
        union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
        return float(inter) / union

    try:
        return int(iou(model_answer, ground_truth) > 0.5)
    except ZeroDivisionError:  # the original would crash; counted as a miss here
        return 0


def test_refcoco_acc_at_05_matches_vlm_r1():
    from vlm_grpo_ma.models.family import ModelFamily
    from vlm_grpo_ma.tasks.detection import DetectionTask

    d = FIX / "refcoco"
    samples = load_format("refcoco", d / "refcoco_val.jsonl", image_root=str(d / "images"))
    # the model writes Qwen2-VL's 0..1000 integers; VLM-R1's script receives the same box in
    # pixels of the original image (value / 1000 * size), against the pixel ground truth
    fam = ModelFamily.from_model_type("qwen2_vl")
    task = DetectionTask()
    rng = random.Random(4)
    hits = {0: 0, 1: 0}
    for k in range(300):
        preds, expected = [], []
        for s in samples:
            w, h = s.image_size
            size = (w, h, w, h)
            gt_px = [v * m for v, m in zip(s.target["box"], size)]
            if k % 3 == 0:  # the ground truth shifted: IoU around 0.5
                dx = rng.randint(-200, 200)
                box = [round(v * 1000) + dx * (i % 2 == 0) for i, v in enumerate(s.target["box"])]
            else:  # random, often inverted
                box = [rng.randint(0, 1000) for _ in range(4)]
            preds.append(task.parse(json_dumps([{"bbox_2d": box, "label": "x"}]), s, fam))
            expected.append(official_vlm_r1_correct([v / 1000 * m for v, m in zip(box, size)], gt_px))
            hits[expected[-1]] += 1
        ours = [task.sample_metrics(p, s)["acc@0.5"] for p, s in zip(preds, samples)]
        assert ours == expected, (preds, expected)
    assert hits[0] > 50 and hits[1] > 20
    # exactly IoU 0.5 is a miss (VLM-R1 counts > 0.5): the left half of a 40 x 40 box
    s = samples[0]
    assert [v * m for v, m in zip(s.target["box"], (100, 80, 100, 80))] == [10, 20, 50, 60]
    half = [{"box": [0.1, 0.25, 0.3, 0.75], "label": None}]
    assert official_vlm_r1_correct([10, 20, 30, 60], [10, 20, 50, 60]) == 0
    assert task.sample_metrics(half, s)["acc@0.5"] == 0.0


def json_dumps(value) -> str:
    import json

    return json.dumps(value)


def test_coco_ap_scores_boxes_as_written():
    """A box written with inverted corners reaches pycocotools as written (negative width or
    height) and matches nothing; the same box written in order is a perfect detection."""
    from vlm_grpo_ma.data.sample import Sample
    from vlm_grpo_ma.models.family import ModelFamily
    from vlm_grpo_ma.tasks.detection import DetectionTask

    fam = ModelFamily.from_model_type("qwen2_vl")
    s = Sample(id="c", task="detection", images=["x"], image_sizes=[(100, 100)],
               target={"boxes": [[0.2, 0.2, 0.6, 0.6]], "labels": ["cube"]})
    task = DetectionTask()
    for text, ap in [('[{"bbox_2d": [200, 200, 600, 600], "label": "cube"}]', 1.0),
                     ('[{"bbox_2d": [600, 600, 200, 200], "label": "cube"}]', 0.0),
                     ('[{"bbox_2d": [600, 200, 200, 600], "label": "cube"}]', 0.0)]:
        pred = task.parse(text, s, fam)
        assert task.metrics([pred], [s])["AP50"] == pytest.approx(ap), text
