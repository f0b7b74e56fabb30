"""The ``vlm-grpo-ma`` command: ``vlm-grpo-ma train ...`` and ``vlm-grpo-ma bench run|score|compare|list``.

The same dispatcher runs as ``python -m vlm_grpo_ma ...``, which is how launchers start it::

    deepspeed --module vlm_grpo_ma train --task affordance
    deepspeed --num_gpus 8 --module vlm_grpo_ma train --config affordance.qwen2_5_vl_3b.yaml
    torchrun --standalone --nproc_per_node 4 -m vlm_grpo_ma bench run --suite ... --model ...

(``deepspeed $(which vlm-grpo-ma) train ...`` works too: the console script is a Python file.)
``scripts/train.py`` and ``scripts/benchmark.py`` are the same two commands for a clone.
"""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """\
usage: vlm-grpo-ma <command> [options]

commands:
  train    SFT warm-start, then GRPO-MA, on DeepSpeed     (vlm-grpo-ma train --help)
  bench    benchmark runner: run | score | compare | list  (vlm-grpo-ma bench --help)

examples:
  vlm-grpo-ma train --task affordance                    # the CPU demo: tiny model, synthetic data
  deepspeed --module vlm_grpo_ma train --task detection   # under the deepspeed launcher
  vlm-grpo-ma bench run --suite synthetic-affordance --model tiny-qwen2.5-vl
  vlm-grpo-ma bench list
"""


def _launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split off the ``--local_rank=N`` (or ``--local_rank N``) that the deepspeed launcher puts
    in front of the script's own arguments, i.e. before the subcommand. Returns (those, the rest)."""
    lead: list[str] = []
    while argv and argv[0].startswith("--local_rank"):
        lead.append(argv.pop(0))
        if lead[-1] == "--local_rank" and argv:
            lead.append(argv.pop(0))
    return lead, argv


def resolve_eval_suite(name: str):
    """A benchmark suite (name or file) as the trainer's held-out evaluation: ``(task, samples,
    max_new_tokens, batch_size)`` from ``bench``'s own suite loader (the trainer cannot import
    ``bench``, a peer; this layer can and hands it over, ``register_training_hooks``)."""
    from vlm_grpo_ma.bench.engine import load_samples, make_task
    from vlm_grpo_ma.bench.suite import load_suite

    suite = load_suite(name)
    task = make_task(suite)
    return task, load_samples(suite, task), suite.generation.max_new_tokens, suite.generation.batch_size


def register_training_hooks() -> None:
    """Give the trainer what lives above it: ``--eval_suite`` resolution through ``bench``."""
    from vlm_grpo_ma.training import periodic_eval

    periodic_eval.set_suite_resolver(resolve_eval_suite)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``vlm-grpo-ma train`` (and the ``vlm-grpo-ma-train`` alias): the two-stage trainer.

    Returns 0; the trainer's own errors propagate (a traceback and a non-zero exit)."""
    from vlm_grpo_ma.training import distributed

    distributed.prepare_environment()  # DS_ACCELERATOR=cpu without CUDA, before DeepSpeed is imported
    from vlm_grpo_ma.training.cli import main

    register_training_hooks()
    main(None if argv is None else list(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns the exit status."""
    lead, argv = _launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from vlm_grpo_ma import __version__

        print(f"vlm-grpo-ma {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(lead + rest)  # the trainer's config takes --local_rank
    if command == "bench":
        from vlm_grpo_ma.bench.cli import main as bench_main

        return bench_main(rest, prog="vlm-grpo-ma bench")  # ranks come from the environment
    print(f"vlm-grpo-ma: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2
