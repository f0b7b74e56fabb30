"""The completion format every task shares, and where a completion's thought ends.

Format rule: exactly one ``<think>...</think>`` followed by exactly one ``<answer>...</answer>``,
nothing but whitespace around them (and an end token such as ``<|im_end|>``, which is ignored).

**The thought ends exactly at the first ``</think>``, by text, not by token.**  Qwen2-VL and
Qwen2.5-VL have no ``</think>`` token: ``.</think><answer>`` is ``.</`` ``think`` ``><``
``answer`` ``>`` in their vocabulary, so the token that completes ``</think>`` (``><``) also
carries the ``<`` of ``<answer>``.  A tree rollout stops a thought at that token; cutting the
texts where the *tokens* were cut would give the reward the thought ``...</think><`` and the
answer ``answer>...``, and the exact SFT target would score 0.  :func:`split_completion` (one
completion) and :func:`split_tree_texts` (a thought and one of its answers, as a tree rollout
decodes them) cut the text right after ``</think>``; whatever the stopping token carried past it
(``<``, a newline, a space) starts the answer.

Which advantage the boundary token trains on: a token belongs to the stage that sampled it.  The
boundary token (``><``) was sampled in stage 1, before the M answers branched, and every one of
them continues after it, so it stays in the thought's token segment and trains on the thought's
advantage like every other thought token; only the *text* handed to the reward moves.

**Thinking templates** (Qwen3-VL Thinking): the generation prompt already wrote ``<think>\\n``.
The rollout backends put that prefix (``generation_prefix`` of the processor) in front of what
the model generated, so every text the format rule, the rewards and the metrics read is the whole
completion, on both template kinds; SFT teaches only the text after it
(:func:`completion_after_prefix`).  Stage 1 still stops at the first ``</think>``.

This module is core: the rollout backends, evaluation and the benchmark import it, and the task
plugins (``vlm_grpo_ma.tasks.common``) re-export it.  It imports nothing from the plugins.
"""

from __future__ import annotations

import re
from typing import Any

from vlm_grpo_ma.task import ParseError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

_THOUGHT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*$", re.DOTALL)
_ANSWER_RE = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


def strip_end_tokens(text: str) -> str:
    """``text`` without the end tokens ``<|im_end|>`` / ``<|endoftext|>``."""
    for tok in _END_TOKENS:
        text = text.replace(tok, "")
    return text


def split_completion(completion: str) -> tuple[str, str]:
    """Split one completion into (thought, answer): the thought is the text up to and including
    the first ``</think>``, the answer everything after it.

    Without ``</think>`` the whole text is the thought and the answer is empty (it then fails
    :func:`check_format` with ``bad_think``).
    """
    idx = completion.find(THINK_CLOSE)
    if idx < 0:
        return completion, ""
    cut = idx + len(THINK_CLOSE)
    return completion[:cut], completion[cut:]


def split_tree_texts(thought_text: str, answer_text: str) -> tuple[str, str]:
    """Re-cut a (thought, answer) pair decoded from a tree rollout's token segments so that the
    thought ends exactly at its first ``</think>``.

    ``thought_text`` is the decoded stage-1 tokens, which may run past ``</think>`` when the
    token that completed the tag carried more text (``><`` = ``>`` of ``</think>`` + ``<`` of
    ``<answer>``); that tail is moved to the front of ``answer_text``.  A thought without
    ``</think>`` is returned unchanged.  Equivalent to ``split_completion(thought + answer)``
    whenever the thought contains ``</think>``.
    """
    thought, carried = split_completion(thought_text)
    return thought, carried + answer_text


def completion_after_prefix(target: str, prefix: str) -> str:
    """What the model must write after a generation prompt that already wrote ``prefix`` of the
    completion (:func:`vlm_grpo_ma.models.chat_templates.generation_prefix`): ``target`` itself
    for a plain template (``prefix == ""``); for a thinking one (``prefix == "<think>\\n"``) the
    target without its opening ``<think>`` (and the whitespace after it), so SFT never teaches a
    second ``<think>``.  ``prefix + completion_after_prefix(target, prefix)`` obeys the format rule
    exactly when ``target`` does and parses to the same answer.  ValueError if ``prefix`` is not
    ``""`` or ``<think>`` + whitespace, or if ``target`` does not start with ``<think>`` then."""
    if not prefix:
        return target
    if prefix.strip() != THINK_OPEN:
        raise ValueError(f"unknown completion prefix {prefix!r} (expected '' or '<think>' + whitespace)")
    body = target.lstrip()
    if not body.startswith(THINK_OPEN):
        raise ValueError(f"the prompt opens the thought ({prefix!r}) but the target does not start with <think>: "
                         f"{target[:80]!r}")
    return body[len(THINK_OPEN):].lstrip()


#: room for the tags, whitespace and end tokens around an answer of a task's maximum length
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


def parse_exception_reason(exc: BaseException) -> str:
    """The failure key counted when a task's parser raises something other than ParseError
    (a task bug must not end a run): ``parse_exception:<ExceptionType>``."""
    return f"parse_exception:{type(exc).__name__}"


def parse_completion(task: Any, completion: str, sample: Any, family: Any) -> tuple[Any, str | None]:
    """(prediction, None) for a completion that obeys the format rule and parses, else
    (None, reason) with ``reason`` a ParseError key or :func:`parse_exception_reason`.
    Never raises on model output."""
    thought, answer = split_completion(completion)
    try:
        return task.parse(check_format(thought, answer), sample, family), None
    except ParseError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - counted, never raised
        return None, parse_exception_reason(e)
