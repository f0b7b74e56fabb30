"""The benchmark engine end to end: score == run on the same outputs, a resumed run equals an
uninterrupted one, the report's files exist and the page has its table, compare, the CLI, the
tiny model (greedy and best-of-K x M), data-parallel ranks, and a headless-Chromium look."""

from __future__ import annotations

import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_grpo_ma.bench.backends import BackendUnavailable, ReferenceBackend, load_backend
from vlm_grpo_ma.bench.compare import compare_table, format_markdown, load_result
from vlm_grpo_ma.bench.engine import make_task, read_predictions, run_suite, score_predictions
from vlm_grpo_ma.bench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]


class JitterBackend(ReferenceBackend):
    """The task's reference answers with every coordinate moved by up to +-``amount`` frame
    units, and one sample in five answered without an answer block: outputs of mixed quality,
    deterministic per sample id."""

    name = "jitter"

    def __init__(self, task, amount: int = 12):
        super().__init__(task)
        self.amount = amount
        self.calls = 0

    def complete(self, samples, messages_batch, gen, seed):
        self.calls += 1
        out = []
        for s in samples:
            rng = random.Random(s.id)
            if rng.random() < 0.2:
                out.append(["<think>I am not sure.</think>"] * gen.num_samples)
                continue
            ref = self.task.sft_target(s, self.family)
            txt = re.sub(r"(?<![\w])\d+", lambda m: str(max(0, int(m.group()) + rng.randint(-self.amount, self.amount))), ref)
            out.append([txt] * gen.num_samples)
        return out


def _suite(name="synthetic-detection", **kw):
    return load_suite(name, **kw)


# --- score == run, resume -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["synthetic-detection", "synthetic-affordance", "synthetic-trajectory"])
def test_score_equals_run(tmp_path, name):
    suite = _suite(name)
    run = run_suite(suite, "jitter", tmp_path / "run", backend_obj=JitterBackend(make_task(suite)), limit=10,
                    batch_size=3, report=False)
    assert run["n_samples"] == 10
    assert 0 < run["metrics"]["reward_mean"] < 1  # mixed quality, so the test can tell things apart
    scored = score_predictions(suite, tmp_path / "run" / "predictions.jsonl", tmp_path / "scored", limit=10, report=False)
    assert scored["metrics"] == run["metrics"]
    assert scored["parse_failures"] == run["parse_failures"]
    a = read_predictions(tmp_path / "run" / "predictions.jsonl")
    b = read_predictions(tmp_path / "scored" / "predictions.jsonl")
    assert a == b


def test_resumed_run_equals_uninterrupted(tmp_path):
    suite = _suite("synthetic-affordance")
    full = run_suite(suite, "jitter", tmp_path / "full", backend_obj=JitterBackend(make_task(suite)), limit=9,
                     batch_size=2, report=False)
    out = tmp_path / "resumed"
    be = JitterBackend(make_task(suite))
    assert run_suite(suite, "jitter", out, backend_obj=be, limit=9, batch_size=2, max_samples_this_run=4) is None
    assert len(read_predictions(out / "predictions.jsonl")) == 4
    # simulate a kill in the middle of writing a row
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"id": "affordance-synthetic-1000-4", "raw": "<thi')
    be2 = JitterBackend(make_task(suite))
    res = run_suite(suite, "jitter", out, backend_obj=be2, limit=9, batch_size=2, report=False)
    assert be2.calls == 3  # 5 samples left in batches of 2: nothing predicted twice
    assert res["metrics"] == full["metrics"]
    assert read_predictions(out / "predictions.jsonl") == read_predictions(tmp_path / "full" / "predictions.jsonl")
    # a complete run resumed again predicts nothing
    be3 = JitterBackend(make_task(suite))
    again = run_suite(suite, "jitter", out, backend_obj=be3, limit=9, report=False)
    assert be3.calls == 0 and again["metrics"] == full["metrics"]


def test_smaller_limit_keeps_earlier_predictions(tmp_path):
    suite = _suite("synthetic-affordance")
    run_suite(suite, "jitter", tmp_path, backend_obj=JitterBackend(make_task(suite)), limit=6, report=False)
    be = JitterBackend(make_task(suite))
    res = run_suite(suite, "jitter", tmp_path, backend_obj=be, limit=3, report=False)
    assert be.calls == 0 and res["n_samples"] == 3
    assert len(read_predictions(tmp_path / "predictions.jsonl")) == 6


def test_resume_refuses_another_model(tmp_path):
    suite = _suite("synthetic-affordance")
    run_suite(suite, "jitter", tmp_path, backend_obj=JitterBackend(make_task(suite)), limit=2, report=False)
    from vlm_grpo_ma.bench.engine import BenchError

    with pytest.raises(BenchError, match="another run"):
        run_suite(suite, "other-model", tmp_path, backend_obj=JitterBackend(make_task(suite)), limit=3, report=False)
    res = run_suite(suite, "other-model", tmp_path, backend_obj=JitterBackend(make_task(suite)), limit=3, fresh=True,
                    report=False)
    assert res["n_samples"] == 3


