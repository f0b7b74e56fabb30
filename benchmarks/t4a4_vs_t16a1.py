"""Learning comparison: GRPO-MA T4A4 against plain GRPO T16A1 at an equal budget of 16 rewards
per prompt, on synthetic affordance, detection and trajectory (issue 5).

Per task and seed: one SFT warm-start of the tiny model (the trainer's ``--stage sft`` with the
task's ``configs/<task>.tiny.yaml``), then two RL runs from that same SFT model with the same
prompts, seed, learning rate, temperature and number of steps (the tiny config's unless given),
one T4A4 and one T16A1 (the trainer's ``--stage rl``).
Reported per task and seed: the held-out metric (greedy decoding, the same held-out samples
throughout) before SFT, after SFT, and after RL for each run; per run: the reward curve, wall
time per RL step, GSS@10 (steps whose gradient-spike score exceeds 10) and the mean
thought-advantage std.  Over seeds: mean +- std of each, and 95% t intervals of the paired
differences (the RL gain of each setting, and T4A4 - T16A1); a difference whose interval holds 0
is reported as "no detectable difference at this scale" with the seeds that would detect the
observed mean difference (vlm_grpo_ma.bench.stats).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/t4a4_vs_t16a1.py --seeds 0,1,2         # all three tasks
    .venv/bin/python benchmarks/t4a4_vs_t16a1.py --tasks affordance --seeds 0,1 --sft-steps 150 --rl-steps 20
    .venv/bin/python benchmarks/t4a4_vs_t16a1.py --tasks affordance --seeds 0,1,2 \
        --sft-models 'affordance=runs/demo_seeds/affordance/seed{seed}/sft/final'     # reuse the demo's SFT models

Prints a table, writes ``benchmarks/results/t4a4_vs_t16a1.json`` and ``.png``. The run folders
(config, metrics.jsonl, TensorBoard, models) stay under ``--workdir``; a finished SFT run found
there is reused (the RL runs are run again).  One process per task, then ``--merge`` of their
JSON files, runs the tasks side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
from pathlib import Path

from vlm_grpo_ma.training import distributed as dist

SETTINGS = {"T4A4": (4, 4), "T16A1": (16, 1)}


def parse_settings(text: str) -> dict[str, tuple[int, int]]:
    """``"T4A1,T4A8"`` -> ``{"T4A1": (4, 1), "T4A8": (4, 8)}`` (K thoughts x M answers)."""
    import re

    out = {}
    for name in (t.strip() for t in text.split(",") if t.strip()):
        m = re.fullmatch(r"T(\d+)A(\d+)", name)
        if not m:
            raise ValueError(f"setting {name!r} is not of the form T<K>A<M>, e.g. T4A4")
        out[name] = (int(m.group(1)), int(m.group(2)))
    return out
#: the held-out metric reported per task, and whether higher is better.  Detection: mean IoU of
#: the Hungarian-matched boxes, not AP50, which the tiny model barely leaves 0 on at CPU budgets
#: (both are kept in the JSON's ``evals``)
HEADLINE = {"affordance": ("mean_iou", True), "detection": ("mean_iou", True), "trajectory": ("dfd", False)}


def _metric(evals: dict, task: str) -> tuple[str, float | None]:
    name, _ = HEADLINE.get(task, (None, True))
    if name is None or name not in evals:  # fall back to the first metric the task reports
        name = next((k for k in evals if not k.startswith("eval/")), None)
    return name, (evals.get(name) if name else None)


def run_task(task: str, args, workdir: Path, seed: int) -> dict:
    """One seed of one task: SFT (or a given SFT model), then T4A4 and T16A1 from it."""
    from vlm_grpo_ma.training.cli import main as train
    from vlm_grpo_ma.training.metrics import read_metrics

    common = ["--task", task, "--seed", str(seed), "--eval_samples", str(args.eval_samples), "--report_to", "none"]
    model = ["--model", args.model] if args.model else []
    given = dict(kv.split("=", 1) for kv in args.sft_models.split(",") if kv.strip())
    sft_summary: dict = {}
    if task in given:  # reuse an SFT model trained before (e.g. the demo's <run>/sft/final)
        sft_model = Path(given[task].replace("{seed}", str(seed)))
        run_summary = sft_model.parent.parent / "summary.json"  # <run>/sft/final -> <run>/summary.json
        if run_summary.is_file():  # that run's before/after-SFT evaluations (the same held-out set
            sft_summary = json.loads(run_summary.read_text())  # if it used the same seed and eval_samples)
    else:
        sft_dir = workdir / task / "sft"
        sft_model = sft_dir / "sft" / "final"
        done = sft_dir / "summary.json"  # a finished SFT run in this workdir (an interrupted benchmark) is reused
        if sft_model.is_dir() and done.is_file() and "after_sft" in json.loads(done.read_text()).get("evals", {}):
            sft_summary = json.loads(done.read_text())
        else:
            steps = ["--sft_steps", str(args.sft_steps)] if args.sft_steps else []
            sft_summary = train([*common, *model, "--stage", "sft", "--output_dir", str(sft_dir), *steps])
    sft_steps = sft_summary.get("sft", {}).get("steps")
    full_evals = {label: sft_summary["evals"].get(label, {}) for label in ("before_sft", "after_sft")} if sft_summary else {}
    sft_evals = {label: _metric(ev, task)[1] for label, ev in full_evals.items()}
    out: dict = {"sft_model": str(sft_model), "sft_steps": sft_steps, "heldout": sft_evals, "evals": full_evals, "runs": {}}
    for setting, (K, M) in parse_settings(args.settings).items():
        name = f"{setting}@{args.tag}" if args.tag else setting
        run_dir = workdir / task / name
        overrides = [f"--{k}={v}" for k, v in (("rl_steps", args.rl_steps), ("prompts_per_step", args.prompts),
                                                  ("rl_lr", args.rl_lr)) if v]  # else the task's tiny config
        argv = [*common, "--stage", "rl", "--model", str(sft_model), "--output_dir", str(run_dir),
                "--num_thoughts", str(K), "--answers_per_thought", str(M), *overrides, *shlex.split(args.rl_extra)]
        if "vllm" in args.rl_extra:  # one process per run: a freed in-process vLLM engine tears down
            summary = _train_in_child(argv, run_dir)  # torch.distributed, which the next run's DeepSpeed needs
        else:
            summary = train(argv)
        recs = read_metrics(run_dir / "metrics.jsonl", "rl")
        metric, before = _metric(summary["evals"].get("before_rl", {}), task)
        _, after = _metric(summary["evals"].get("after_rl", {}), task)
        out["runs"][name] = {
            "reward_curve": [r["reward/mean"] for r in recs],
            "metric": metric,
            "heldout_before_rl": before,
            "evals_after_rl": summary["evals"].get("after_rl", {}),
            "heldout_after_rl": after,
            "seconds_per_step": statistics.median(r["time/step"] for r in recs),
            "gss_at_10": int(recs[-1].get("grad/gss_spikes", 0)),
            "gss_max": max(float(r.get("grad/gss_max", 0.0)) for r in recs),
            "zero_spread_frac": statistics.mean(r["rollout/zero_spread_frac"] for r in recs),
            "thought_adv_std": statistics.mean(r["adv/thought_std"] for r in recs),
            "run_dir": str(run_dir),
        }
    if out["heldout"].get("after_sft") is None:  # the SFT run's summary lacks it: the same model and
        out["heldout"]["after_sft"] = out["runs"]["T4A4"]["heldout_before_rl"]  # held-out set, read before RL
    return out


def _train_in_child(argv: list[str], run_dir: Path) -> dict:
    """The trainer in a child process (this interpreter, ``scripts/train.py``); its summary."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    subprocess.run([sys.executable, str(script), *argv], check=True)
    return json.loads((run_dir / "summary.json").read_text())


