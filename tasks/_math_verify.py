"""math-verify behind the guards the math task needs (the module docstring of
:mod:`vlm_grpo_ma.tasks.math` explains them): :func:`math_parse` with a ``$...$`` retry, a timeout
policy that is safe off the main thread and a complexity guard, and :func:`math_compare`, which
tells a comparison that timed out apart from one that said no.

Its own module because two processes use it: the task (in the trainer) and the math worker
(:mod:`vlm_grpo_ma.tasks._math_worker`, which parses and compares in a child process), and neither
should import the other.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Sequence

from vlm_grpo_ma.task import ParseError

log = logging.getLogger("vlm_grpo_ma.tasks.math")  # the task's logger, as before the split

__all__ = ["math_compare", "math_equal", "math_parse"]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _too_complex(expr: Any, max_exponent: int) -> bool:
    """Whether a sympy object holds a power tower or a power with a huge numeric exponent."""
    try:
        import sympy

        if not isinstance(expr, sympy.Basic):
            return False
        for node in sympy.preorder_traversal(expr):
            if isinstance(node, sympy.Pow):
                e = node.exp
                if any(isinstance(x, sympy.Pow) for x in sympy.preorder_traversal(e)):
                    if e.free_symbols == set() and not e.is_Rational:
                        return True
                if e.is_Number and abs(e) > max_exponent:
                    return True
        return False
    except Exception:  # a malformed object is as bad as a complex one
        return True


def math_parse(text: str, timeout_s: float | None = 3, max_exponent: int = 10_000) -> list:
    """``math_verify.parse`` of ``text`` with a ``$...$`` retry, the thread-safe timeout policy
    and the complexity guard of the module docstring.  Returns the parsed list (sympy objects and
    strings); ParseError ``unparsable`` / ``too_complex`` / ``timeout`` / ``math_verify_error``.
    """
    from math_verify import parse
    from math_verify.errors import TimeoutException

    timeout = int(math.ceil(timeout_s)) if timeout_s and _in_main_thread() else None
    try:
        parsed = parse(text, parsing_timeout=timeout)
        if "\\" in text and not any(not isinstance(p, str) for p in parsed):
            retry = parse(f"${text}$", parsing_timeout=timeout)
            if any(not isinstance(p, str) for p in retry):
                parsed = retry
    except TimeoutException as e:
        raise ParseError("timeout", "math-verify parsing timed out") from e
    except Exception as e:
        raise ParseError("math_verify_error", f"{type(e).__name__}") from e
    if not parsed:
        raise ParseError("unparsable", f"math-verify found no answer in {text[:40]!r}")
    if any(_too_complex(p, max_exponent) for p in parsed):
        raise ParseError("too_complex", "power tower or huge exponent")
    return parsed


#: reference answers already checked: (answer, timeout_s, max_exponent) -> ParseError reason or None
_GOLD_CHECKED: dict[tuple, str | None] = {}


def math_equal(gold: Sequence, pred: Sequence, timeout_s: float | None = 3) -> bool:
    """``math_verify.verify(gold, pred)`` under the timeout policy; errors count as False."""
    return math_compare(gold, pred, timeout_s)[0]


def math_compare(gold: Sequence, pred: Sequence, timeout_s: float | None = 3) -> tuple[bool, str | None]:
    """``(equal, reason)``: ``math_verify.verify`` over every (gold, prediction) pair, as
    ``verify(gold, pred)`` does, but with a comparison that timed out told apart from one that
    said no: ``reason`` is ``"timeout"`` when nothing matched and some comparison timed out
    (math-verify itself only logs that and returns False), else None.  Errors count as False."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout = int(math.ceil(timeout_s)) if timeout_s and _in_main_thread() else None
    timed_out = False
    for g in gold:
        for p in pred:
            try:
                if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                    return True, None
            except TimeoutException:
                timed_out = True
            except Exception as e:
                log.debug("math-verify raised %r", e)
    return False, ("timeout" if timed_out else None)
