"""How an assert-string test is judged by value in the caller (the expected value never enters the
sandbox): :func:`split_test` sorts a test into ``value`` / ``compare`` / ``truth`` / ``statement``,
:func:`judge` checks a reported value, :func:`decode_value` turns the harness's tagged plain data
back into built-in objects only, :func:`free_names` lists the names a statement test proxies.
"""

from __future__ import annotations

import ast
import functools
import operator
from typing import Any

#: comparisons judged in the caller: ast operator name -> function of (left, right)
_COMPARE_OPS = {
    "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt, "GtE": operator.ge,
    "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b, "Is": operator.is_, "IsNot": operator.is_not,
}
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


@functools.lru_cache(maxsize=65536)
def split_test(test: str) -> tuple[str, str, Any]:
    """How an assert-string test is judged: ``(kind, text, expected)``.

    - ``("value", expr, literal)``: ``assert <expr> == <literal>`` (either side);
    - ``("compare", expr, (op, literal, expr_first))``: ``assert <expr> <op> <literal>`` (either
      side) for ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not in``, and ``is`` /
      ``is not`` with ``None``, ``True`` or ``False``;
    - ``("truth", expr, polarity)``: ``assert <expr>`` (polarity True) or ``assert not <expr>``
      (False) where ``<expr>`` is a call, name, attribute or subscript;
    - ``("statement", test, None)``: anything else (several statements, a message, a
      comparison between two computed values such as ``assert f(2) == g(3)``).

    For the first three only ``expr`` is evaluated in the sandbox.  A value or compare test's
    value comes back as plain data (built-in types only; see the harness) and the caller
    applies the comparison here: the literal never enters the sandbox, and nothing the solution
    does there (patching ``exec`` or ``json``, an object whose ``__eq__`` is always true,
    forging report lines) makes a wrong value pass.  A truth test reports ``bool(<expr>)``; the
    polarity stays in the caller, so a forged report is a guess, no better than a solution that
    returns a constant.  :meth:`Sandbox.run_tests` runs a statement test in the tester process,
    out of the solution's reach (:meth:`Sandbox.run`, the low-level single-process call, still
    runs it in the solution's namespace, where its verdict can be forged).

    >>> split_test("assert f(2) == [4, 5]")
    ('value', 'f(2)', [4, 5])
    >>> split_test("assert abs(f(2) - 1.5) < 1e-9")
    ('compare', 'abs(f(2) - 1.5)', ('Lt', 1e-09, True))
    >>> split_test("assert not is_prime(9)")
    ('truth', 'is_prime(9)', False)
    """
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "statement", test, None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert) or tree.body[0].msg is not None:
        return "statement", test, None
    node = tree.body[0].test
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        op = type(node.ops[0]).__name__
        for expr, lit, expr_first in ((node.left, node.comparators[0], True), (node.comparators[0], node.left, False)):
            try:
                literal = ast.literal_eval(lit)
            except _LITERAL_ERRORS:
                continue
            if op == "Eq":
                return "value", ast.unparse(expr), literal
            if op in ("Is", "IsNot") and not any(literal is c for c in (None, True, False)):
                break
            if op in _COMPARE_OPS:
                return "compare", ast.unparse(expr), (op, literal, expr_first)
        return "statement", test, None
    polarity = True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        node, polarity = node.operand, False
    if isinstance(node, (ast.Call, ast.Name, ast.Attribute, ast.Subscript)):
        return "truth", ast.unparse(node), polarity
    return "statement", test, None


#: longest reply line of the solution's process to one call of the tester (longer: the call fails)
REPLY_BYTES = 16 * 2**20
_BUILTIN_NAMES = frozenset(dir(__import__("builtins")))


@functools.lru_cache(maxsize=65536)
def free_names(test: str) -> frozenset[str]:
    """Names a statement test uses that are not built-ins: in the tester each is a proxy that
    calls the solution's object of that name (a built-in name always means the built-in)."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name)) - _BUILTIN_NAMES


def harness_kind(kind: str, text: str) -> tuple[str, str]:
    """What the harness is told: ``value`` (report the value) for value and compare tests."""
    return ("value" if kind == "compare" else kind), text


def judge(kind: str, data: Any, expected: Any) -> bool:
    """Whether a reported value passes a value / compare / truth test (plain built-in objects
    only; anything malformed fails)."""
    try:
        value = decode_value(data)
        if kind == "value":
            return bool(value == expected)
        if kind == "truth":
            return type(value) is bool and value is expected
        op, literal, expr_first = expected
        left, right = (value, literal) if expr_first else (literal, value)
        return bool(_COMPARE_OPS[op](left, right))
    except (ValueError, TypeError, IndexError, AttributeError, KeyError, RecursionError, OverflowError):
        return False


_TAGS_SEQ = {"l": list, "t": tuple, "S": set, "F": frozenset}


def decode_value(data: Any, depth: int = 0) -> Any:
    """The harness's tagged form back into built-in objects (ValueError/TypeError if malformed)."""
    if depth > 64 or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed value")
    tag, args = data[0], data[1:]
    if tag == "N":
        return None
    if tag == "B" and args and type(args[0]) is bool:
        return args[0]
    if tag == "i":
        return int(args[0], 16)
    if tag == "f":
        return float.fromhex(args[0])
    if tag == "c":
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if tag == "s" and args and type(args[0]) is str:
        return args[0]
    if tag == "b":
        return bytes.fromhex(args[0])
    if tag in _TAGS_SEQ and args and isinstance(args[0], list):
        return _TAGS_SEQ[tag](decode_value(x, depth + 1) for x in args[0])
    if tag == "d" and args and isinstance(args[0], list):
        return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in args[0]}
    raise ValueError(f"malformed value tag {tag!r}")