def heldout_baseline(task_name: str, seed: int, eval_samples: int) -> float | None:
    """The headline metric of always answering the mean training target (mean box, mean path) on
    the held-out samples the runs of ``seed`` are evaluated on (``vlm_grpo_ma.bench.baselines``);
    None for detection (several boxes per image)."""
    from vlm_grpo_ma.bench.baselines import mean_target_baseline
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.data import heldout_samples, stage_seed_base

    cfg = parse_train_config(["--task", task_name, "--seed", str(seed), "--eval_samples", str(eval_samples)])
    task = get_task(task_name, **cfg.data.task_kwargs())
    heldout = heldout_samples(task, eval_samples, seed)
    m = mean_target_baseline(task, heldout, task.synthetic(2048, seed=stage_seed_base(seed, "sft")))
    return None if m is None else _metric(m, task_name)[1]


def aggregate(seed_results: dict, task: str) -> dict:
    """Over the seeds of one task: mean +- std of each figure per setting, and paired 95%
    intervals of each setting's RL gain and of T4A4 - T16A1 (signed so that > 0 is better)."""
    from vlm_grpo_ma.bench.stats import mean_std, paired_differences, summarize

    seeds = list(seed_results)
    sign = 1.0 if HEADLINE.get(task, (None, True))[1] else -1.0
    ms = lambda vals: dict(zip(("mean", "std"), mean_std(vals)))  # noqa: E731
    out: dict = {"seeds": seeds, "better": "higher" if sign > 0 else "lower", "runs": {}}
    sft = [seed_results[s]["heldout"].get("after_sft") for s in seeds]
    if None not in sft:
        out["after_sft"] = ms(sft)
    base = [seed_results[s]["heldout"].get("mean_target_baseline") for s in seeds]
    if None not in base:
        out["mean_target_baseline"] = ms(base)
    names = list(seed_results[seeds[0]]["runs"])
    for name in names:
        runs = [seed_results[s]["runs"][name] for s in seeds]
        after = [r["heldout_after_rl"] for r in runs]
        agg = {
            "after_rl": ms(after),
            "seconds_per_step": ms([r["seconds_per_step"] for r in runs]),
            "gss_at_10": ms([r["gss_at_10"] for r in runs]),
            "thought_adv_std": ms([r["thought_adv_std"] for r in runs]),
        }
        if None not in sft:  # gain in the better direction: after RL - after SFT (x -1 when lower is better)
            agg["rl_gain"] = summarize([sign * d for d in paired_differences(after, sft)], "after RL", "after SFT").to_dict()
        out["runs"][name] = agg
    for name in names:  # a tagged run (e.g. T4A4@vllm) against the untagged run of the same setting
        base_name = name.split("@", 1)[0]
        if "@" in name and base_name in names:
            a, b = ([seed_results[s]["runs"][n]["heldout_after_rl"] for s in seeds] for n in (name, base_name))
            out.setdefault("tagged_minus_untagged", {})[name] = summarize(
                [sign * d for d in paired_differences(a, b)], name, base_name).to_dict()
    if all(n in names for n in SETTINGS):
        a, b = ([seed_results[s]["runs"][n]["heldout_after_rl"] for s in seeds] for n in SETTINGS)
        out["t4a4_minus_t16a1"] = summarize([sign * d for d in paired_differences(a, b)], "T4A4", "T16A1").to_dict()
        ta, tb = ([seed_results[s]["runs"][n]["seconds_per_step"] for s in seeds] for n in SETTINGS)
        out["step_time_ratio"] = ms([x / y for x, y in zip(ta, tb)])
    return out


