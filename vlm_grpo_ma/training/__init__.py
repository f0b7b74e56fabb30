"""The two-stage trainer on DeepSpeed: SFT warm-start, then GRPO-MA (plumbing only: the math is
in ``vlm_grpo_ma.algorithms``, the task logic in ``tasks/``).

- ``config``: the five documented config dataclasses (``TrainConfig``);
- ``distributed``: process group set-up (deepspeed launcher, torchrun or plain python; gloo on CPU);
- ``engine``: DeepSpeed config filling, partitioned loading, LoRA / frozen vision, optimizer and
  schedule, the frozen reference model, gathered parameters for generation;
- ``data``: the samples of a step as a pure function of (seed, step);
- ``sft`` / ``rl``: the two loops; ``stage``: what they share (build, resume, step, export);
- ``checkpoint``: atomic resumable checkpoints and the Hugging Face export;
- ``evaluate``: greedy held-out evaluation with the task's metrics;
- ``metrics``: JSONL / TensorBoard / wandb sinks;
- ``cli``: the pipeline, ``main(argv)`` (``scripts/train.py`` and the ``vlm-grpo-ma train`` command).
"""
