#!/usr/bin/env python
"""Benchmark runner, from a clone: the same command as ``vlm-grpo-ma bench``.

    python scripts/benchmark.py run --suite synthetic-detection --model tiny-qwen2.5-vl
    python scripts/benchmark.py score --suite where2place --predictions api_outputs.jsonl
    python scripts/benchmark.py compare runs/bench/base runs/bench/grpo-ma
    python scripts/benchmark.py list

The runner itself is vlm_grpo_ma/bench/cli.py (``python scripts/benchmark.py --help``).
"""

import sys

from vlm_grpo_ma.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/benchmark.py"))