def test_reference_backend_scores_best(tmp_path):
    suite = _suite("synthetic-trajectory")
    res = run_suite(suite, "qwen2_5_vl", tmp_path, backend="reference", limit=6, report=False)
    m = res["metrics"]
    assert m["parse_rate"] == 1.0 and m["reward_mean"] == pytest.approx(1.0)
    assert m["dfd"] == pytest.approx(0.0, abs=1e-9)


# --- report -----------------------------------------------------------------------------------
class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.cells = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if tag == "table":
            self.tables.append(a.get("id"))

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


@pytest.mark.parametrize("name", ["synthetic-detection", "synthetic-affordance-points", "synthetic-trajectory"])
def test_report_files_exist_and_table(tmp_path, name):
    suite = _suite(name)
    res = run_suite(suite, "jitter", tmp_path, backend_obj=JitterBackend(make_task(suite)), limit=8, batch_size=4)
    page = tmp_path / "report.html"
    p = _Page()
    p.feed(page.read_text())
    assert "summary" in p.tables and "settings" in p.tables
    text = page.read_text()
    summary = text[text.index("<table id='summary'>"):]
    summary = summary[: summary.index("</table>")]
    shown = dict(re.findall(r"<td>([^<&]+?)(?: &darr;)?</td><td class='num'>([^<]+)</td>", summary))
    for k in suite.metrics:  # every key metric is in the summary table with its value
        assert shown[k] == f"{res['metrics'][k]:.4f}", k
    assert shown["n_samples"] == "8"
    assert len([s for s in p.imgs if "sample_" in s]) == 8  # the gallery shows every sample
    assert any("hist_" in s for s in p.imgs)
    for src in p.imgs:
        assert not os.path.isabs(src) and (tmp_path / src).is_file(), src
    # worst first: the gallery's ids follow ascending reward
    rows = {r["id"]: r for r in read_predictions(tmp_path / "predictions.jsonl")}
    ids = re.findall(r"<div class='id'>#\d+ &middot; ([^<]+)</div>", page.read_text())
    rewards = [rows[i]["metrics"]["reward"] for i in ids]
    assert rewards == sorted(rewards) and len(ids) == 8
    # the folder is self-contained: copied elsewhere, every image still resolves
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    for src in p.imgs:
        assert (copy / src).is_file()
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["suite"] == name and meta["model"] == "jitter"
    assert "torch" in meta["versions"] and "transformers" in meta["versions"]
    assert meta["generation"]["do_sample"] is False and meta["family"]["name"] == "qwen2_5_vl"


def test_report_draws_ground_truth_and_prediction(tmp_path):
    from vlm_grpo_ma.bench.draw import GT_COLOUR, PRED_COLOUR, draw_thumbnail, extract_geometry
    from PIL import Image

    img = Image.new("RGB", (100, 50), (0, 0, 0))
    g = extract_geometry([{"box": [0.1, 0.1, 0.4, 0.9], "label": "a"}], "detection")
    assert g.boxes == [[0.1, 0.1, 0.4, 0.9]] and g.labels == ["a"]
    assert extract_geometry([[0.1, 0.2], [0.3, 0.4]], "trajectory").trajectories == [[[0.1, 0.2], [0.3, 0.4]]]
    assert extract_geometry([[0.1, 0.2], [0.3, 0.4]], "affordance").points == [[0.1, 0.2], [0.3, 0.4]]
    assert extract_geometry("garbage {", "detection").empty()
    th = draw_thumbnail(img, {"boxes": [[0.1, 0.1, 0.4, 0.9]]}, [{"box": [0.6, 0.2, 0.9, 0.8]}], "detection", size=200)
    assert th.size == (200, 100)
    px = th.load()
    assert px[int(0.1 * 200), 50] == GT_COLOUR  # left edge of the ground-truth box
    assert px[int(0.9 * 200), 50] == PRED_COLOUR  # right edge of the predicted box


# --- compare and the CLI -----------------------------------------------------------------------
def test_compare_side_by_side(tmp_path):
    suite = _suite("synthetic-affordance")
    a = run_suite(suite, "jitter", tmp_path / "a", backend_obj=JitterBackend(make_task(suite), amount=3), limit=6, report=False)
    b = run_suite(suite, "jitter", tmp_path / "b", backend_obj=JitterBackend(make_task(suite), amount=30), limit=6, report=False)
    header, rows = compare_table([load_result(tmp_path / "a"), load_result(tmp_path / "b")])
    assert header == ["", "a", "b"]
    by = {r[0]: r[1:] for r in rows}
    assert by["mean_iou"] == [a["metrics"]["mean_iou"], b["metrics"]["mean_iou"]]
    assert by["mean_iou"][0] > by["mean_iou"][1]
    text = format_markdown(header, rows)
    assert text.splitlines()[0].startswith("|") and "mean_iou" in text


