"""Every task refuses an over-long answer as ``too_long`` BEFORE any parsing (issue 12: a 1 MiB
vqa answer took 11-18 s to score); the cap follows the task's own limit on its answer text."""

from __future__ import annotations

import pytest

from vlm_grpo_ma.task import get_task
from vlm_grpo_ma.tasks.common import ANSWER_SLACK, check_format

TASKS = ["detection", "affordance", "trajectory", "vqa", "math", "code"]
THINK = "<think>t</think>"


@pytest.mark.parametrize("name", TASKS)
def test_a_megabyte_answer_is_refused_before_parsing(name, monkeypatch):
    task = get_task(name)
    sample = task.synthetic(1, seed=0)[0]

    def must_not_parse(*a, **k):
        raise AssertionError("parse reached with an over-long answer")

    monkeypatch.setattr(task, "parse", must_not_parse)
    r = task.reward(THINK, "<answer>" + "1" * 2**20 + "</answer>", sample, None)
    assert r.total == 0.0 and r.reason == "too_long" and set(r.parts.values()) == {0.0}


@pytest.mark.parametrize("name", TASKS)
def test_an_answer_at_the_cap_is_still_read(name):
    """The cap is not tighter than the task's own limit: an answer just under it is parsed
    (and fails or scores on its merits, not as ``too_long``)."""
    task = get_task(name)
    sample = task.synthetic(1, seed=0)[0]
    cap = task.answer_cap() if hasattr(task, "answer_cap") else None
    if cap is None:  # the geometric tasks: the parser's own MAX_TEXT
        from vlm_grpo_ma.tasks._parsing import MAX_TEXT

        cap = MAX_TEXT + ANSWER_SLACK
    body = " " * (cap - len("<answer>x</answer>") - 1) + "x"
    r = task.reward(THINK, f"<answer>{body}</answer>", sample, None)
    assert r.reason != "too_long"


@pytest.mark.parametrize("name", ["vqa", "code", "math"])
def test_parse_called_directly_is_capped_too(name):
    """Benchmarks call ``parse`` without ``check_format``: the cap holds there as well."""
    from vlm_grpo_ma.task import ParseError

    task = get_task(name)
    sample = task.synthetic(1, seed=0)[0]
    with pytest.raises(ParseError) as e:
        task.parse("x" * 2**20, sample, None)
    assert e.value.reason == "too_long"


def test_check_format_cap():
    from vlm_grpo_ma.task import ParseError

    assert check_format(THINK, "<answer>ok</answer>", max_chars=19) == "ok"
    with pytest.raises(ParseError) as e:
        check_format(THINK, "<answer>ok</answer>", max_chars=18)
    assert e.value.reason == "too_long"
