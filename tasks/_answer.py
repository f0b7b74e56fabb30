"""What the answer-checking tasks (vqa, math, code) share: prompt filling, chat messages and the
reward skeleton (format check -> parse -> score -> weighted total).

Reward convention (the same as the geometric tasks): the ``format`` part is 1 when the completion
obeys the format rule (one ``<think>`` block, one ``<answer>`` block) AND the answer parses;
otherwise the whole reward is 0 and ``Reward.reason`` names the failure (``bad_think``,
``no_answer``, ``empty``, or the task's parse reason).  Then
``total = w_task * task + w_format * format`` (options ``w_task`` = 0.9, ``w_format`` = 0.1).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from vlm_grpo_ma.tasks._geometric import answer_inner, fill_prompt
from vlm_grpo_ma.tasks.common import ANSWER_SLACK, check_format, combine
from vlm_grpo_ma.task import ParseError, Reward, Task, load_prompt

log = logging.getLogger(__name__)

__all__ = ["AnswerTask", "answer_inner", "fill_prompt"]


class AnswerTask(Task):
    """Base of the answer-checking tasks.  Options: ``w_task`` (0.9), ``w_format`` (0.1),
    ``max_answer_chars`` (the class's ``MAX_ANSWER_CHARS``: longest answer text read; a longer
    answer segment is refused as ``too_long`` before any parsing)."""

    #: default of the ``max_answer_chars`` option (None: the subclass overrides ``answer_cap``)
    MAX_ANSWER_CHARS: int | None = 1000

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.w_task = float(self.options.get("w_task", 0.9))
        self.w_format = float(self.options.get("w_format", 0.1))
        if self.MAX_ANSWER_CHARS is not None:
            self.max_answer_chars = int(self.options.get("max_answer_chars", self.MAX_ANSWER_CHARS))
        self._templates: dict[str | None, str] = {}

    # --- prompts -------------------------------------------------------------------------
    def prompt_variant(self, sample) -> str | None:
        """``prompts/<name>.<variant>.txt`` to use for ``sample`` (None: ``<name>.txt``)."""
        return None

    def template(self, variant: str | None = None) -> str:
        if variant not in self._templates:
            self._templates[variant] = load_prompt(self.name, variant)
        return self._templates[variant]

    def prompt_fields(self, sample, family) -> dict[str, Any]:
        return dict(sample.prompt)

    def prompt_text(self, sample, family) -> str:
        tpl = self.template(self.prompt_variant(sample))
        return fill_prompt(tpl, self.prompt_fields(sample, family), where=f"sample {sample.id!r}").strip()

    def messages(self, sample, family) -> list[dict]:
        """One user turn: the sample's images (if any) then the instruction text."""
        content = [{"type": "image", "image": img} for img in sample.images]
        content.append({"type": "text", "text": self.prompt_text(sample, family)})
        return [{"role": "user", "content": content}]

    # --- scoring -------------------------------------------------------------------------
    def score(self, prediction: Any, sample) -> float:
        """Task score in [0, 1] of a parsed prediction."""
        raise NotImplementedError

    def check_sample(self, sample) -> None:
        """Raise ValueError naming the sample when its ground truth is unusable (bad data, not
        the model's fault: this is called before the model-output guard)."""

    def answer_cap(self) -> int:
        """Longest answer segment (the text after ``</think>``) read at all, in characters."""
        return self.max_answer_chars + ANSWER_SLACK

    def check_length(self, answer_text: Any) -> None:
        """ParseError ``too_long`` when ``answer_text`` is over :meth:`answer_cap`: called first
        by ``parse`` too, for callers that parse without :func:`check_format` (benchmarks)."""
        if isinstance(answer_text, str) and len(answer_text) > self.answer_cap():
            raise ParseError("too_long", f"{len(answer_text)} characters > {self.answer_cap()}")

    def zero_parts(self) -> dict[str, float]:
        return {k: 0.0 for k in self.reward_parts}

    def reward_from_score(self, task_score: float) -> Reward:
        parts = {"format": 1.0, self.reward_parts[1]: float(task_score)}
        return Reward(combine(task_score, True, self.w_task, self.w_format), parts)

    def parse_completion(self, thought: str, answer: str, sample, family) -> tuple[Any, Reward | None]:
        """(prediction, None) for a well-formed completion, else (None, zero Reward with reason)."""
        try:
            inner = check_format(thought, answer, max_chars=self.answer_cap())
            return self.parse(inner, sample, family), None
        except ParseError as e:
            return None, Reward(0.0, self.zero_parts(), reason=e.reason)
        except Exception as e:  # a bug, not the model's fault: never crash a run, but say so
            log.warning("%s parse failed on sample %r: %r", self.name, sample.id, e)
            return None, Reward(0.0, self.zero_parts(), reason="parse_error")

    def reward(self, thought: str, answer: str, sample, family) -> Reward:
        self.check_sample(sample)
        prediction, failed = self.parse_completion(thought, answer, sample, family)
        if failed is not None:
            return failed
        try:
            task_score = float(self.score(prediction, sample))
        except ParseError as e:
            return Reward(0.0, self.zero_parts(), reason=e.reason)
        # any other exception is a bug: vlm_grpo_ma.reward_guard.RewardGuard, through which the
        # trainer and the benchmark call every reward, scores it 0 and counts it
        return self.reward_from_score(task_score)

    def reward_batch(self, items: Sequence[tuple[str, str, Any, Any]]) -> list[Reward]:
        """``reward`` for many ``(thought, answer, sample, family)``; tasks whose scoring is
        slow (code) override this to score in parallel."""
        return [self.reward(*it) for it in items]