def test_cli_run_score_compare(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark as cli
    finally:
        sys.path.pop(0)
    assert cli.main(["run", "--suite", "synthetic-affordance", "--model", "qwen2_5_vl", "--backend", "reference",
                     "--limit", "3", "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "mean_iou" in out and "report.html" in out
    assert cli.main(["score", "--suite", "synthetic-affordance", "--predictions", str(tmp_path / "r" / "predictions.jsonl"),
                     "--output", str(tmp_path / "s"), "--limit", "3"]) == 0
    r = json.loads((tmp_path / "r" / "metrics.json").read_text())
    s = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert r["metrics"] == s["metrics"] and (tmp_path / "s" / "report.html").is_file()
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "r"), str(tmp_path / "s"), "--output", str(tmp_path / "c.md")]) == 0
    assert "| mean_iou" in capsys.readouterr().out and (tmp_path / "c.md").is_file()
    assert cli.main(["list"]) == 0
    assert "where2place" in capsys.readouterr().out


def test_vllm_backend_absent_is_a_clear_error():
    try:
        import vlm_grpo_ma.rollout.vllm  # noqa: F401
        import vllm  # noqa: F401
    except Exception:
        with pytest.raises(BackendUnavailable, match="--backend hf"):
            load_backend("vllm", "tiny-qwen2.5-vl")
    else:  # pragma: no cover - a machine with vLLM
        pytest.skip("vLLM is installed here")


# --- the tiny model -------------------------------------------------------------------------
def test_tiny_model_greedy_run_is_deterministic_and_resumes(tmp_path):
    suite = _suite("synthetic-affordance", generation={"max_new_tokens": 12})
    be = load_backend("hf", "tiny-qwen2.5-vl")
    full = run_suite(suite, "tiny-qwen2.5-vl", tmp_path / "a", backend_obj=be, limit=4, batch_size=2)
    rows = read_predictions(tmp_path / "a" / "predictions.jsonl")
    assert len(rows) == 4 and all(isinstance(r["raw"], str) for r in rows)
    assert "<|image_pad|>" not in "".join(r["raw"] for r in rows)
    assert full["family"]["name"] == "qwen2_5_vl" and full["backend"] == "hf"
    # interrupted after 2 samples, then resumed with a batch size of 1: greedy decoding is exact
    assert run_suite(suite, "tiny-qwen2.5-vl", tmp_path / "b", backend_obj=be, limit=4, batch_size=2,
                     max_samples_this_run=2) is None
    res = run_suite(suite, "tiny-qwen2.5-vl", tmp_path / "b", backend_obj=be, limit=4, batch_size=1, report=False)
    assert read_predictions(tmp_path / "b" / "predictions.jsonl") == rows
    assert res["metrics"] == full["metrics"]


def test_tiny_model_best_of_k_x_m(tmp_path):
    suite = _suite("synthetic-detection", generation={"max_new_tokens": 8, "do_sample": True, "num_thoughts": 2,
                                                      "num_answers": 2})
    res = run_suite(suite, "tiny-qwen2.5-vl", tmp_path, limit=2, batch_size=2, report=False)
    rows = read_predictions(tmp_path / "predictions.jsonl")
    assert all(len(r["completions"]) == 4 for r in rows)
    for r in rows:
        assert r["metrics"]["reward_best_of_n"] >= r["metrics"]["reward_mean_of_n"] >= 0
    assert "reward_best_of_n_mean" in res["metrics"]


# --- data parallel ----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    """torchrun with 2 CPU ranks (gloo): shards merged in suite order equal a one-process run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "benchmark.py"), "run", "--suite", "synthetic-trajectory", "--model", "qwen2_5_vl",
           "--backend", "reference", "--limit", "5", "--batch-size", "2", "--output", str(tmp_path / "dp"), "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list((tmp_path / "dp").glob("predictions.rank*"))
    one = run_suite(_suite("synthetic-trajectory"), "qwen2_5_vl", tmp_path / "one", backend="reference", limit=5,
                    report=False)
    dp = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    assert dp["metrics"] == one["metrics"] and dp["world_size"] == 2
    assert read_predictions(tmp_path / "dp" / "predictions.jsonl") == read_predictions(tmp_path / "one" / "predictions.jsonl")


# --- a person's look: headless Chromium -------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium installed")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    suite = _suite("synthetic-detection")
    run_suite(suite, "jitter", tmp_path / "out", backend_obj=JitterBackend(make_task(suite)), limit=6)
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1200,3000", f"--screenshot={shot}",
           (tmp_path / "out" / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file()
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 3000)
    # rendered images (thumbnails, histograms) put many distinct colours on the page, far more
    # than a page of text and tables alone
    colours = im.resize((300, 750)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 500
