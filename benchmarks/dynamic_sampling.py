"""Dynamic sampling on a binary-reward task: what each mode trains on and what it costs (issue 24).

For the same prompts (the trainer's RL stream: ``SampleStream(...).batch(step)``, refills from
``.extra(step, round)``) and a FIXED policy (no update between steps: the rollouts' statistics are
what is compared), each mode of ``training/dynamic_sampling.py`` samples its trees with the
trainer's own code (``collect``, the HF backend, the task's guarded reward):

- ``off``: the step's B prompts as sampled;
- ``full`` (DAPO): drop prompts whose K*M rewards are all equal, refill (``--max-rounds``);
- ``pilot`` (GRPO-MA): drop after the K thoughts and one answer each, refill likewise (the
  trainer's one-pass pilot: the kept thoughts continue their KV cache).

Reported per mode: the share of trained groups with zero spread (their advantages are 0), the
informative prompts trained per step, generation time (rollout + reward) per step and per
informative prompt, and the ratio of the latter to ``off`` (measured in the same run). For the
pilot: the share of its dropped prompts that WOULD have had spread (a false drop: each dropped
prompt's tree is completed after the fact, outside the timed region) against the time it saved
(the time that completion took: the answers the pilot did not generate).

The reward is binary: VQA with ``w_task`` 1 and ``w_format`` 0 (1 for the right answer, else 0).
The policy is a tiny model after SFT (a random one answers nothing right and every group is flat):

    deepspeed scripts/train.py --config configs/vqa.tiny.yaml --stage sft --sft_steps 300 \\
        --output_dir runs/vqa_sft --task_options '{"w_task": 1.0, "w_format": 0.0}'
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dynamic_sampling.py --model runs/vqa_sft/sft/final

Writes ``benchmarks/results/dynamic_sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vlm_grpo_ma import get_task
from vlm_grpo_ma.models import load_policy
from vlm_grpo_ma.reward_guard import RewardGuard
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
from vlm_grpo_ma.rollout.types import append_answers
from vlm_grpo_ma.training.data import SampleStream
from vlm_grpo_ma.training.dynamic_sampling import collect, has_spread, pilot_pass

MODES = ("off", "full", "pilot")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="policy folder (e.g. runs/vqa_sft/sft/final)")
    ap.add_argument("--task", default="vqa")
    ap.add_argument("--task-options", default='{"w_task": 1.0, "w_format": 0.0}')
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="B, prompts per step")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--M", type=int, default=4)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--max-thought-tokens", type=int, default=112)
    ap.add_argument("--max-answer-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/dynamic_sampling.json")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    policy = load_policy(args.model)
    task = get_task(args.task, **json.loads(args.task_options))
    guard = RewardGuard(task)
    backend = HFRolloutBackend(policy.model, processor=policy.processor)
    family = policy.family
    K, M, B = args.K, args.M, args.prompts
    stream = SampleStream(task, B, args.seed, "rl")

    def score(tree, samples):
        return guard.batch([(tree.thought_texts[b][k], tree.answer_texts[b][k][m], samples[b], family)
                            for b in range(tree.B) for k in range(tree.K) for m in range(tree.M)])

    results: dict = {mode: dict(seconds=0.0, cpu_seconds=0.0, trained=0, informative=0, zero_spread=0, rounds=0,
                                sampled=0, tokens_decoded=0.0, pilot_dropped=0, false_drops=0, answers_saved=0,
                                saved_seconds=0.0, saved_cpu_seconds=0.0, fallback=0) for mode in MODES}
    for step in range(args.steps):
        samples = stream.batch(step)
        # modes take turns within a step (rotating who goes first), so a machine shared with other
        # work slows them alike; CPU seconds of this process are reported beside wall seconds
        for mode in MODES[step % 3:] + MODES[: step % 3]:
            acc = results[mode]
            sampling = SamplingParams(temperature=args.temperature, max_thought_tokens=args.max_thought_tokens,
                                      max_answer_tokens=args.max_answer_tokens, seed=args.seed * 100_003 + step)
            gen = lambda ss, m, sp=sampling: backend.generate_tree_from_messages(  # noqa: E731
                [task.messages(x, family) for x in ss], K, m, sp)
            hidden = [0.0, 0.0]

            def on_drop(tree, ss, pilot_scored, acc=acc, sampling=sampling, hidden=hidden):
                t, c = time.perf_counter(), time.process_time()  # the counterfactual, outside the timing
                rest = backend.generate_answers(tree, M - 1, sampling)
                rest_scored = score(rest, ss)
                for b in range(tree.B):
                    r = [pilot_scored[b * K + k].total for k in range(K)]
                    r += [x.total for x in rest_scored[b * K * (M - 1):(b + 1) * K * (M - 1)]]
                    acc["false_drops"] += int(len(set(r)) > 1)
                acc["answers_saved"] += tree.B * K * (M - 1)
                hidden[0] += time.perf_counter() - t
                hidden[1] += time.process_time() - c

            t0, c0 = time.perf_counter(), time.process_time()
            if mode == "off":
                tree = gen(samples, M)
                scored = score(tree, samples)
                stats = {"dynamic/rounds": 1, "dynamic/prompts_sampled": B, "dynamic/pilot_dropped": 0,
                         "dynamic/fallback": 0}
            else:
                got = collect(mode, samples, K=K, M=M, target=B, max_rounds=args.max_rounds, generate=gen,
                              extend=lambda tr, m, sp=sampling: backend.generate_answers(tr, m, sp), score=score,
                              more=lambda r, step=step: stream.extra(step, r),
                              on_drop=on_drop if mode == "pilot" else None,
                              generate_pilot=pilot_pass(backend, task, family, K, M, sampling))
                tree, scored, stats = got.rollout, got.scored, got.stats
            wall = time.perf_counter() - t0 - hidden[0]
            acc["saved_seconds"] += hidden[0]  # what completing the dropped prompts would have cost
            acc["saved_cpu_seconds"] += hidden[1]
            acc["seconds"] += wall
            acc["cpu_seconds"] += time.process_time() - c0 - hidden[1]
            rewards = torch.tensor([x.total for x in scored]).reshape(tree.B, K, M)
            spread = has_spread(rewards)
            acc["trained"] += tree.B
            acc["informative"] += int(spread.sum())
            acc["zero_spread"] += int((~spread).sum())
            acc["rounds"] += int(stats["dynamic/rounds"])
            acc["sampled"] += int(stats["dynamic/prompts_sampled"])
            acc["pilot_dropped"] += int(stats["dynamic/pilot_dropped"])
            acc["fallback"] += int(stats["dynamic/fallback"])
            acc["tokens_decoded"] += float(tree.stats.get("tokens_decoded", 0.0))
            print(f"step {step} {mode:5s}: trained {tree.B} informative {int(spread.sum())} "
                  f"rounds {int(stats['dynamic/rounds'])} {wall:.1f} s", flush=True)
    for mode, acc in results.items():
        acc["zero_spread_share"] = acc["zero_spread"] / max(acc["trained"], 1)
        acc["seconds_per_step"] = acc["seconds"] / args.steps
        acc["seconds_per_informative"] = acc["seconds"] / max(acc["informative"], 1)
        acc["cpu_seconds_per_informative"] = acc["cpu_seconds"] / max(acc["informative"], 1)
        acc["informative_per_step"] = acc["informative"] / args.steps
        if mode == "pilot":
            acc["false_drop_share"] = acc["false_drops"] / max(acc["pilot_dropped"], 1)
    for mode in ("full", "pilot"):
        results[mode]["time_per_informative_vs_off"] = (results[mode]["seconds_per_informative"]
                                                       / results["off"]["seconds_per_informative"])
        results[mode]["cpu_per_informative_vs_off"] = (results[mode]["cpu_seconds_per_informative"]
                                                      / results["off"]["cpu_seconds_per_informative"])
    out = {"args": vars(args), "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'mode':6s} {'zero-spread':>11s} {'inform./step':>12s} {'rounds':>6s} {'s/step':>7s} {'s/inform.':>9s} "
          f"{'vs off':>7s} {'CPU s/inf.':>10s} {'vs off':>7s}")
    for mode, r in results.items():
        print(f"{mode:6s} {r['zero_spread_share']:11.2f} {r['informative_per_step']:12.2f} {r['rounds'] / args.steps:6.2f} "
              f"{r['seconds_per_step']:7.2f} {r['seconds_per_informative']:9.3f} "
              f"{r.get('time_per_informative_vs_off', 1.0):7.2f} {r['cpu_seconds_per_informative']:10.3f} "
              f"{r.get('cpu_per_informative_vs_off', 1.0):7.2f}")
    p = results["pilot"]
    print(f"pilot: dropped {p['pilot_dropped']} prompts, {p['false_drops']} of them would have had spread "
          f"(false-drop share {p.get('false_drop_share', 0):.2f}); {p['answers_saved']} answers not generated, "
          f"{p['saved_cpu_seconds']:.1f} CPU s saved ({p['saved_cpu_seconds'] / max(p['cpu_seconds'], 1e-9):.2f} of "
          f"the pilot's own {p['cpu_seconds']:.1f} CPU s)")
    return out


if __name__ == "__main__":
    main()
