"""The one reward guard (``vlm_grpo_ma.reward_guard``): a raising task, an out-of-range or NaN
total, a batch path that raises or miscounts -- each pair costs 0 with reason ``reward_error``,
counted, logged once per exception type; good pairs keep their reward."""

from __future__ import annotations

import logging

from vlm_grpo_ma.reward_guard import REWARD_ERROR, RewardGuard
from vlm_grpo_ma.task import Reward


class _Task:
    name = "toy"
    reward_parts = ("format", "score")

    def __init__(self, behaviour="ok"):
        self.behaviour = behaviour
        self.batch_calls = 0

    def reward(self, thought, answer, sample, family):
        if self.behaviour == "raise" or answer == "boom":
            return 1 / 0
        if self.behaviour == "nan":
            return Reward(float("nan"), {"format": 1.0, "score": 1.0})
        if answer == "big":
            return Reward(1.5, {"format": 1.0, "score": 1.0})
        return Reward(0.75, {"format": 1.0, "score": 0.5})


class _BatchTask(_Task):
    def reward_batch(self, items):
        self.batch_calls += 1
        if self.behaviour == "short":
            return [self.reward(*it) for it in items][:-1]
        return [self.reward(*it) for it in items]


def test_an_exception_scores_zero_is_counted_and_logged_once(caplog):
    fn = RewardGuard(_Task("raise"))
    with caplog.at_level(logging.WARNING):
        rs = [fn("<think>a</think>", "<answer>1</answer>", None, None) for _ in range(3)]
    assert [r.total for r in rs] == [0.0, 0.0, 0.0]
    assert rs[0].parts == {"format": 0.0, "score": 0.0} and rs[0].reason == REWARD_ERROR
    assert fn.errors == 3 and fn.error_types == {"ZeroDivisionError": 3}
    assert sum("ZeroDivisionError" in r.message for r in caplog.records) == 1


def test_totals_outside_the_unit_interval_score_zero():
    nan = RewardGuard(_Task("nan"))
    assert nan("t", "a", None, None).total == 0.0 and nan.errors == 1
    big = RewardGuard(_Task())
    r = big("t", "big", None, None)
    assert (r.total, r.reason, big.errors) == (0.0, REWARD_ERROR, 1)
    ok = RewardGuard(_Task())
    assert ok("t", "a", None, None).total == 0.75 and ok.errors == 0


def test_batch_uses_reward_batch_and_checks_each_result():
    task = _BatchTask()
    fn = RewardGuard(task)
    rs = fn.batch([("t", "a", None, None), ("t", "big", None, None), ("t", "a", None, None)])
    assert task.batch_calls == 1
    assert [r.total for r in rs] == [0.75, 0.0, 0.75] and rs[1].reason == REWARD_ERROR and fn.errors == 1


def test_a_raising_or_miscounting_batch_falls_back_pair_by_pair():
    fn = RewardGuard(_BatchTask())
    rs = fn.batch([("t", "a", None, None), ("t", "boom", None, None)])  # reward_batch raises on "boom"
    assert [r.total for r in rs] == [0.75, 0.0] and fn.errors == 1  # only the bad pair pays
    short = RewardGuard(_BatchTask("short"))
    assert [r.total for r in short.batch([("t", "a", None, None)] * 2)] == [0.75, 0.75]
    assert RewardGuard(_Task()).batch([]) == []
    assert [r.total for r in RewardGuard(_Task()).batch([("t", "a", None, None)])] == [0.75]  # no reward_batch
