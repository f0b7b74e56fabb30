"""Math word problems checked with math-verify.

Sample: ``prompt = {"question": str}``; ``target = {"answer": str}`` (LaTeX or plain:
``"\\frac{7}{12}"``, ``"0.5"``, ``"3"``); ``meta["reasoning"]`` (optional) is the worked solution
of the SFT target.  Images are optional (``sample.images`` may be empty).

Answer (inside ``<answer>``): the final result, plain or LaTeX (``7/12``, ``\\frac{7}{12}``,
``$\\frac{7}{12}$``, ``\\boxed{7/12}``, ``x = 5``).

Checking: ``math_verify.parse`` reads gold and prediction (LaTeX in ``$...$`` or ``\\boxed{}``
and plain expressions; an answer with a backslash that yields nothing is parsed again wrapped in
``$...$`` so that bare ``\\dfrac{3}{4}`` works, while prose never becomes a product of symbols),
then ``math_verify.verify(gold, prediction)`` compares them
symbolically and numerically (``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree).

Time: math-verify (and sympy under it) can run for minutes on a short input
(``\\binom{10^{9}}{10^{5}}``, ``\\Gamma(10^{10})``), and its own ``signal.alarm`` timeouts work only
in the main thread.  So :class:`MathTask` never runs it in the caller: every parse and comparison
goes to a worker process (:mod:`vlm_grpo_ma.tasks._math_worker`, a pool shared by all threads)
that is killed when it does not answer within ``deadline_s`` (default ``2 * timeout_s + 1``);
the answer then scores 0 with reason ``timeout``.  This bounds the time of a reward on any thread.
In the worker math-verify runs in its main thread with its own timeouts on (``timeout_s``,
default 3 s, for parsing and for each comparison).  Guards before that: answers longer than
``max_answer_chars`` (default 500) are refused (``too_long``) before anything is parsed; a
parsed prediction with a power whose exponent is itself a power or exceeds ``max_exponent``
(10000) in size is refused (``too_complex``: ``10^10^10^10``); any exception inside math-verify
scores 0 with reason ``math_verify_error``.  The functions :func:`math_parse` and
:func:`math_equal` run in the calling process (the worker uses them): there only the main thread
is bounded in time.

Reward (parts ``format``, ``correct``): 1 when math-verify accepts the prediction, else 0.
Metrics: ``accuracy`` and ``parse_rate``.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any, Sequence

from PIL import Image, ImageDraw

from vlm_grpo_ma.tasks import _math_worker, _synthetic as syn
from vlm_grpo_ma.tasks._math_verify import _GOLD_CHECKED, math_compare, math_equal, math_parse
from vlm_grpo_ma.tasks._answer import AnswerTask, answer_inner
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.task import ParseError

log = logging.getLogger(__name__)

__all__ = ["MathTask", "latex_number", "math_compare", "math_equal", "math_parse"]


def latex_number(x: Fraction) -> str:
    """A rational as LaTeX: ``3``, ``-\\frac{7}{12}``."""
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


class MathTask(AnswerTask):
    """Math answers checked with math-verify (see the module docstring).

    Options: ``w_task`` (0.9), ``w_format`` (0.1), ``timeout_s`` (3), ``deadline_s``
    (``2 * timeout_s + 1``: the worker process is killed after it), ``max_answer_chars``
    (500), ``max_exponent`` (10000), ``with_images`` (False: synthetic samples are text only;
    True: the question is also drawn on an image), ``image_size`` ((224, 112)).
    """

    name = "math"
    reward_parts = ("format", "correct")
    MAX_ANSWER_CHARS = 500

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.timeout_s = self.options.get("timeout_s", 3)
        self.deadline_s = float(self.options.get("deadline_s", 2 * float(self.timeout_s or 3) + 1))
        self.max_exponent = int(self.options.get("max_exponent", 10_000))
        self.with_images = bool(self.options.get("with_images", False))
        self.image_size = tuple(self.options.get("image_size", (224, 112)))

    def check_sample(self, sample: Sample) -> None:
        a = sample.target.get("answer")
        if not isinstance(a, (str, int)) or isinstance(a, bool) or not str(a).strip():
            raise ValueError(f"math sample {sample.id!r}: target needs a non-empty 'answer' (str)")

    # --- math-verify in the worker process ----------------------------------------------
    def _ask(self, req: dict) -> dict:
        """The worker's reply, or ParseError ``timeout`` / ``math_verify_error``."""
        req = dict(req, timeout_s=self.timeout_s, max_exponent=self.max_exponent)
        try:
            reply = _math_worker.pool().call(req, self.deadline_s)
        except _math_worker.WorkerTimeout as e:
            raise ParseError("timeout", f"math-verify ran past {self.deadline_s:g} s") from e
        except _math_worker.WorkerFailed as e:
            raise ParseError("math_verify_error", str(e)) from e
        if "error" in reply:
            raise ParseError("math_verify_error", str(reply["error"]))
        return reply

    def gold(self, sample: Sample) -> str:
        """The reference answer text, checked once (cached per text) to be readable by
        math-verify; ValueError naming the sample otherwise."""
        self.check_sample(sample)
        answer = str(sample.target["answer"])
        key = (answer, self.timeout_s, self.max_exponent)
        reason = _GOLD_CHECKED.get(key, ...)
        if reason is ...:
            try:
                reason = self._ask({"op": "parse", "text": answer})["reason"]
            except ParseError as e:
                reason = e.reason
            _GOLD_CHECKED[key] = reason
        if reason is not None:
            raise ValueError(f"math sample {sample.id!r}: math-verify cannot read the reference "
                             f"answer {answer!r} ({reason})")
        return answer

    def sft_target(self, sample: Sample, family) -> str:
        self.check_sample(sample)
        reasoning = sample.meta.get("reasoning") or "I work the problem out step by step."
        return format_sft_target(reasoning, str(sample.target["answer"]))

    def parse(self, answer_text: str, sample: Sample, family) -> list:
        text = (answer_inner(answer_text) if isinstance(answer_text, str) else "").strip()
        if not text:
            raise ParseError("empty", "empty answer")
        if len(text) > self.max_answer_chars:
            raise ParseError("too_long", f"{len(text)} characters > {self.max_answer_chars}")
        reason = self._ask({"op": "parse", "text": text})["reason"]
        if reason is not None:
            raise ParseError(reason, f"math-verify cannot read {text[:40]!r}")
        return text  # the prediction is the answer text; the worker caches what it parsed

    def score(self, prediction: Any, sample: Sample) -> float:
        """1.0 when math-verify accepts ``prediction`` (the answer text); ParseError
        ``timeout`` when the worker had to be stopped."""
        reply = self._ask({"op": "equal", "gold": self.gold(sample), "pred": str(prediction)})
        if reply.get("equal") is not True and reply.get("reason") == "timeout":
            raise ParseError("timeout", "math-verify timed out comparing the answer")
        return float(reply.get("equal") is True)

    def reward(self, thought, answer, sample, family):
        self.gold(sample)  # bad reference data raises here, outside the model-output guard
        return super().reward(thought, answer, sample, family)

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        if not samples:
            return {"accuracy": math.nan, "parse_rate": math.nan}
        correct = [0.0 if p is None else self._score_or_zero(p, s) for p, s in zip(predictions, samples)]
        return {
            "accuracy": sum(correct) / len(correct),
            "parse_rate": sum(p is not None for p in predictions) / len(predictions),
        }

    def _score_or_zero(self, prediction: Any, sample: Sample) -> float:
        try:
            return self.score(prediction, sample)
        except ParseError:  # a timeout scores 0
            return 0.0

    # --- data ----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """Deterministic problems cycling through three kinds: ``arithmetic``
        (``a + b * c`` or ``(a - b) * c``), ``fraction`` (``p/q + r/s`` or ``p/q - r/s``, answer
        in lowest terms) and ``linear`` (``a x + b = c``, integer or fractional root); each with
        its worked reasoning."""
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            kind = ("arithmetic", "fraction", "linear")[i % 3]
            if kind == "arithmetic":
                a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 12)
                if rng.random() < 0.5:
                    question = f"Compute {a} + {b} * {c}."
                    value = Fraction(a + b * c)
                    reasoning = f"Multiplication first: {b} * {c} = {b * c}. Then {a} + {b * c} = {a + b * c}."
                else:
                    question = f"Compute ({a} - {b}) * {c}."
                    value = Fraction((a - b) * c)
                    reasoning = f"Parentheses first: {a} - {b} = {a - b}. Then {a - b} * {c} = {(a - b) * c}."
            elif kind == "fraction":
                p, q = rng.randint(1, 9), rng.randint(2, 9)
                r, s = rng.randint(1, 9), rng.randint(2, 9)
                op = rng.choice("+-")
                x, y = Fraction(p, q), Fraction(r, s)
                value = x + y if op == "+" else x - y
                den = q * s // math.gcd(q, s)
                num1, num2 = p * (den // q), r * (den // s)
                num = num1 + num2 if op == "+" else num1 - num2
                question = f"Compute {p}/{q} {op} {r}/{s}. Give the answer as a fraction in lowest terms."
                reasoning = (f"Common denominator {den}: {p}/{q} = {num1}/{den} and {r}/{s} = {num2}/{den}. "
                             f"{num1} {op} {num2} = {num}, so the result is {num}/{den}")
                if value.denominator == den:
                    reasoning += "."
                elif value.denominator == 1:
                    reasoning += f" = {value.numerator}."
                else:
                    reasoning += f" = {value.numerator}/{value.denominator} in lowest terms."
            else:
                a = rng.choice([v for v in range(-9, 10) if v not in (0, 1)])
                x = Fraction(rng.randint(-12, 12), rng.choice([1, 1, 1, 2, 3]))
                b = rng.randint(-20, 20)
                c = a * x + b
                if c.denominator != 1:  # keep the equation's numbers integers
                    x = Fraction(round(x))
                    c = a * x + b
                value = x
                bs = f"+ {b}" if b >= 0 else f"- {-b}"
                question = f"Solve for x: {a}x {bs} = {c.numerator}."
                reasoning = (f"Subtract {b} from both sides: {a}x = {c.numerator} - ({b}) = {c - b}. "
                             f"Divide by {a}: x = {c - b}/{a} = {value.numerator}"
                             + (f"/{value.denominator}." if value.denominator != 1 else "."))
            answer = latex_number(value)
            images, sizes = [], []
            if self.with_images:
                images, sizes = [self._draw_question(question)], [self.image_size]
            out.append(
                syn.synthetic_sample(
                    self.name, seed, i, images=images, image_sizes=sizes, prompt={"question": question},
                    target={"answer": answer}, reasoning=reasoning, kind=kind,
                )
            )
        return out

    def _draw_question(self, question: str) -> Image.Image:
        """The question written in black on a white image (PIL's default bitmap font)."""
        img = Image.new("RGB", self.image_size, (255, 255, 255))
        draw = ImageDraw.Draw(img)
        words, lines, line = question.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > max(8, self.image_size[0] // 7):
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines):
            draw.text((4, 4 + 12 * k), text, fill=(0, 0, 0))
        return img
