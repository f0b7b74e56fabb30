"""Pieces every task shares: the format rule and the reward combination.

Format rule: exactly one ``<think>...</think>`` followed by exactly one ``<answer>...</answer>``,
nothing but whitespace around them.  In a rollout the thought segment is the text up to and
including ``</think>`` and the answer segment is everything after it; ``check_format`` takes the
two segments (a benchmark that generated one completion passes it through ``split_completion``).
"""

from __future__ import annotations

import math
import re

from vlm_grpo_ma.task import ParseError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

_THOUGHT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


def strip_end_tokens(text: str) -> str:
    for tok in _END_TOKENS:
        text = text.replace(tok, "")
    return text


def split_completion(completion: str) -> tuple[str, str]:
    """Split one generated completion into (thought, answer) at the first ``</think>``.

    Without ``</think>`` the whole text is the thought and the answer is empty (scores 0).
    """
    idx = completion.find(THINK_CLOSE)
    if idx < 0:
        return completion, ""
    cut = idx + len(THINK_CLOSE)
    return completion[:cut], completion[cut:]


#: room for the tags, whitespace and end tokens around an answer of the task's maximum length
ANSWER_SLACK = 64


def check_format(thought: str, answer: str, max_chars: int | None = None) -> str:
    """The text inside ``<answer>`` if (thought, answer) obey the format rule, else ParseError.

    Reasons: ``too_long`` (the answer segment is longer than ``max_chars`` characters: checked
    first, before any parsing, so a huge answer costs nothing), ``bad_think`` (thought not exactly
    one think block), ``no_answer`` (answer segment not exactly one answer block), ``empty``
    (answer block blank).
    """
    if max_chars is not None and isinstance(answer, str) and len(answer) > max_chars:
        raise ParseError("too_long", f"answer segment of {len(answer)} characters > {max_chars}")
    thought = strip_end_tokens(thought)
    answer = strip_end_tokens(answer)
    m = _THOUGHT_RE.match(thought)
    if m is None or THINK_OPEN in m.group(1) or THINK_CLOSE in m.group(1):
        raise ParseError("bad_think", "thought must be exactly one <think>...</think>")
    a = _ANSWER_RE.match(answer)
    if a is None or ANSWER_OPEN in a.group(1) or ANSWER_CLOSE in a.group(1) or THINK_OPEN in answer:
        raise ParseError("no_answer", "answer must be exactly one <answer>...</answer>")
    inner = a.group(1).strip()
    if not inner:
        raise ParseError("empty", "empty answer")
    return inner


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
