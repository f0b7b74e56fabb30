"""Why a trajectory model scores what it scores: where its greedy paths go wrong.

For each model given: greedy completions on the held-out synthetic trajectory samples of a seed
(the ones the trainer evaluates on), then, over the parsed paths,

- the distance of the first point from the start marker and of the last point from the goal
  (canonical units: 1 = the image side);
- how often the path is drawn backwards (its first point nearer the goal and its last point nearer
  the start than the other way round; 0.5 is chance for a path that ignores the markers);
- how much the predicted first and last points move from image to image (their std over the
  samples, against the ground truth's: a model that ignores the image draws about the same path
  every time);
- DFD of the parsed paths and the parse failures by reason;
- the mean-path baseline (``vlm_grpo_ma.bench.baselines``) on the same samples.

    .venv/bin/python benchmarks/path_diagnostics.py runs/t4a4_vs_t16a1/seed0/trajectory/sft/sft/final --seed 0
    .venv/bin/python benchmarks/path_diagnostics.py A/sft/final B/sft/final --seed 0,1 --out benchmarks/results/path_diagnostics.json

With several models and seeds, model i is evaluated on the held-out samples of seed i.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from vlm_grpo_ma.training import distributed as dist


def path_errors(pred, gt) -> dict[str, float]:
    """Endpoint errors of one parsed path ``pred`` (P, 2) against ``gt`` (G, 2), canonical units:
    ``start``, ``end`` and ``reversed`` (1.0 when swapping the predicted ends fits better)."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    start, end = np.linalg.norm(pred[0] - gt[0]), np.linalg.norm(pred[-1] - gt[-1])
    swapped = np.linalg.norm(pred[0] - gt[-1]) + np.linalg.norm(pred[-1] - gt[0])
    return {"start": float(start), "end": float(end), "reversed": float(swapped < start + end)}


def run_task_options(model_path: str) -> dict:
    """The ``task_options`` a saved model was trained with: ``<run>/config.yaml`` of
    ``<run>/sft/final`` or ``<run>/rl/final`` ({} when there is none)."""
    import yaml

    cfg = Path(model_path).resolve().parent.parent / "config.yaml"
    if not cfg.is_file():
        return {}
    opts = (yaml.safe_load(cfg.read_text()) or {}).get("task_options") or {}
    return json.loads(opts) if isinstance(opts, str) else dict(opts)


def diagnose(model_path: str, seed: int, n: int, batch_size: int = 32, task_options: dict | None = None) -> dict:
    from tqdm import tqdm

    from vlm_grpo_ma.bench.baselines import mean_target_baseline
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.tasks.trajectory import discrete_frechet
    from vlm_grpo_ma.training.data import heldout_samples, stage_seed_base
    from vlm_grpo_ma.training.evaluate import parse_completion

    task = get_task("trajectory", **(task_options or {}))
    samples = heldout_samples(task, n, seed)
    pol = load_policy(model_path)
    backend = HFRolloutBackend(pol.model, processor=pol.processor)
    params = SamplingParams(temperature=0.0, max_thought_tokens=256, max_answer_tokens=256)
    completions: list[str] = []
    for i in tqdm(range(0, n, batch_size), desc=f"greedy paths ({Path(model_path).name})"):
        msgs = [task.messages(s, pol.family) for s in samples[i : i + batch_size]]
        completions += [t[0] for t in backend.generate(msgs, n=1, sampling=params, max_new_tokens=256)]
    reasons: collections.Counter = collections.Counter()
    errs, dfd, ends, gt_ends = [], [], [], []
    for c, s in zip(completions, samples):
        pred, reason = parse_completion(task, c, s, pol.family)
        if reason:
            reasons[reason] += 1
        if pred is None:
            continue
        errs.append(path_errors(pred, s.target["trajectory"]))
        dfd.append(discrete_frechet(pred, s.target["trajectory"]))
        ends.append([*pred[0], *pred[-1]])
        gt_ends.append([*s.target["trajectory"][0], *s.target["trajectory"][-1]])
    spread = lambda a: float(np.asarray(a).std(axis=0).mean()) if a else float("nan")  # noqa: E731
    base = mean_target_baseline(task, samples, task.synthetic(2048, seed=stage_seed_base(seed, "sft")))
    mean = lambda key: float(np.mean([e[key] for e in errs])) if errs else float("nan")  # noqa: E731
    return {
        "model": model_path,
        "task_options": task_options or {},
        "seed": seed,
        "samples": n,
        "parsed": len(errs),
        "parse_failures": dict(reasons),
        "start_error": mean("start"),
        "end_error": mean("end"),
        "reversed_frac": mean("reversed"),
        "dfd_parsed": float(np.mean(dfd)) if dfd else float("nan"),
        "endpoint_spread": spread(ends),
        "gt_endpoint_spread": spread(gt_ends),
        "mean_path_dfd": base["dfd"],
        "examples": completions[:3],
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="saved trajectory models (<run>/sft/final, <run>/rl/final)")
    ap.add_argument("--seed", default="0", help="held-out seed per model (one, or one per model, comma-separated)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--task_options", default="", help='task options for every model, e.g. \'{"marker_colours": "fixed"}\' (default: each model\'s '
                         "own, from its run's config.yaml)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dist.prepare_environment()
    seeds = [int(s) for s in args.seed.split(",")]
    seeds = seeds * len(args.models) if len(seeds) == 1 else seeds
    if len(seeds) != len(args.models):
        ap.error(f"{len(args.models)} models but {len(seeds)} seeds")
    results = [diagnose(m, s, args.samples, task_options=json.loads(args.task_options) if args.task_options
                        else run_task_options(m)) for m, s in zip(args.models, seeds)]
    for r in results:
        print(f"\n{r['model']} (held-out seed {r['seed']}, {r['samples']} samples)")
        print(f"  parsed {r['parsed']}/{r['samples']}  failures {r['parse_failures']}")
        print(f"  first point from the start {r['start_error']:.3f}, last point from the goal {r['end_error']:.3f} "
              f"(image sides); drawn backwards {r['reversed_frac']:.2f} (0.5 = chance)")
        print(f"  DFD of the parsed paths {r['dfd_parsed']:.3f}  (mean path: {r['mean_path_dfd']:.3f})")
        print(f"  spread of the predicted end points {r['endpoint_spread']:.3f} (ground truth "
              f"{r['gt_endpoint_spread']:.3f}; std over samples, mean over x/y of both ends)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"written {args.out}")
    return results


if __name__ == "__main__":
    main()
