"""Python programming problems scored by running the solution against tests in a sandbox.

Sample: ``prompt = {"problem": str}``; ``target = {"tests": [...], "solution": str}``.
``tests`` (see :mod:`vlm_grpo_ma.sandbox`) is a list whose items are either assert statements
(strings such as ``"assert f(2) == 4"``: single judged asserts are evaluated in the solution's
namespace and compared by the caller; other statements run in a separate tester process that
calls the solution's functions by value) or stdin/stdout pairs
(``{"input": "1 2\\n", "output": "3\\n"}``, the solution runs as a program); both kinds may be
mixed.  ``solution`` (optional) is a reference solution, used by the SFT target.
Images are optional (``sample.images`` may be empty).

Answer (inside ``<answer>``): the code in a closed ```` ```python ```` fence (:func:`extract_code`).
Option ``code_block`` = ``"last"`` (default, as huggingface/open-r1 ``src/open_r1/rewards.py``
``extract_code`` and most peers: a draft followed by the final version runs the final one) or
``"first"``: which ``python``/``py``/``python3`` block runs (without one: the same choice among
fences with no language tag; fences of other languages never run).  Option ``bare_code`` =
False (default, as open-r1: an answer without a closed fence holds no code, ``no_code``) or True
(the whole answer is the code).  The same rule feeds the reward and the metrics.  Parse
failures: ``no_code``, ``empty``, ``too_long`` (the answer segment is over ``max_code_chars`` +
1000 characters, refused before any parsing; or the code is over ``max_code_chars``),
``syntax_error``.  The model's text is never compiled in the caller (``"lambda:" * 2850`` takes
seconds to compile): the sandbox compiles it under its own limits and reports a syntax error,
which scores like a parse failure.

Reward (parts ``format``, ``tests``): the fraction of tests passed in the sandbox.
Metrics: ``pass@1`` (share of samples whose solution passes every test), ``test_pass_rate``
(mean fraction of tests passed) and ``parse_rate``.  When the benchmark draws n > 1 completions
per problem, ``pass@k`` for k in ``pass_k`` (option, default (1, 10, 100): human-eval's, each k
reported only when every problem has n >= k) is openai/human-eval's unbiased estimator
(:func:`estimate_pass_at_k`, ``human_eval/evaluation.py``), and the first completion's share is
kept as ``pass@1_first_completion``.

The sandbox's protections and limits are documented in docs/SANDBOX.md; options
``timeout_s`` (wall clock per process, default 3.0: human-eval's ``check_correctness`` limit;
set it per suite with ``task_options``), ``memory_mb`` (512), ``max_workers`` (4, the pool of
:meth:`CodeTask.reward_batch` and :meth:`CodeTask.metrics`) and ``isolation`` (``"auto"``) set it up.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Sequence

from vlm_grpo_ma.tasks import _synthetic as syn
from vlm_grpo_ma.tasks._answer import AnswerTask, answer_inner
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.sandbox import Sandbox, SandboxLimits, validate_tests
from vlm_grpo_ma.task import ParseError, Reward

__all__ = ["CodeTask", "estimate_pass_at_k", "extract_code"]

#: a closed fence tagged python / py / python3 (open-r1's pattern is ```python\n(.*?)```)
_PY_FENCE_RE = re.compile(r"```(?:python3|python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
#: any closed fence, paired in order: (language tag, body)
_ANY_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)


def extract_code(text: str, block: str = "last", bare: bool = False) -> str:
    """The code of an answer: among the closed fenced blocks tagged ``python``, ``py`` or
    ``python3`` (any case) the ``block`` = ``"last"`` or ``"first"`` one; without such a
    block the same choice among untagged fences; without either, the whole text if ``bare``
    else ``""``.  Surrounding blank lines are stripped.

    With the defaults this runs what huggingface/open-r1's ``extract_code``
    (``src/open_r1/rewards.py``: the last ```` ```python\\n...``` ```` match, else ``""``) runs,
    and also accepts the other python tags and untagged fences."""
    if block not in ("last", "first"):
        raise ValueError(f"code block must be 'last' or 'first', got {block!r}")
    bodies = _PY_FENCE_RE.findall(text)
    if not bodies:
        bodies = [body for tag, body in _ANY_FENCE_RE.findall(text) if not tag.strip()]
    if bodies:
        return (bodies[-1] if block == "last" else bodies[0]).strip("\n")
    return text.strip("\n") if bare else ""


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (Chen et al., 2021;
    openai/human-eval ``human_eval/evaluation.py``): ``1 - C(n - c, k) / C(n, k)``, computed as
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``; 1.0 when ``n - c < k``.  Needs ``n >= k``."""
    if not 0 <= c <= n or k < 1 or n < k:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class CodeTask(AnswerTask):
    """Code generation scored in the sandbox (see the module docstring).

    Options: ``w_task`` (0.9), ``w_format`` (0.1), ``code_block`` (``"last"``), ``bare_code``
    (False), ``pass_k`` ((1, 10, 100)), ``timeout_s`` (3.0), ``cpu_s`` (= timeout_s),
    ``memory_mb`` (512), ``max_processes`` (16), ``output_kb`` (1024), ``max_workers`` (4),
    ``isolation`` (``"auto"``), ``max_code_chars`` (20000).
    """

    name = "code"
    reward_parts = ("format", "tests")
    MAX_ANSWER_CHARS = None  # the cap follows max_code_chars (answer_cap)

    def __init__(self, **options: Any):
        super().__init__(**options)
        timeout = float(self.options.get("timeout_s", 3.0))
        self.limits = SandboxLimits(
            wall_timeout_s=timeout,
            cpu_time_s=float(self.options.get("cpu_s", timeout)),
            memory_bytes=int(self.options.get("memory_mb", 512)) * 2**20,
            max_processes=int(self.options.get("max_processes", 16)),
            output_bytes=int(self.options.get("output_kb", 1024)) * 1024,
        )
        self.max_workers = int(self.options.get("max_workers", 4))
        self.isolation = str(self.options.get("isolation", "auto"))
        self.max_code_chars = int(self.options.get("max_code_chars", 20_000))
        self.code_block = str(self.options.get("code_block", "last"))
        if self.code_block not in ("last", "first"):
            raise ValueError(f"code option code_block must be 'last' or 'first', got {self.code_block!r}")
        self.bare_code = bool(self.options.get("bare_code", False))
        self.pass_k = tuple(int(k) for k in self.options.get("pass_k", (1, 10, 100)))
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()

    @property
    def sandbox(self) -> Sandbox:
        """The task's sandbox (created on first use)."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.limits, isolation=self.isolation, max_workers=self.max_workers)
            return self._sandbox

    def tests(self, sample: Sample) -> list:
        return validate_tests(sample.target.get("tests"), where=f"code sample {sample.id!r}: target['tests']")

    def check_sample(self, sample: Sample) -> None:
        self.tests(sample)

    def sft_target(self, sample: Sample, family) -> str:
        sol = sample.target.get("solution")
        if not isinstance(sol, str) or not sol.strip():
            raise ValueError(f"code sample {sample.id!r}: target['solution'] (reference code) is needed for SFT")
        reasoning = sample.meta.get("reasoning") or "I write a function that does what the problem asks."
        return format_sft_target(reasoning, f"```python\n{sol.strip()}\n```")

    def parse(self, answer_text: str, sample: Sample, family) -> str:
        self.check_length(answer_text)
        text = answer_inner(answer_text) if isinstance(answer_text, str) else ""
        if not text.strip():
            raise ParseError("empty", "empty answer")
        code = extract_code(text, self.code_block, self.bare_code)
        if not code.strip():
            if not self.bare_code and "```" not in text:
                raise ParseError("no_code", "no closed ```python fenced block (option bare_code: true runs bare code)")
            raise ParseError("empty", "no code")
        if len(code) > self.max_code_chars:
            raise ParseError("too_long", f"{len(code)} characters > {self.max_code_chars}")
        return code  # compiled in the sandbox (see score)

    # --- the sandbox call and the length cap (kept apart from answer parsing) -------------
    def answer_cap(self) -> int:
        """Longest answer segment read at all (characters): the code cap plus room for the
        tags and the fence."""
        return self.max_code_chars + 1000

    @staticmethod
    def judged(report) -> float:
        """The task score of a sandbox report; ParseError ``syntax_error`` when the sandbox
        found that the code does not compile (scored like any parse failure)."""
        if report.reason == "syntax_error":
            raise ParseError("syntax_error", "the code does not compile")
        return report.fraction

    def score(self, prediction: Any, sample: Sample) -> float:
        return self.judged(self.sandbox.run_tests(prediction, self.tests(sample)))

    def reward_batch(self, items: Sequence[tuple[str, str, Any, Any]]) -> list[Reward]:
        """``reward`` of many ``(thought, answer, sample, family)`` with the sandbox runs on a
        pool of ``max_workers`` threads (order kept)."""
        results: list[Reward | None] = [None] * len(items)
        jobs, where = [], []
        for k, (thought, answer, sample, family) in enumerate(items):
            self.check_sample(sample)
            code, failed = self.parse_completion(thought, answer, sample, family)
            if failed is not None:
                results[k] = failed
            else:
                jobs.append((code, self.tests(sample)))
                where.append(k)
        for k, rep in zip(where, self.sandbox.run_many(jobs, self.max_workers)):
            try:
                results[k] = self.reward_from_score(self.judged(rep))
            except ParseError as e:
                results[k] = Reward(0.0, self.zero_parts(), reason=e.reason)
        return results  # type: ignore[return-value]

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        if not samples:
            return {"pass@1": math.nan, "test_pass_rate": math.nan, "parse_rate": math.nan}
        jobs = [(p, self.tests(s)) for p, s in zip(predictions, samples) if p is not None]
        reports = iter(self.sandbox.run_many(jobs, self.max_workers))
        fractions, passed, parsed = [], [], []
        for p in predictions:
            rep = None if p is None else next(reports)
            ok = rep is not None and rep.reason != "syntax_error"
            fractions.append(rep.fraction if ok else 0.0)
            passed.append(float(ok and rep.all_passed))
            parsed.append(float(ok))
        return {
            "pass@1": sum(passed) / len(passed),
            "test_pass_rate": sum(fractions) / len(fractions),
            "parse_rate": sum(parsed) / len(parsed),
        }

    # --- pass@k over several completions (used by the benchmark engine) -------------------
    @staticmethod
    def completion_passed(parts: dict[str, float]) -> bool:
        """Whether a completion's reward parts say it passed every test."""
        return float(parts.get("tests", 0.0)) >= 1.0

    def pass_at_k_metrics(self, n: Sequence[int], c: Sequence[int]) -> dict[str, float]:
        """``pass@k`` (mean over problems of :func:`estimate_pass_at_k`) for each k of
        ``pass_k`` with ``k <= min(n)``; ``n[i]`` completions of problem i, ``c[i]`` correct."""
        if not n:
            return {}
        return {f"pass@{k}": sum(estimate_pass_at_k(ni, ci, k) for ni, ci in zip(n, c)) / len(n)
                for k in self.pass_k if min(n) >= k}

    # --- data ----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """Small deterministic function-writing problems (parameters drawn per sample) with
        assert tests, and every fourth one a stdin/stdout program; each with a reference
        solution.  Text only (no images)."""
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            problem, solution, tests, reasoning = _PROBLEMS[i % len(_PROBLEMS)](rng)
            out.append(
                syn.synthetic_sample(
                    self.name, seed, i, prompt={"problem": problem},
                    target={"tests": tests, "solution": solution}, reasoning=reasoning,
                )
            )
        return out


# ---- synthetic problem makers: rng -> (problem, solution, tests, reasoning) ------------------
def _poly(rng):
    a, b, c = rng.randint(1, 9), rng.randint(-9, 9), rng.randint(-9, 9)
    expr = f"{a} * x * x + ({b}) * x + ({c})"
    xs = rng.sample(range(-10, 11), 4)
    tests = [f"assert f({x}) == {a * x * x + b * x + c}" for x in xs]
    text = f"{a}*x**2 {'-' if b < 0 else '+'} {abs(b)}*x {'-' if c < 0 else '+'} {abs(c)}"
    return (f"Write a Python function f(x) that returns {text} for an integer x.",
            f"def f(x):\n    return {expr}\n", tests,
            f"f evaluates the polynomial {text} directly.")


def _digit_sum(rng):
    k = rng.randint(2, 9)
    xs = [rng.randint(0, 10**6) for _ in range(4)]
    tests = [f"assert g({x}) == {sum(int(d) for d in str(x)) * k}" for x in xs]
    return (f"Write a Python function g(n) that returns {k} times the sum of the decimal digits of "
            f"the non-negative integer n.",
            f"def g(n):\n    return {k} * sum(int(d) for d in str(n))\n", tests,
            f"Sum the digits of str(n) and multiply by {k}.")


def _count_char(rng):
    ch = rng.choice("aeiou")
    words = ["banana", "education", "queue", "rhythm", "aaa", "", "onomatopoeia", "sequoia"]
    ws = rng.sample(words, 4)
    tests = [f"assert count({w!r}) == {w.count(ch)}" for w in ws]
    return (f"Write a Python function count(s) that returns how many times the letter {ch!r} "
            f"occurs in the string s.",
            f"def count(s):\n    return s.count({ch!r})\n", tests,
            f"str.count gives the number of occurrences of {ch!r}.")


def _stdin_sum(rng):
    k = rng.randint(2, 9)
    cases = [[rng.randint(-50, 50) for _ in range(rng.randint(1, 5))] for _ in range(3)]
    tests = [{"input": " ".join(map(str, xs)) + "\n", "output": f"{k * sum(xs)}\n"} for xs in cases]
    return (f"Write a Python program that reads integers separated by spaces from standard input "
            f"and prints {k} times their sum.",
            f"import sys\n\nnumbers = [int(t) for t in sys.stdin.read().split()]\nprint({k} * sum(numbers))\n",
            tests, f"Read all integers from stdin, sum them and print {k} times the sum.")


_PROBLEMS = (_poly, _digit_sum, _count_char, _stdin_sum)
