"""Code task: code extraction, parse failures, reward = fraction of tests passed (assert and
stdin/stdout tests), batch reward, metrics by hand, fuzzing, SFT targets per family."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_grpo_ma.tasks.code import CodeTask, extract_code
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.models.family import ModelFamily
from vlm_grpo_ma.task import ParseError, get_task

FAMILIES = [
    ModelFamily.from_model_type("qwen2_vl"),
    ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056),
    ModelFamily.from_model_type("qwen3_vl", patch_size=16, merge_size=2, min_pixels=4096, max_pixels=16777216),
]
FAM = FAMILIES[0]
THINK = "<think>plan</think>"
TESTS = ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6", "assert f(-1) == -2"]


@pytest.fixture(scope="module")
def task() -> CodeTask:
    return CodeTask(timeout_s=3)


def sample(tests=TESTS, sid="c") -> Sample:
    return Sample(id=sid, task="code", prompt={"problem": "double x"}, target={"tests": tests})


def fenced(code: str) -> str:
    return f"<answer>```python\n{code}\n```</answer>"


@pytest.mark.parametrize(
    "text, code",
    [
        ("```python\nx = 1\n```", "x = 1"),
        ("Here:\n```py\nx = 1\n```\nDone.", "x = 1"),
        ("```\nx = 1\n```", "x = 1"),
        ("```text\nnotes\n```\n```python\nx = 2\n```", "x = 2"),
        ("```python\nx = 1\n```\nbetter:\n```python\nx = 2\n```", "x = 2"),  # the last block runs
        ("```python\nx = 1\n```\n```\nx = 2\n```", "x = 1"),  # a python block beats an untagged one
        ("```python\nx = 1\n", ""),  # unterminated fence: no code (as open-r1)
        ("x = 3", ""),  # bare code: no code by default
        ("```cpp\nint x;\n```", ""),  # another language never runs
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_extract_code_options():
    text = "```python\nx = 1\n```\nbetter:\n```python\nx = 2\n```"
    assert extract_code(text, "first") == "x = 1"
    assert extract_code("\n\nx = 3\n\n", bare=True) == "x = 3"
    with pytest.raises(ValueError):
        extract_code(text, "middle")


@pytest.mark.parametrize(
    "answer, reason",
    [("<answer>```python\n\n```</answer>", "empty"), ("<answer>   </answer>", "empty"),
     (fenced("def f(x) return x"), "syntax_error"), (fenced("x = '\0'"), "syntax_error"),
     (fenced("(" * 5000 + ")" * 5000), "syntax_error"), (fenced("x = 1\n" * 5000), "too_long"),
     ("<answer>def f(x): return 2*x", "no_answer"), ("<answer>def f(x):\n    return 2 * x</answer>", "no_code")],
)
def test_malformed_answers_score_zero_with_reason(task, answer, reason):
    r = task.reward(THINK, answer, sample(), FAM)
    assert r.total == 0.0 and r.reason == reason and r.parts == {"format": 0.0, "tests": 0.0}


def test_reward_is_fraction_of_tests_passed(task):
    s = sample()
    assert task.reward(THINK, fenced("def f(x):\n    return 2 * x"), s, FAM).total == pytest.approx(1.0)
    # right for positive x only: 3 of 4 tests
    r = task.reward(THINK, fenced("def f(x):\n    return abs(2 * x)"), s, FAM)
    assert r.parts == {"format": 1.0, "tests": 0.75} and r.total == pytest.approx(0.9 * 0.75 + 0.1)
    r = task.reward(THINK, fenced("def f(x):\n    return x"), s, FAM)
    assert r.parts["tests"] == 0.0 and r.total == pytest.approx(0.1) and r.reason is None
    r = task.reward(THINK, fenced("raise SystemExit(0)"), s, FAM)
    assert r.parts["tests"] == 0.0


def test_stdin_stdout_tests(task):
    s = sample(tests=[{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1", "output": "0"}, "assert True"])
    code = "import sys\n\ndef main():\n    a, b = map(int, sys.stdin.read().split())\n    print(a + b)\n\nif __name__ == '__main__':\n    main()"
    assert task.reward(THINK, fenced(code), s, FAM).parts["tests"] == 1.0
    r = task.reward(THINK, fenced("print(5)"), s, FAM)
    assert r.parts["tests"] == pytest.approx(2 / 3)  # first stdin test and the assert


def test_reward_batch_matches_reward():
    task = CodeTask(timeout_s=4)  # generous: under CPU load a Python start-up alone can take ~1 s
    s = sample()
    answers = [fenced("def f(x):\n    return 2 * x"), fenced("def f(x):\n    return abs(2 * x)"),
               "<answer></answer>", fenced("def f(x):\n    while True: pass")]
    items = [(THINK, a, s, FAM) for a in answers]
    batch = task.reward_batch(items)
    single = [task.reward(*it) for it in items]
    assert [(r.total, r.parts, r.reason) for r in batch] == [(r.total, r.parts, r.reason) for r in single]
    assert [r.parts["tests"] for r in batch] == [1.0, 0.75, 0.0, 0.0]


def test_metrics_hand_computed(task):
    samples = [sample(), sample(), sample()]
    preds = ["def f(x):\n    return 2 * x", "def f(x):\n    return abs(2 * x)", None]
    m = task.metrics(preds, samples)
    assert m["pass@1"] == pytest.approx(1 / 3)
    assert m["test_pass_rate"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert m["parse_rate"] == pytest.approx(2 / 3)
    assert math.isnan(task.metrics([], [])["pass@1"])


def test_bad_tests_raise_naming_the_sample(task):
    with pytest.raises(ValueError, match="'no-tests'"):
        task.reward(THINK, fenced("x = 1"), sample(tests=[], sid="no-tests"), FAM)
    with pytest.raises(ValueError, match=r"\[0\]"):
        task.reward(THINK, fenced("x = 1"), sample(tests=[42], sid="bad"), FAM)
    with pytest.raises(ValueError, match="solution"):
        task.sft_target(sample(), FAM)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=60), st.sampled_from(["```", "```python", "``````", "0", "pass", "f = 1",
                                                             "def f(x): return x\n```\n```python\n(("])))
def test_fuzz_reward_never_raises(task, text):
    for answer in (f"<answer>{text}</answer>", text, f"<answer>```python\n{text}\n```</answer>"):
        r = task.reward(THINK, answer, sample(), FAM)
        assert 0.0 <= r.total <= 1.0 and set(r.parts) == {"format", "tests"}
        if r.parts["format"] == 0.0:
            assert r.total == 0.0 and r.reason
    try:
        task.parse(text, sample(), FAM)
    except ParseError as e:
        assert e.reason


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_sft_target_scores_max_and_perturbed_less(family):
    t = get_task("code", timeout_s=3)
    samples = t.synthetic(4, seed=7)
    assert any(isinstance(x, dict) for s in samples for x in s.target["tests"])  # a stdin/stdout one
    items, bad = [], []
    for s in samples:
        target = t.sft_target(s, family)
        thought, _, rest = target.partition("</think>")
        assert rest.startswith("<answer>```python\n")
        items.append((thought + "</think>", rest, s, family))
        # perturb: every result is off by one
        wrong = rest.replace("return ", "return 1 + ").replace("print(", "print(1 + ")
        assert wrong != rest
        bad.append((thought + "</think>", wrong, s, family))
    assert [r.total for r in t.reward_batch(items)] == pytest.approx([1.0] * 4)
    assert all(r.total < 1.0 for r in t.reward_batch(bad))


def test_synthetic_is_deterministic():
    t = CodeTask()
    a, b = t.synthetic(8, seed=1), t.synthetic(8, seed=1)
    assert [(s.prompt, s.target) for s in a] == [(s.prompt, s.target) for s in b]
    assert [s.prompt for s in t.synthetic(8, seed=2)] != [s.prompt for s in a]
    assert all(s.images == [] for s in a)
