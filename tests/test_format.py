"""The core format rule and the thought/answer split (vlm_grpo_ma/format.py), by hand."""

from __future__ import annotations

import pytest

from vlm_grpo_ma.format import check_format, parse_completion, split_completion, split_tree_texts
from vlm_grpo_ma.task import ParseError


@pytest.mark.parametrize("thought_text, answer_text, want", [
    # Qwen2/2.5-VL: the stage-1 stop token "><" carries the "<" of "<answer>"
    ("<think>a.</think><", "answer>[1, 2]</answer>", ("<think>a.</think>", "<answer>[1, 2]</answer>")),
    ("<think>a</think>\n", "<answer>x</answer>", ("<think>a</think>", "\n<answer>x</answer>")),
    ("<think>a</think>", " <answer>x</answer>", ("<think>a</think>", " <answer>x</answer>")),
    # only the first </think> ends the thought; the rest is the answer's (and fails the rule there)
    ("<think>a</think></think>", "<answer>x</answer>", ("<think>a</think>", "</think><answer>x</answer>")),
    # no </think> in the thought: unchanged
    ("<think>never closed", "<answer>x</answer>", ("<think>never closed", "<answer>x</answer>")),
])
def test_split_tree_texts(thought_text, answer_text, want):
    assert split_tree_texts(thought_text, answer_text) == want
    if "</think>" in thought_text:
        assert split_tree_texts(thought_text, answer_text) == split_completion(thought_text + answer_text)


def test_split_completion_and_check_format():
    assert split_completion("<think>t</think><answer>a</answer>") == ("<think>t</think>", "<answer>a</answer>")
    assert split_completion("no tags") == ("no tags", "")
    assert check_format(*split_completion("<think>t</think>\n<answer> 42 </answer><|im_end|>")) == "42"
    for bad, reason in [("<think>t</think><", "no_answer"), ("<think>t", "bad_think"),
                        ("<think>t</think><answer> </answer>", "empty"),
                        ("<think>t</think><answer>1</answer><answer>2</answer>", "no_answer")]:
        with pytest.raises(ParseError) as e:
            check_format(*split_completion(bad))
        assert e.value.reason == reason, bad


class _Task:
    def __init__(self, exc=None):
        self.exc = exc

    def parse(self, inner, sample, family):
        if self.exc:
            raise self.exc
        return int(inner)


def test_parse_completion_never_raises_and_names_the_failure():
    ok = "<think>t</think><answer>7</answer>"
    assert parse_completion(_Task(), ok, None, None) == (7, None)
    assert parse_completion(_Task(), "<think>t</think>", None, None) == (None, "no_answer")
    assert parse_completion(_Task(ParseError("bad_number")), ok, None, None) == (None, "bad_number")
    assert parse_completion(_Task(KeyError("x")), ok, None, None) == (None, "parse_exception:KeyError")
