"""Seed statistics of the learning benchmarks (vlm_grpo_ma.bench.stats), checked by hand."""

import json
import math

import pytest

from vlm_grpo_ma.bench.stats import (
    NO_DIFFERENCE,
    detectable_effect,
    mean_std,
    paired_differences,
    seeds_needed,
    summarize,
    t_interval,
    t_test_power,
    verdict,
)


def test_mean_std_uses_n_minus_one():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    # (0.1, 0.3): mean 0.2, deviations +-0.1, variance 0.02 / 1
    assert mean_std([0.1, 0.3]) == pytest.approx((0.2, math.sqrt(0.02)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_std([1.0, float("nan")])


def test_t_interval_by_hand():
    # t_{2, 0.975} = 4.302653 (table); half width 4.302653 * 1 / sqrt(3) = 2.484138
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    # 90%: t_{2, 0.95} = 2.919986 -> half width 1.685850
    assert t_interval([1.0, 2.0, 3.0], 0.9) == pytest.approx((2 - 1.685850, 2 + 1.685850), abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_paired_differences_need_one_value_per_seed_each():
    assert paired_differences([0.3, 0.5], [0.1, 0.6]) == pytest.approx([0.2, -0.1])
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_differences([0.3], [0.1, 0.2])


def test_budget_estimates_match_the_published_t_test_sample_size():
    # the paired (one-sample) t-test, two-sided alpha 0.05, power 0.8, effect 0.5 std needs 34
    # pairs (the textbook / G*Power figure); the normal approximation would say 32
    assert seeds_needed(std=1.0, effect=0.5) == 34
    assert t_test_power(0.5, 34) >= 0.8 > t_test_power(0.5, 33)
    # a difference of 10 std: 2 seeds (t with 1 degree of freedom, critical value 12.71) are not
    # enough for power 0.8, 3 are
    assert seeds_needed(std=0.01, effect=-0.1) == 3
    assert seeds_needed(std=1.0, effect=0.0) == math.inf
    assert seeds_needed(std=0.0, effect=0.1) == 2
    assert detectable_effect(std=1.0, n=1) == math.inf


def test_detectable_effect_has_the_stated_power_by_simulation():
    """Independent of the noncentral-t formula: simulate the t-test on 3 and 4 seeds at the
    effect called detectable and count rejections (power 0.8 +- 3 standard errors)."""
    import numpy as np
    from scipy import stats as st

    rng = np.random.default_rng(0)
    trials = 20_000
    for n in (3, 4):
        delta = detectable_effect(std=2.0, n=n)
        x = rng.normal(delta, 2.0, size=(trials, n))
        t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(n))
        power = float((np.abs(t) > st.t.ppf(0.975, n - 1)).mean())
        assert abs(power - 0.8) < 3 * np.sqrt(0.8 * 0.2 / trials), (n, delta, power)
    # far above the normal approximation at 3 seeds: (1.959964 + 0.841621) / sqrt(3) = 1.6175 std
    assert detectable_effect(std=1.0, n=3) > 3.0


def test_verdict():
    assert verdict(0.01, 0.05, "RL", "SFT") == "RL > SFT"
    assert verdict(-0.05, -0.01, "T4A4", "T16A1") == "T4A4 < T16A1"
    assert verdict(-0.01, 0.02) == NO_DIFFERENCE
    assert verdict(float("nan"), float("nan")) == NO_DIFFERENCE


def test_summarize_reports_no_difference_when_the_interval_holds_zero():
    s = summarize([0.01, -0.02, 0.015], "T4A4", "T16A1")
    assert s.n == 3 and s.lo < 0 < s.hi
    assert s.verdict == NO_DIFFERENCE
    assert s.seeds_to_detect > 3
    clear = summarize([0.05, 0.06, 0.07], "RL", "SFT")
    # mean 0.06, std 0.01, half width 4.302653 * 0.01 / sqrt(3) = 0.024841
    assert (clear.lo, clear.hi) == pytest.approx((0.06 - 0.024841, 0.06 + 0.024841), abs=1e-5)
    assert clear.verdict == "RL > SFT"
    assert set(clear.to_dict()) >= {"mean", "std", "lo", "hi", "verdict", "seeds_to_detect", "detectable"}


def _bench(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seed(sft, t4, t16, s4=1.0, s16=2.0):
    run = lambda after, sec: {"heldout_after_rl": after, "seconds_per_step": sec, "gss_at_10": 0,  # noqa: E731
                              "thought_adv_std": 0.5, "reward_curve": [0.1, 0.2], "metric": "dfd"}
    return {"heldout": {"after_sft": sft}, "runs": {"T4A4": run(t4, s4), "T16A1": run(t16, s16)}}


def test_t4a4_vs_t16a1_aggregate_pairs_by_seed_and_respects_lower_is_better(tmp_path):
    bench = _bench("t4a4_vs_t16a1")
    # trajectory: DFD, lower is better.  Per seed T4A4 - T16A1 in DFD = -0.02, -0.03, -0.01:
    # T4A4 better by 0.02 +- 0.01 (signed > 0 is better)
    seeds = {0: _seed(0.60, 0.50, 0.52), 1: _seed(0.70, 0.55, 0.58), 2: _seed(0.65, 0.60, 0.61)}
    agg = bench.aggregate(seeds, "trajectory")
    d = agg["t4a4_minus_t16a1"]
    assert d["mean"] == pytest.approx(0.02) and d["std"] == pytest.approx(0.01)
    assert (d["lo"], d["hi"]) == pytest.approx((0.02 - 0.024841, 0.02 + 0.024841), abs=1e-5)
    assert d["verdict"] == NO_DIFFERENCE
    # RL gain of T4A4 (lower DFD is better): 0.10, 0.15, 0.05 -> mean 0.10, std 0.05
    g = agg["runs"]["T4A4"]["rl_gain"]
    assert g["mean"] == pytest.approx(0.10) and g["std"] == pytest.approx(0.05)
    assert agg["step_time_ratio"]["mean"] == pytest.approx(0.5)
    results = {"tasks": {"trajectory": {"seeds": seeds, "summary": agg}}}
    bench.plot(results, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    bench.print_table(results)


# --- constant-answer baselines (vlm_grpo_ma.bench.baselines), checked by hand ------------------

def _sample(task: str, target: dict):
    from vlm_grpo_ma.data.sample import Sample

    return Sample(id=f"{task}-{len(str(target))}", task=task, images=[], image_sizes=[(100, 100)],
                  prompt={}, target=target, meta={})


def test_mean_target_box_and_path_by_hand():
    from vlm_grpo_ma.bench.baselines import mean_target

    key, box = mean_target([{"box": [0.0, 0.0, 0.2, 0.2]}, {"box": [0.2, 0.4, 0.6, 0.6]}])
    assert key == "box" and box == pytest.approx([0.1, 0.2, 0.4, 0.4])
    key, path = mean_target([{"trajectory": [[0, 0], [1, 0]]}, {"trajectory": [[0, 1], [1, 1]]}])
    assert key == "trajectory" and path == [[0.0, 0.5], [1.0, 0.5]]  # exact in binary
    assert mean_target([{"boxes": [[0, 0, 1, 1]], "labels": ["a"]}]) is None  # detection: no single box
    assert mean_target([]) is None
    with pytest.raises(ValueError, match="differ in shape"):
        mean_target([{"trajectory": [[0, 0], [1, 0]]}, {"trajectory": [[0, 0], [1, 0], [1, 1]]}])


def test_mean_target_baseline_scores_with_the_tasks_metrics():
    from vlm_grpo_ma.bench.baselines import mean_target_baseline
    from vlm_grpo_ma.task import get_task

    # trajectory: mean path (0, .5) -> (1, .5); held-out path (0, 0) -> (1, 0): every distance 0.5
    traj = get_task("trajectory")
    train = [_sample("trajectory", {"trajectory": [[0, 0], [1, 0]]}), _sample("trajectory", {"trajectory": [[0, 1], [1, 1]]})]
    m = mean_target_baseline(traj, [_sample("trajectory", {"trajectory": [[0, 0], [1, 0]]})], train)
    assert (m["dfd"], m["hd"], m["rmse"]) == pytest.approx((0.5, 0.5, 0.5))
    # affordance: mean box [0.1, 0.1, 0.3, 0.3] against [0.1, 0.1, 0.2, 0.2]: IoU 0.01 / 0.04 = 0.25
    aff = get_task("affordance")
    train = [_sample("affordance", {"box": [0.0, 0.0, 0.2, 0.2]}), _sample("affordance", {"box": [0.2, 0.2, 0.4, 0.4]})]
    m = mean_target_baseline(aff, [_sample("affordance", {"box": [0.1, 0.1, 0.2, 0.2]})], train)
    assert m["mean_iou"] == pytest.approx(0.25)
    assert mean_target_baseline(get_task("detection"), [], [_sample("detection", {"boxes": [[0, 0, 1, 1]], "labels": ["a"]})]) is None


def test_path_diagnostics_endpoint_errors_by_hand():
    errors = _bench("path_diagnostics").path_errors
    gt = [[0.1, 0.1], [0.5, 0.5], [0.9, 0.1]]
    # the exact path: no error, not reversed
    assert errors(gt, gt) == {"start": 0.0, "end": 0.0, "reversed": 0.0}
    # drawn backwards: each end 0.8 from its marker, 0 after swapping
    e = errors(gt[::-1], gt)
    assert e["start"] == pytest.approx(0.8) and e["end"] == pytest.approx(0.8) and e["reversed"] == 1.0
    # a path stuck in the centre: start and end 0.5657 (= 0.4 * sqrt(2)) away; swapping does not help
    e = errors([[0.5, 0.5], [0.5, 0.5]], gt)
    assert e["start"] == pytest.approx(0.4 * 2**0.5) and e["reversed"] == 0.0


def test_t4a4_vs_t16a1_merge_combines_tasks_and_adds_baselines(tmp_path):
    bench = _bench("t4a4_vs_t16a1")
    for task, name in (("trajectory", "a"), ("affordance", "b")):
        seeds = {"0": _seed(0.60, 0.50, 0.52), "1": _seed(0.70, 0.55, 0.58)}
        (tmp_path / f"{name}.json").write_text(json.dumps({"setting": {"eval_samples": 8}, "tasks": {task: {"seeds": seeds}}}))
    out = bench.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--out", str(tmp_path / "m.json")])
    assert set(out["tasks"]) == {"trajectory", "affordance"}
    traj = out["tasks"]["trajectory"]["summary"]
    # the mean path on 8 held-out samples is far from perfect (DFD well above 0), the mean box too
    assert 0.2 < traj["mean_target_baseline"]["mean"] < 0.8
    assert 0.0 < out["tasks"]["affordance"]["summary"]["mean_target_baseline"]["mean"] < 0.2
    assert (tmp_path / "m.png").stat().st_size > 0
    # the same task from two parts (another setting run from the same SFT models): side by side
    extra = {"0": {"heldout": {"after_sft": 0.60}, "runs": {"T4A8": _seed(0.6, 0.45, 0.5)["runs"]["T4A4"]}},
             "1": {"heldout": {"after_sft": 0.70}, "runs": {"T4A8": _seed(0.7, 0.52, 0.5)["runs"]["T4A4"]}}}
    (tmp_path / "c.json").write_text(json.dumps({"setting": {"eval_samples": 8}, "tasks": {"trajectory": {"seeds": extra}}}))
    out = bench.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'c.json'}", "--out", str(tmp_path / "m2.json")])
    runs = out["tasks"]["trajectory"]["summary"]["runs"]
    assert set(runs) == {"T4A4", "T16A1", "T4A8"}
    assert runs["T4A8"]["after_rl"]["mean"] == pytest.approx((0.45 + 0.52) / 2)


def test_path_diagnostics_reads_each_models_task_options(tmp_path):
    options = _bench("path_diagnostics").run_task_options
    (tmp_path / "run" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("task: trajectory\ntask_options:\n  marker_colours: fixed\n")
    assert options(str(tmp_path / "run" / "sft" / "final")) == {"marker_colours": "fixed"}
    (tmp_path / "run" / "config.yaml").write_text("task: trajectory\ntask_options: null\n")
    assert options(str(tmp_path / "run" / "sft" / "final")) == {}
    assert options(str(tmp_path / "elsewhere" / "final")) == {}


def test_demo_seeds_plot_draws_every_seed(tmp_path):
    demo = _bench("demo_seeds")
    per_seed = {s: {"after_sft": 0.3 + 0.01 * s, "after_rl": 0.35 + 0.01 * s, "mean_target_baseline": 0.06} for s in (0, 3, 4)}
    results = {"per_seed": per_seed, "setting": {"metric": "mean_iou", "task": "affordance"},
               "rl_gain": summarize([0.05, 0.05, 0.05], "after RL", "after SFT").to_dict()}
    demo.plot(results, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0
