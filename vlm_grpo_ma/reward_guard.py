"""The one guard between a task's reward function and everything that calls it.

Model output must never crash a run and never earn a reward it did not deserve.  A task turns
malformed output into a 0 reward with a reason (its ``ParseError`` key); what is left is a bug in
the task (or in a third-party plugin), bad data its ``check_sample`` rejects, or a reward outside
[0, 1].  :class:`RewardGuard` scores each of those 0 with the reason ``reward_error``, logs it
once per exception type and counts it.  The trainer (``training/rl.py``) and the benchmark runner
(``bench/engine.py``) call task rewards only through it.

The batch path: :meth:`RewardGuard.batch` calls ``task.reward_batch`` where the task has one (the
code task scores its sandbox runs in parallel there) and falls back to pair-by-pair scoring when
the batch call itself raises, so one bad pair costs only its own reward.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Sequence

from vlm_grpo_ma.task import Reward

__all__ = ["REWARD_ERROR", "RewardGuard"]

log = logging.getLogger(__name__)

#: ``Reward.reason`` of a pair whose reward function raised or returned an invalid total
REWARD_ERROR = "reward_error"

RewardItem = tuple[str, str, Any, Any]  # (thought, answer, sample, family)


class RewardGuard:
    """``task.reward`` / ``task.reward_batch`` that never raise and never return a total outside [0, 1].

    Attributes:
        task: the guarded task.
        errors: number of pairs scored 0 by the guard (saved in RL checkpoints).
        error_types: those pairs counted by exception type name.
    """

    def __init__(self, task: Any):
        self.task = task
        self.errors = 0
        self.error_types: Counter = Counter()
        self._logged: set[str] = set()

    def __call__(self, thought: str, answer: str, sample: Any, family: Any) -> Reward:
        try:
            return self._checked(self.task.reward(thought, answer, sample, family))
        except Exception as e:
            return self._failed(e)

    def batch(self, items: Sequence[RewardItem]) -> list[Reward]:
        """Rewards of ``(thought, answer, sample, family)`` items, in order, through the task's
        ``reward_batch`` where it has one."""
        items = list(items)
        reward_batch = getattr(self.task, "reward_batch", None)
        if reward_batch is None or not items:
            return [self(*it) for it in items]
        try:
            rewards = list(reward_batch(items))
            if len(rewards) != len(items):
                raise ValueError(f"reward_batch returned {len(rewards)} rewards for {len(items)} items")
        except Exception as e:
            self._log_once(e, "reward_batch")
            return [self(*it) for it in items]  # one bad pair must not cost the others their reward
        out = []
        for r in rewards:
            try:
                out.append(self._checked(r))
            except Exception as e:
                out.append(self._failed(e))
        return out

    # ------------------------------------------------------------------------------------------
    def _checked(self, r: Reward) -> Reward:
        total = float(r.total)
        if not (0.0 <= total <= 1.0):  # NaN fails both comparisons
            raise ValueError(f"reward total {r.total!r} outside [0, 1]")
        return r

    def _failed(self, e: Exception) -> Reward:
        self.errors += 1
        self.error_types[type(e).__name__] += 1
        self._log_once(e, "reward")
        return Reward(0.0, {p: 0.0 for p in getattr(self.task, "reward_parts", ("format",))}, reason=REWARD_ERROR)

    def _log_once(self, e: Exception, where: str) -> None:
        key = f"{where}:{type(e).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("task %r: %s raised %s: %s (scored 0; logged once per exception type)",
                        getattr(self.task, "name", "?"), where, type(e).__name__, e)
