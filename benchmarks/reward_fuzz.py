#!/usr/bin/env python
r"""Fuzz every task's reward with hostile model outputs and report the time per call.

For each task, ``--n`` completions are drawn from a mix of generators (seeded): random text of
random length (up to ``--max_chars``, 1 MiB by default, a few of them at full length), format
breakers (missing or repeated tags, end tokens), and the inputs found to be slow or crashing when
trying the rewards as an attacker (issue 12): answers of 1 MiB, deeply nested brackets, numbers
of thousands of digits, ``"lambda:" * 2850``, ``\binom{10^{9}}{10^{5}}``, ``\Gamma(10^{10})``,
power towers, NaN/Infinity, lone surrogates, JSON with thousands of boxes/points.  Each is scored
with ``task.reward`` on a sample of the task's synthetic data, from a worker THREAD (the math
task's signal-based timeouts do not work there, which is the case to bound).

Checked for every call: it returns (never raises), the total is in [0, 1], and a malformed answer
(format part 0) earns 0.  Reported per task: calls, mean / p99 / worst seconds per call, the
worst input (abridged), and the counts of reasons.  The code task runs the sandbox for every
well-formed answer, so ``--n_code`` (default 300) bounds its count.

Usage:
    python benchmarks/reward_fuzz.py                       # 100k per task; results/reward_fuzz.json
    python benchmarks/reward_fuzz.py --n 2000 --n_code 50 --out /tmp/fuzz   # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
import sys
import threading
import time
from collections import Counter
from pathlib import Path

TASKS = ("detection", "affordance", "trajectory", "vqa", "math", "code")

SLOW_INPUTS = [
    "x" * 2**20,
    "[" * 100_000 + "]" * 100_000,
    "(" * 5000 + ")" * 5000,
    "9" * 5000,
    "1" + "0" * 100_000,
    "```python\nf = " + "lambda:" * 2850 + " 1\n```",
    "\\binom{10^{9}}{10^{5}}",
    "\\Gamma(10^{10})",
    "10^10^10^10",
    "x^x^x^x^x^x",
    "\\frac{" * 2000,
    "NaN", "Infinity", "-1e309", "1e-400",
    "\ud800\udfff\ud800",
    json.dumps([{"bbox_2d": [i, i, i + 1, i + 1], "label": "a"} for i in range(5000)]),
    json.dumps([[i % 100, i % 77] for i in range(20_000)]),
    "<answer>" * 1000,
    "```" * 10_000,
    "A" * 100_000,
    "assert True\n" * 5000,
]


ALPHABETS = [string.printable, "[](){},.0123456789-e ", "\\{}^_$frac binom 0123456789", "<>/answerthink "]
_POOLS: dict[tuple[int, int], list[str]] = {}


def _random_text(rng: random.Random, max_chars: int) -> str:
    """Random text of log-uniform length up to ``max_chars``: a random slice of a random pool
    (drawing a megabyte character by character per call would dominate the run)."""
    key = (max_chars, id(rng))
    if key not in _POOLS:
        _POOLS[key] = ["".join(rng.choices(a, k=2 * max_chars)) for a in ALPHABETS]
    pool = rng.choice(_POOLS[key])
    n = int(min(max_chars, 2 ** rng.uniform(0, 20)))
    start = rng.randrange(0, len(pool) - n + 1)
    return pool[start:start + n]


def completions(rng: random.Random, n: int, max_chars: int):
    """``(thought, answer)`` pairs: mostly well-formed wrappers around hostile answer text."""
    for i in range(n):
        kind = rng.random()
        body = SLOW_INPUTS[i % len(SLOW_INPUTS)] if i < 4 * len(SLOW_INPUTS) or kind < 0.15 else _random_text(rng, max_chars)
        if i % 1000 == 999:
            body = "y" * max_chars  # the longest answers, regularly
        r = rng.random()
        if r < 0.8:
            yield "<think>t</think>", f"<answer>{body}</answer>"
        elif r < 0.9:
            yield "<think>t</think>", body  # no answer tags
        else:
            yield f"<think>{body}</think>", f"<answer>{body}</answer><|im_end|>"


class _Collect(logging.Handler):
    """Keeps the WARNING+ records logged while a task is fuzzed (a caught bug, a sandbox failure)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"log {record.name}: {record.getMessage()}"[:200])


def fuzz_task(name: str, n: int, max_chars: int, seed: int) -> dict:
    from vlm_grpo_ma.models.family import ModelFamily
    from vlm_grpo_ma.task import get_task

    family = ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)
    task = get_task(name)
    samples = task.synthetic(8, seed=seed)
    rng = random.Random(seed)
    times, reasons, errors = [], Counter(), []
    handler = _Collect()
    logging.getLogger().addHandler(handler)  # a guard or the sandbox that logs a failure is an error too
    worst = (0.0, "")
    for i, (thought, answer) in enumerate(completions(rng, n, max_chars)):
        s = samples[i % len(samples)]
        t0 = time.perf_counter()
        try:
            r = task.reward(thought, answer, s, family)
        except Exception as e:  # a failure of the guarantee: recorded, never hidden
            errors.append(f"{type(e).__name__}: {e}"[:200])
            continue
        dt = time.perf_counter() - t0
        times.append(dt)
        if dt > worst[0]:
            worst = (dt, (thought[:60] + " | " + answer[:120]).encode("unicode_escape").decode()[:200] + f" ({len(answer)} chars)")
        reasons[r.reason or "scored"] += 1
        if not 0.0 <= r.total <= 1.0 or (r.parts.get("format", 1.0) == 0.0 and r.total != 0.0):
            errors.append(f"reward {r} out of its rules")
        if r.reason in ("reward_error", "parse_error"):  # a bug caught by the guard, not a model error
            errors.append(f"{r.reason} on {answer[:80]!r}")
    logging.getLogger().removeHandler(handler)
    errors.extend(handler.messages)
    times.sort()
    return {
        "task": name,
        "calls": len(times),
        "mean_s": sum(times) / max(1, len(times)),
        "p99_s": times[int(0.99 * (len(times) - 1))] if times else None,
        "worst_s": worst[0],
        "worst_input": worst[1],
        "reasons": dict(reasons.most_common()),
        "errors": errors[:20],
        "n_errors": len(errors),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="completions per task")
    ap.add_argument("--n_code", type=int, default=300, help="completions for the code task (sandbox runs)")
    ap.add_argument("--max_chars", type=int, default=2**20)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="reward_fuzz", help="results file name (without .json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # warnings are collected and counted as errors, not printed
    results = []
    for name in args.tasks:
        n = args.n_code if name == "code" else args.n
        box: dict = {}
        t0 = time.perf_counter()
        th = threading.Thread(target=lambda: box.update(fuzz_task(name, n, args.max_chars, args.seed)))
        th.start()
        th.join()
        box["wall_s"] = time.perf_counter() - t0
        results.append(box)
        print(f"{name:11s} calls {box['calls']:7d}  mean {box['mean_s'] * 1e3:8.2f} ms  p99 {box['p99_s'] * 1e3:8.2f} ms  "
              f"worst {box['worst_s']:7.3f} s  errors {box['n_errors']}  ({box['wall_s']:.0f} s)", flush=True)
        print(f"{'':11s} worst input: {box['worst_input']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"command": " ".join(["python", "benchmarks/reward_fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
           "n": args.n, "n_code": args.n_code, "max_chars": args.max_chars, "seed": args.seed, "results": results}
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any(r["n_errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
