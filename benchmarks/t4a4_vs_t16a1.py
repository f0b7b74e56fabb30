"""Learning comparison: GRPO-MA T4A4 against plain GRPO T16A1 at an equal budget of 16 rewards
per prompt, on synthetic affordance, detection and trajectory (issue 5).

Per task: one SFT warm-start of the tiny model (the trainer's ``--stage sft`` with the task's
``configs/<task>.tiny.yaml``), then two RL runs from that same SFT model with the same prompts,
seed, learning rate, temperature and number of steps (the tiny config's unless given), one T4A4
and one T16A1 (the trainer's ``--stage rl``).
Reported per task: the held-out metric (greedy decoding, the same held-out samples throughout)
before SFT, after SFT, and after RL for each run; per run: the reward curve, wall time per RL
step, and GSS@10 (steps whose gradient-spike score exceeds 10).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/t4a4_vs_t16a1.py                       # all three tasks
    .venv/bin/python benchmarks/t4a4_vs_t16a1.py --tasks affordance --sft-steps 150 --rl-steps 20

Prints a table, writes ``benchmarks/results/t4a4_vs_t16a1.json`` and ``.png``. The run folders
(config, metrics.jsonl, TensorBoard, models) stay under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from vlm_grpo_ma.training import distributed as dist

SETTINGS = {"T4A4": (4, 4), "T16A1": (16, 1)}
#: the held-out metric reported per task, and whether higher is better.  Detection: mean IoU of
#: the Hungarian-matched boxes, not AP50, which the tiny model barely leaves 0 on at CPU budgets
#: (both are kept in the JSON's ``evals``)
HEADLINE = {"affordance": ("mean_iou", True), "detection": ("mean_iou", True), "trajectory": ("dfd", False)}


def _metric(evals: dict, task: str) -> tuple[str, float | None]:
    name, _ = HEADLINE.get(task, (None, True))
    if name is None or name not in evals:  # fall back to the first metric the task reports
        name = next((k for k in evals if not k.startswith("eval/")), None)
    return name, (evals.get(name) if name else None)


def run_task(task: str, args, workdir: Path) -> dict:
    from vlm_grpo_ma.training.cli import main as train
    from vlm_grpo_ma.training.metrics import read_metrics

    common = ["--task", task, "--seed", str(args.seed), "--eval_samples", str(args.eval_samples), "--report_to", "none"]
    given = dict(kv.split("=", 1) for kv in args.sft_models.split(",") if kv.strip())
    sft_summary: dict = {}
    if task in given:  # reuse an SFT model trained before (e.g. the demo's <run>/sft/final)
        sft_model = Path(given[task])
        run_summary = sft_model.parent.parent / "summary.json"  # <run>/sft/final -> <run>/summary.json
        if run_summary.is_file():  # that run's before/after-SFT evaluations (the same held-out set
            sft_summary = json.loads(run_summary.read_text())  # if it used the same seed and eval_samples)
    else:
        sft_dir = workdir / task / "sft"
        steps = ["--sft_steps", str(args.sft_steps)] if args.sft_steps else []
        sft_summary = train([*common, "--stage", "sft", "--output_dir", str(sft_dir), *steps])
        sft_model = sft_dir / "sft" / "final"
    sft_steps = sft_summary.get("sft", {}).get("steps")
    full_evals = {label: sft_summary["evals"].get(label, {}) for label in ("before_sft", "after_sft")} if sft_summary else {}
    sft_evals = {label: _metric(ev, task)[1] for label, ev in full_evals.items()}
    out: dict = {"sft_model": str(sft_model), "sft_steps": sft_steps, "heldout": sft_evals, "evals": full_evals, "runs": {}}
    for name, (K, M) in SETTINGS.items():
        run_dir = workdir / task / name
        overrides = [f"--{k}={v}" for k, v in (("rl_steps", args.rl_steps), ("prompts_per_step", args.prompts),
                                                  ("rl_lr", args.rl_lr)) if v]  # else the task's tiny config
        summary = train([*common, "--stage", "rl", "--model", str(sft_model), "--output_dir", str(run_dir),
                         "--num_thoughts", str(K), "--answers_per_thought", str(M), *overrides])
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
            "run_dir": str(run_dir),
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.2), squeeze=False)
    for ax, bar_ax, task in zip(axes[0], axes[1], tasks):
        r = results["tasks"][task]
        for name, run in r["runs"].items():
            curve = run["reward_curve"]
            w = max(1, len(curve) // 10)
            smooth = [statistics.mean(curve[max(0, i - w + 1) : i + 1]) for i in range(len(curve))]
            after = run["heldout_after_rl"]
            label = f"{name}: {run['metric']} {after:.3f}" if after is not None else name
            ax.plot(range(1, len(curve) + 1), smooth, label=f"{label}, {run['seconds_per_step']:.2f} s/step")
        ax.set_title(f"{task} (16 rewards / prompt)")
        ax.set_xlabel("RL step")
        ax.set_ylabel("mean reward (moving average)")
        ax.legend(fontsize=8)
        # held-out metric along the pipeline
        names, values = [], []
        for label, v in (("before SFT", r.get("heldout", {}).get("before_sft")),
                         ("after SFT", r.get("heldout", {}).get("after_sft")),
                         *((f"after RL\n{n}", run["heldout_after_rl"]) for n, run in r["runs"].items())):
            if v is not None:
                names.append(label)
                values.append(v)
        metric = next(iter(r["runs"].values()))["metric"] if r["runs"] else ""
        better = "higher" if HEADLINE.get(task, (None, True))[1] else "lower"
        colours = {"before SFT": "#999999", "after SFT": "#6699cc", "after RL\nT4A4": "#1f77b4", "after RL\nT16A1": "#ff7f0e"}
        bars = bar_ax.bar(names, values, color=[colours.get(n, "#666666") for n in names])
        bar_ax.bar_label(bars, fmt="%.3f", fontsize=8)
        bar_ax.set_ylabel(f"held-out {metric} ({better} is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="affordance,detection,trajectory")
    ap.add_argument("--sft-steps", type=int, default=0, help="SFT steps (0: the task's tiny config)")
    ap.add_argument("--rl-steps", type=int, default=0, help="RL steps per run (0: the task's tiny config)")
    ap.add_argument("--prompts", type=int, default=0, help="prompts per RL step (0: the task's tiny config)")
    ap.add_argument("--rl-lr", type=float, default=0.0, help="RL learning rate (0: the task's tiny config)")
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-models", default="", help="task=path,...: start RL from these SFT models instead of training one")
    ap.add_argument("--workdir", default="runs/t4a4_vs_t16a1")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "t4a4_vs_t16a1.json"))
    args = ap.parse_args(argv)
    dist.prepare_environment()
    import torch

    results = {"setting": {**vars(args), "torch_threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine()}, "tasks": {}}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        results["tasks"][task] = run_task(task, args, Path(args.workdir))
    if dist.is_main():
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))
        print(f"\n{'task':<12}{'run':<7}{'metric':<10}{'before SFT':>11}{'after SFT':>10}{'after RL':>10}"
              f"{'reward first5':>14}{'reward last5':>13}{'s/step':>8}{'GSS@10':>8}")
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        for task, r in results["tasks"].items():
            for name, run in r["runs"].items():
                c = run["reward_curve"]
                before_sft = r.get("heldout", {}).get("before_sft")
                print(f"{task:<12}{name:<7}{str(run['metric']):<10}{fmt(before_sft):>11}{fmt(run['heldout_before_rl']):>10}"
                      f"{fmt(run['heldout_after_rl']):>10}{statistics.mean(c[:5]):>14.4f}{statistics.mean(c[-5:]):>13.4f}"
                      f"{run['seconds_per_step']:>8.2f}{run['gss_at_10']:>8d}")
        print(f"written {out} and {out.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
