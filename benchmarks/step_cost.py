"""Step cost: one full GRPO-MA RL step (rollout, reward, update) T4A4 against T16A1 (issue 4, b).

Both spend 16 rewards per prompt on the same prompts and model. The step is the trainer's own
``vlm_grpo_ma.training.rl.rl_step`` on a DeepSpeed ZeRO-3 engine (one process): tree rollout on
gathered parameters, the affordance task's reward, GRPO-MA advantages, the training layout
(``--layout``, default the trainer's ``tree``: each prompt, thought and answer computed once)
and one optimizer step. The paper reports about 40% less time per step for T4A4; our target is
a T4A4 / T16A1 ratio of at most 0.5.

The model is a random Qwen2.5-VL with the tiny model's tokenizer and processor, rebuilt at
``--hidden`` / ``--layers`` so that the network, not Python overhead, dominates a step on the
CPU (``benchmarks/rollout_cost.py`` builds it the same way); with ``--image_tokens`` it is the
released 3B's shapes at that width, vision tower included, with images of that many visual
tokens (``benchmarks/wide_model.py``). A random model rarely samples
``</think>`` or ``<|im_end|>``, so thoughts and answers run to their limits: the lengths are the
ones asked for. After one warm-up step per setting, each repeat runs both settings back to back
(alternating which goes first); medians are reported.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/step_cost.py
    .venv/bin/python benchmarks/step_cost.py --hidden 64 --layers 2 --repeats 2   # the demo-size model
    .venv/bin/python benchmarks/step_cost.py --hidden 1024 --layers 2 --image_tokens 256 --prompts 1   # real prompt lengths

Prints a table and writes ``benchmarks/results/step_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_grpo_ma.training import distributed as dist  # noqa: E402

SETTINGS = {"T4A4": (4, 4), "T16A1": (16, 1)}
PHASES = ("time/rollout", "time/reward", "time/update")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="tiny-qwen2.5-vl")
    ap.add_argument("--hidden", type=int, default=512, help="text hidden size of the random model")
    ap.add_argument("--layers", type=int, default=4, help="text decoder layers")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per RL step (B)")
    ap.add_argument("--thought-tokens", type=int, default=96)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--layout", default="tree", choices=("tree", "packed", "naive"))
    ap.add_argument("--vision_hidden", type=int, default=0,
                    help="with --image_tokens: vision width (0: hidden * 5 / 8, as 1280 / 2048)")
    ap.add_argument("--vision_layers", type=int, default=2, help="with --image_tokens: vision blocks")
    ap.add_argument("--image_tokens", type=int, default=0,
                    help="> 0: a random Qwen2.5-VL of the released 3B's shapes at --hidden width whose images "
                         "become this many visual tokens (benchmarks/wide_model.py); 0: the tiny model's "
                         "vision tower and image sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dist.prepare_environment()
    dist.init_distributed()
    from rollout_cost import build_model

    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.rl import RLState, rl_step

    if args.image_tokens:
        from wide_model import build_wide_model

        wide_dir = Path(tempfile.mkdtemp(prefix="step_cost-"))
        build_wide_model(wide_dir, hidden=args.hidden, layers=args.layers, vision_hidden=args.vision_hidden,
                         vision_layers=args.vision_layers, image_tokens=args.image_tokens, seed=args.seed)
        from vlm_grpo_ma.models import load_policy

        policy = load_policy(str(wide_dir))
    else:
        policy, spec = build_model(args.family, args.hidden, args.layers, args.seed)
    n_params = sum(p.numel() for p in policy.model.parameters())
    task = get_task("affordance")
    samples = task.synthetic(args.prompts, seed=args.seed)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        policy.model.save_pretrained(model_dir)
        policy.processor.save_pretrained(model_dir)
        stages, states, cfgs = {}, {}, {}
        for name, (K, M) in SETTINGS.items():
            cfgs[name] = parse_train_config([
                "--task", "affordance", "--model", str(model_dir), "--output_dir", str(Path(tmp) / name),
                "--num_thoughts", str(K), "--answers_per_thought", str(M), "--prompts_per_step", str(args.prompts),
                "--max_thought_tokens", str(args.thought_tokens), "--max_answer_tokens", str(args.answer_tokens),
                "--train_layout", args.layout, "--rl_lr", "1e-6", "--report_to", "none",
            ])
            torch.manual_seed(args.seed)
            stages[name] = stg.build_stage(cfgs[name], "rl", str(model_dir), global_batch=args.prompts, micro=0,
                                           lr=1e-6, warmup=0, total_optimizer_steps=1000)
            states[name] = RLState(task)
            rl_step(stages[name], cfgs[name], task, states[name], samples)  # warm-up
        runs: dict[str, list[dict]] = {n: [] for n in SETTINGS}
        for rep in range(args.repeats):
            order = list(SETTINGS) if rep % 2 == 0 else list(SETTINGS)[::-1]
            for name in order:
                torch.manual_seed(args.seed + rep)
                t0 = time.perf_counter()
                m = rl_step(stages[name], cfgs[name], task, states[name], samples)
                m["time/step"] = time.perf_counter() - t0
                runs[name].append(m)
        for name in SETTINGS:
            med = {k: statistics.median(r[k] for r in runs[name]) for k in PHASES + ("time/step",)}
            med["tokens_decoded"] = statistics.median(r["rollout/tokens_decoded"] for r in runs[name])
            results[name] = med
    ratio = {k: results["T4A4"][k] / results["T16A1"][k] for k in PHASES + ("time/step", "tokens_decoded")}
    report = {
        "setting": {**vars(args), "parameters": n_params, "zero_stage": 3, "processes": dist.world_size(),
                    "torch_threads": torch.get_num_threads(), "device": "cpu" if dist.on_cpu() else "cuda",
                    "machine": platform.processor() or platform.machine()},
        "median_seconds": results,
        "ratio_T4A4_over_T16A1": ratio,
        "target": "time/step ratio <= 0.5",
        "meets_target": ratio["time/step"] <= 0.5,
    }
    print(f"\nRL step cost, {args.prompts} prompts x 16 rewards, thought {args.thought_tokens} / answer "
          f"{args.answer_tokens} tokens, {n_params / 1e6:.1f} M parameters, ZeRO-3, {args.layout} layout")
    print(f"{'phase':<16}{'T4A4 (s)':>10}{'T16A1 (s)':>11}{'ratio':>8}")
    for k in PHASES + ("time/step",):
        print(f"{k:<16}{results['T4A4'][k]:>10.3f}{results['T16A1'][k]:>11.3f}{ratio[k]:>8.2f}")
    print(f"{'tokens decoded':<16}{results['T4A4']['tokens_decoded']:>10.0f}{results['T16A1']['tokens_decoded']:>11.0f}"
          f"{ratio['tokens_decoded']:>8.2f}")
    print(f"target time/step ratio <= 0.5: {'met' if report['meets_target'] else 'NOT met'}")
    if dist.is_main():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"written {args.out}")
    return report


if __name__ == "__main__":
    main()
