"""Pieces every task shares: the format rule and the reward combination.

The format rule and the thought/answer split live in the core (:mod:`vlm_grpo_ma.format`, which
the rollout backends, evaluation and the benchmark use too) and are re-exported here.
"""

from __future__ import annotations

import math

from vlm_grpo_ma.format import (  # noqa: F401  (re-exported for the task plugins)
    ANSWER_SLACK,
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    check_format,
    split_completion,
    split_tree_texts,
    strip_end_tokens,
)


def format_sft_target(reasoning: str, answer: str) -> str:
    """The reference completion text: ``<think>reasoning</think><answer>answer</answer>``."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def combine(task_score: float, format_ok: bool, w_task: float = 0.9, w_format: float = 0.1) -> float:
    """total = w_task * task + w_format * format, clipped to [0, 1]; non-finite -> 0."""
    if not math.isfinite(task_score):
        task_score = 0.0
    total = w_task * max(0.0, min(1.0, task_score)) + w_format * (1.0 if format_ok else 0.0)
    return max(0.0, min(1.0, total))


def check_aligned(predictions, samples) -> None:
    """``Task.metrics`` precondition: one prediction (or None) per sample, in order."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
