"""The held-out curve of a run trained with ``--eval_every N`` (evaluation during training), and
what the evaluation cost: a PNG of ``heldout/<metric>`` against the step for SFT and RL (the same
records TensorBoard shows under ``tensorboard/sft_eval`` and ``tensorboard/rl_eval``), and a JSON
with the evaluations' seconds against the stages' training seconds, and the step time of the
steps right after an evaluation against the others (an evaluation must not slow the steps that
follow it).

    deepspeed scripts/train.py --config configs/affordance.tiny.yaml --output_dir runs/demo_eval \\
        --eval_every 40 --eval_samples 128 --keep_best_metric mean_iou
    .venv/bin/python benchmarks/heldout_curve.py runs/demo_eval --metric mean_iou

Writes ``benchmarks/results/heldout_curve.png`` and ``.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vlm_grpo_ma.training.metrics import read_metrics


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder (holds metrics.jsonl and summary.json)")
    ap.add_argument("--metric", default="mean_iou", help="held-out metric to plot (heldout/<metric>)")
    ap.add_argument("--out", default="benchmarks/results/heldout_curve")
    args = ap.parse_args(argv)
    run = Path(args.run)
    path = run / "metrics.jsonl"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    key = f"heldout/{args.metric}"
    out: dict = {"run": str(run), "metric": key, "stages": {}}
    curves = {}
    for stage in ("sft", "rl"):
        ev = [r for r in read_metrics(path, f"{stage}_eval") if key in r]
        steps = read_metrics(path, stage)
        if not ev:
            continue
        curves[stage] = ([r["step"] for r in ev], [r[key] for r in ev])
        every = ev[1]["step"] - ev[0]["step"] if len(ev) > 1 else ev[0]["step"]
        after = [r["time/step"] for r in steps if r["step"] > 1 and (r["step"] - 1) % every == 0]
        rest = [r["time/step"] for r in steps if r["step"] > 1 and (r["step"] - 1) % every != 0]
        train_s = sum(r["time/step"] for r in steps)
        eval_s = sum(r["time/eval"] for r in ev)
        out["stages"][stage] = {
            "evaluations": len(ev), "every": every, "eval_seconds": eval_s, "train_seconds": train_s,
            "eval_share_of_stage": eval_s / (eval_s + train_s) if train_s + eval_s else 0.0,
            "mean_eval_seconds": eval_s / len(ev),
            "step_seconds_after_eval_median": statistics.median(after) if after else None,
            "step_seconds_other_median": statistics.median(rest) if rest else None,
            "first": {"step": ev[0]["step"], "value": ev[0][key]}, "last": {"step": ev[-1]["step"], "value": ev[-1][key]},
            "best": max(r[key] for r in ev),
        }
    out["before_after"] = {k: v.get(args.metric) for k, v in summary.get("evals", {}).items()}
    # step 0 of each stage: the evaluation before it (the same held-out samples)
    for stage, label in (("sft", "before_sft"), ("rl", "after_sft")):
        if stage in curves and out["before_after"].get(label) is not None:
            x, y = curves[stage]
            curves[stage] = ([0] + x, [out["before_after"][label]] + y)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.4), squeeze=False)
    for ax, (stage, (x, y)) in zip(axes[0], curves.items()):
        ax.plot(x, y, marker="o", ms=3)
        ax.set_title(f"{stage}: held-out {args.metric} (every {out['stages'][stage]['every']} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel(args.metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out + ".png", dpi=110)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