def plot(results: dict, path: Path) -> None:
    """Top: reward curves (moving average), mean over seeds with a +-1 std band.  Bottom: the
    held-out metric after SFT and after RL per setting, mean over seeds with +-1 std bars and
    the seeds as dots."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.2), squeeze=False)
    names = list(next(iter(next(iter(results["tasks"].values()))["seeds"].values()))["runs"])
    palette = plt.get_cmap("tab10").colors
    colours = {"after SFT": "#6699cc", "T4A4": "#1f77b4", "T16A1": "#ff7f0e"}
    for i, n in enumerate(n for n in names if n not in colours):
        colours[n] = palette[(i + 2) % len(palette)]
    for ax, bar_ax, task in zip(axes[0], axes[1], tasks):
        r = results["tasks"][task]
        per_seed, agg = r["seeds"], r["summary"]
        for name in names:
            curves = []
            for sr in per_seed.values():
                c = sr["runs"][name]["reward_curve"]
                w = max(1, len(c) // 10)
                curves.append([statistics.mean(c[max(0, i - w + 1) : i + 1]) for i in range(len(c))])
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            mean, std = arr.mean(0), arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(n)
            x = np.arange(1, n + 1)
            a = agg["runs"][name]
            ax.plot(x, mean, color=colours[name], label=f"{name}: {a['seconds_per_step']['mean']:.2f} s/step")
            ax.fill_between(x, mean - std, mean + std, color=colours[name], alpha=0.2)
        ax.set_title(f"{task} ({', '.join(names)}, {len(per_seed)} seeds)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("sampled reward (moving average)")
        ax.legend(fontsize=8)
        labels, groups = [], []
        sft = [sr["heldout"].get("after_sft") for sr in per_seed.values()]
        if None not in sft:
            labels.append("after SFT")
            groups.append(sft)
        for name in names:
            labels.append(name)
            groups.append([sr["runs"][name]["heldout_after_rl"] for sr in per_seed.values()])
        means = [statistics.mean(g) for g in groups]
        stds = [statistics.stdev(g) if len(g) > 1 else 0.0 for g in groups]
        bar_ax.bar(labels, means, yerr=stds, capsize=6, color=[colours[lab] for lab in labels], alpha=0.8)
        for i, g in enumerate(groups):
            bar_ax.scatter([i] * len(g), g, color="k", s=12, zorder=3)
        if "mean_target_baseline" in agg:
            bar_ax.axhline(agg["mean_target_baseline"]["mean"], color="grey", ls="--", lw=1,
                           label="always the mean target")
            bar_ax.legend(fontsize=8)
        d = agg.get("t4a4_minus_t16a1")
        if d:
            bar_ax.set_title(f"T4A4 - T16A1: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]\n{d['verdict']}",
                             fontsize=9)
        metric = next(iter(next(iter(per_seed.values()))["runs"].values()))["metric"]
        bar_ax.set_ylabel(f"held-out {metric} ({agg['better']} is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="affordance,detection,trajectory")
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT steps (0: the task's tiny config)")
    ap.add_argument("--rl-steps", type=int, default=0, help="RL steps per run (0: the task's tiny config)")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per RL step (0: the task's tiny config)")
    ap.add_argument("--rl-lr", type=float, default=0.0, help="RL learning rate (0: the task's tiny config)")
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--settings", default="T4A4,T16A1",
                    help="K x M trees to run from each SFT model, e.g. T4A1,T4A2,T4A4,T4A8 for the ablation over M")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each: its own SFT model, data and sampling)")
    ap.add_argument("--sft-models", default="",
                    help="task=path,...: start RL from these SFT models instead of training one; {seed} in a path is replaced by the seed")
    ap.add_argument("--merge", default="",
                    help="a.json,b.json,...: no runs; combine the results written before (one process per task, or per "
                         "setting of a task from the same SFT models) into --out, recomputing the summaries, "
                         "baselines, table and PNG")
    ap.add_argument("--model", default="", help="the model SFT starts from (default: the task's tiny config's)")
    ap.add_argument("--rl-extra", default="", help="more trainer arguments for the RL runs, e.g. '--rollout_backend vllm'")
    ap.add_argument("--tag", default="", help="label of these RL runs: settings become T4A4@<tag> (their own run folders); "
                                              "merged with an untagged part, each is compared with its untagged setting")
    ap.add_argument("--workdir", default="runs/t4a4_vs_t16a1")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "t4a4_vs_t16a1.json"))
    args = ap.parse_args(argv)
    dist.prepare_environment()
    import torch

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = {"setting": {**vars(args), "torch_threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine()}, "tasks": {}}
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge.split(",") if p.strip()]
        results["setting"]["merged"] = {p: part["setting"] for p, part in zip(args.merge.split(","), parts)}
        for part in parts:
            for task, r in part["tasks"].items():  # the same task in several parts: their settings side by side
                merged = results["tasks"].setdefault(task, {"seeds": {}, "eval_samples": part["setting"]["eval_samples"]})
                for seed, sr in r["seeds"].items():
                    if seed in merged["seeds"]:
                        merged["seeds"][seed]["runs"].update(sr["runs"])
                    else:
                        merged["seeds"][seed] = sr
    else:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            results["tasks"][task] = {"seeds": {str(s): run_task(task, args, Path(args.workdir) / f"seed{s}", s) for s in seeds},
                                      "eval_samples": args.eval_samples}
    for task, r in results["tasks"].items():
        for s, sr in r["seeds"].items():
            sr["heldout"]["mean_target_baseline"] = heldout_baseline(task, int(s), r["eval_samples"])
        r["summary"] = aggregate(r["seeds"], task)
    if dist.is_main():
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))
        print_table(results)
        print(f"written {out} and {out.with_suffix('.png')}")
    return results


def print_table(results: dict) -> None:
    pm = lambda d: f"{d['mean']:.4f} +- {d['std']:.4f}"  # noqa: E731
    ci = lambda d: f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"  # noqa: E731
    for task, r in results["tasks"].items():
        agg = r["summary"]
        print(f"\n== {task}: {len(agg['seeds'])} seeds ({agg['better']} is better); mean +- std over seeds, "
              f"95% t intervals of paired differences ==")
        if "mean_target_baseline" in agg:
            print(f"  mean-target baseline {pm(agg['mean_target_baseline'])}")
        if "after_sft" in agg:
            print(f"  after SFT           {pm(agg['after_sft'])}")
        for name, a in agg["runs"].items():
            gain = f"  RL gain {ci(a['rl_gain'])} {a['rl_gain']['verdict']}" if "rl_gain" in a else ""
            print(f"  {name:<6} after RL     {pm(a['after_rl'])}{gain}")
            print(f"  {name:<6} s/step {pm(a['seconds_per_step'])}  GSS@10 {a['gss_at_10']['mean']:.1f}  "
                  f"thought-adv std {pm(a['thought_adv_std'])}")
        for name, t in agg.get("tagged_minus_untagged", {}).items():
            print(f"  {name} - {name.split('@')[0]:<10} {ci(t)}  -> {t['verdict']}")
        d = agg.get("t4a4_minus_t16a1")
        if not d:
            continue
        extra = (f"; ~{d['seeds_to_detect']:.0f} seeds would detect a difference of {abs(d['mean']):.4f}, "
                 f"{d['n']} seeds detect >= {d['detectable']:.4f}") if d["verdict"].startswith("no detectable") else ""
        print(f"  T4A4 - T16A1        {ci(d)}  -> {d['verdict']}{extra}")
        print(f"  step time T4A4/T16A1 {pm(agg['step_time_ratio'])}")


if __name__ == "__main__":
    main()
