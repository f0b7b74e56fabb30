"""Tolerant parsing of the geometry that real models write inside ``<answer>``.

What a model writes, and what this module accepts:

- JSON, possibly in a Markdown code fence (```` ```json ... ``` ````, closed or not), possibly
  followed (or preceded) by prose;
- Python literals where JSON fails (single quotes, tuples ``(x, y)``), read with
  :func:`ast.literal_eval` (never ``eval``);
- truncated lists (the generation hit its length limit): the complete leading elements are kept,
  ``[[1, 2, 3, 4], [5, 6`` reads as ``[[1, 2, 3, 4]]``;
- a single object instead of a list, objects one after another without a list (JSON lines),
  or one wrapper object around the list (``{"boxes": [...]}``);
- boxes as ``[x1, y1, x2, y2]``, ``[[x1, y1], [x2, y2]]`` or ``{"bbox_2d": [...], "label": ...}``
  (also ``bbox`` / ``box`` / ``box_2d``), and Qwen2-VL's box tokens
  ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``;
- points as ``[x, y]``, ``[[x, y], ...]``, ``{"point_2d": [x, y]}`` (also ``point``),
  ``{"x": .., "y": ..}``, or bare tuples ``(x, y), (x, y)``.

Numbers are checked: booleans, NaN, infinities and absolute values above :data:`MAX_ABS` (far
beyond any image frame) are rejected.  The coordinates returned are still in the MODEL's frame;
the task decodes them with its :class:`~vlm_grpo_ma.models.family.ModelFamily`.

Every failure is a :class:`~vlm_grpo_ma.task.ParseError` with a stable ``reason``:
``not_text``, ``empty``, ``too_long``, ``no_json``, ``bad_shape``, ``bad_number``, ``too_many``.
Nothing else ever leaves these functions (a hypothesis fuzz test checks it).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

from vlm_grpo_ma.task import ParseError

__all__ = [
    "MAX_ABS",
    "MAX_ITEMS",
    "MAX_TEXT",
    "ParsedBox",
    "extract_structure",
    "parse_boxes",
    "parse_points",
    "strip_code_fence",
]

#: the longest answer text read (characters); longer -> ``too_long``
MAX_TEXT = 20_000
#: the most boxes / points one answer may hold; more -> ``too_many``
MAX_ITEMS = 100
#: the largest absolute coordinate accepted (model frame); larger -> ``bad_number``
MAX_ABS = 1e5
#: how many opening brackets are tried as the start of the structure
_MAX_STARTS = 32
#: structures nested deeper than this are not read (no answer shape nests beyond 3)
_MAX_DEPTH = 16

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_TOKENS_RE = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>[^<]*)<\|object_ref_end\|>\s*)?"  # [^<]*: linear time
    rf"<\|box_start\|>\s*\(\s*(?P<x1>{_NUM})\s*,\s*(?P<y1>{_NUM})\s*\)\s*,?\s*"
    rf"\(\s*(?P<x2>{_NUM})\s*,\s*(?P<y2>{_NUM})\s*\)\s*<\|box_end\|>",
)
_TUPLE_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)

_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_POINT_KEYS = ("point_2d", "point", "coordinates")
_LABEL_KEYS = ("label", "name", "category", "class", "object")
_OPEN = {"[": "]", "{": "}", "(": ")"}
_CLOSE = {v: k for k, v in _OPEN.items()}


@dataclass(frozen=True)
class ParsedBox:
    """One box as written by the model: ``box`` = (x1, y1, x2, y2) in the model's frame with
    x1 <= x2 and y1 <= y2 (corners given in the other order are swapped), its label, and
    ``written``: the four numbers in the order the model wrote them (None when that is
    ``box``).  Metrics that follow the official evaluators score ``written`` (an inverted box
    is a miss there); rewards may forgive it."""

    box: tuple[float, float, float, float]
    label: str | None = None
    written: tuple[float, float, float, float] | None = None

    @property
    def inverted(self) -> bool:
        """Whether the model wrote x1 > x2 or y1 > y2."""
        return self.written is not None

    @property
    def as_written(self) -> tuple[float, float, float, float]:
        return self.written if self.written is not None else self.box


# ----------------------------------------------------------------------------------------------
# text -> Python structure
# ----------------------------------------------------------------------------------------------
def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ParseError("not_text", f"expected a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ParseError("empty", "empty answer")
    if len(text) > MAX_TEXT:
        raise ParseError("too_long", f"{len(text)} characters > {MAX_TEXT}")
    return text


def strip_code_fence(text: str) -> str:
    """The content of the first Markdown code fence in ``text`` (closed or not), else ``text``."""
    m = _FENCE_RE.search(text)
    return m.group(1).strip() if m else text


def _scan(text: str, start: int) -> tuple[int | None, list[int], bool]:
    """Scan the bracketed structure opening at ``text[start]``.

    Returns ``(end, cuts, too_deep)``: ``end`` is the index just past the matching close
    bracket, or None when the text ends first (or a bracket mismatches); ``cuts`` are the
    indices of the commas at depth 1 (between complete top-level elements), used to recover a
    truncated list; ``too_deep`` is True (and the scan stops) past :data:`_MAX_DEPTH` levels.
    Strings in single or double quotes (with backslash escapes) are skipped.
    """
    stack: list[str] = []
    cuts: list[int] = []
    quote: str | None = None
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in _OPEN:
            stack.append(_OPEN[c])
            if len(stack) > _MAX_DEPTH:
                return None, cuts, True
        elif c in _CLOSE:
            if not stack or stack[-1] != c:
                return None, cuts, False
            stack.pop()
            if not stack:
                return i + 1, cuts, False
        elif c == "," and len(stack) == 1:
            cuts.append(i)
        i += 1
    return None, cuts, False


def _literal(span: str) -> tuple[bool, Any]:
    """(ok, value) of ``span`` read as JSON, else as a Python literal; never raises."""
    try:
        return True, json.loads(span)
    except (ValueError, RecursionError, MemoryError):
        pass
    try:
        return True, ast.literal_eval(span)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, OverflowError):
        return False, None
    except Exception:  # literal_eval can raise others on odd input (e.g. IndentationError subclasses)
        return False, None


def _structures(text: str) -> Iterator[tuple[Any, int]]:
    """Candidate structures in ``text`` as ``(value, end)``: for each opening ``[`` or ``{`` (in
    order, at most :data:`_MAX_STARTS`), the balanced structure starting there if it reads, else
    the complete leading elements of a truncated list; ``end`` is where the text read stops."""
    tried = 0
    for m in re.finditer(r"[\[{]", text):
        if tried >= _MAX_STARTS:
            return
        tried += 1
        start = m.start()
        end, cuts, too_deep = _scan(text, start)
        if too_deep:
            continue
        if end is not None:
            ok, value = _literal(text[start:end])
            if ok:
                yield value, end
                continue
        if text[start] == "[":
            # truncated (or broken) list: the longest prefix of complete elements that reads
            for cut in reversed(cuts):
                ok, value = _literal(text[start:cut] + "]")
                if ok:
                    yield value, cut
                    break


_SEPARATOR_RE = re.compile(r"[\s,;]*")


def _following_objects(text: str, pos: int) -> list[dict]:
    """Objects written one after another (JSON-lines style, separated by whitespace, commas or
    semicolons) from ``pos`` on; stops at the first thing that is not a readable object."""
    out: list[dict] = []
    while len(out) < MAX_ITEMS + 1:
        pos = _SEPARATOR_RE.match(text, pos).end()
        if pos >= len(text) or text[pos] != "{":
            break
        end, _, too_deep = _scan(text, pos)
        if end is None or too_deep:
            break
        ok, value = _literal(text[pos:end])
        if not ok or not isinstance(value, dict):
            break
        out.append(value)
        pos = end
    return out


def extract_structure(text: Any) -> Any:
    """The first JSON / Python-literal list or object in an answer text (code fences and
    surrounding prose ignored, truncated lists cut to their complete elements).  Objects written
    one after another without a list (``{...}\n{...}``) are read as a list of them.

    Raises:
        ParseError: ``not_text``, ``empty``, ``too_long`` or ``no_json``.
    """
    text = strip_code_fence(_check_text(text))
    for value, end in _structures(text):
        if isinstance(value, dict):
            more = _following_objects(text, end)
            if more:
                return [value, *more]
        return value
    raise ParseError("no_json", "no JSON list or object found")


# ----------------------------------------------------------------------------------------------
# structure -> geometry
# ----------------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> float:
    if not _is_num(v):
        raise ParseError("bad_shape", f"expected a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise ParseError("bad_number", "integer too large") from None
    if not math.isfinite(f):
        raise ParseError("bad_number", f"non-finite coordinate {f}")
    if abs(f) > MAX_ABS:
        raise ParseError("bad_number", f"coordinate {f:.3g} beyond +-{MAX_ABS:g}")
    return f


def _is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _pick(d: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def _label(d: dict) -> str | None:
    v = _pick(d, _LABEL_KEYS)
    if isinstance(v, str):
        return v[:200]
    return None


def _coords4(v: Any) -> tuple[float, float, float, float]:
    """4 numbers from ``[x1, y1, x2, y2]`` or ``[[x1, y1], [x2, y2]]``, as written."""
    if _is_seq(v) and len(v) == 4 and all(_is_num(c) for c in v):
        x1, y1, x2, y2 = (_num(c) for c in v)
    elif _is_seq(v) and len(v) == 2 and all(_is_seq(p) and len(p) == 2 for p in v):
        (x1, y1), (x2, y2) = ((_num(p[0]), _num(p[1])) for p in v)
    else:
        raise ParseError("bad_shape", "a box needs [x1, y1, x2, y2]")
    return x1, y1, x2, y2


def _parsed_box(coords: tuple[float, float, float, float], label: str | None = None) -> ParsedBox:
    x1, y1, x2, y2 = coords
    ordered = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return ParsedBox(ordered, label, None if ordered == tuple(coords) else tuple(coords))


def _box_item(v: Any) -> ParsedBox:
    if isinstance(v, dict):
        coords = _pick(v, _BOX_KEYS)
        if coords is None:
            raise ParseError("bad_shape", "object without a bbox_2d key")
        return _parsed_box(_coords4(coords), _label(v))
    return _parsed_box(_coords4(v))


def _unwrap(value: Any) -> Any:
    """``{"boxes": [...]}`` (one key whose value is a list) -> the list."""
    if isinstance(value, dict) and len(value) == 1:
        (inner,) = value.values()
        if _is_seq(inner):
            return inner
    return value


def _check_count(items: list) -> list:
    if len(items) > MAX_ITEMS:
        raise ParseError("too_many", f"{len(items)} items > {MAX_ITEMS}")
    return items


def boxes_from_structure(value: Any) -> list[ParsedBox]:
    """Boxes from a parsed structure (see the module docstring for the shapes accepted)."""
    if isinstance(value, dict) and _pick(value, _BOX_KEYS) is not None:
        return [_box_item(value)]
    value = _unwrap(value)
    if not _is_seq(value):
        raise ParseError("bad_shape", f"expected a list of boxes, got {type(value).__name__}")
    if len(value) == 4 and all(_is_num(c) for c in value):
        return [_parsed_box(_coords4(value))]
    _check_count(value)
    return [_box_item(v) for v in value]


def parse_boxes(text: Any) -> list[ParsedBox]:
    """Boxes (model frame) and optional labels from an answer text; ``[]`` for an empty list.

    Qwen2-VL box tokens are read first when present; otherwise the first JSON / literal
    structure.  Raises :class:`ParseError` only.
    """
    text = _check_text(text)
    tokens = list(_BOX_TOKENS_RE.finditer(text))
    if tokens:
        _check_count(tokens)
        out = []
        for m in tokens:
            try:
                coords = [float(m.group(k)) for k in ("x1", "y1", "x2", "y2")]
            except (ValueError, OverflowError):
                raise ParseError("bad_number", "unreadable number in box tokens") from None
            label = m.group("label")
            out.append(_parsed_box(_coords4(coords), label.strip()[:200] if label is not None else None))
        return out
    return boxes_from_structure(extract_structure(text))


def _point_item(v: Any) -> tuple[float, float]:
    if isinstance(v, dict):
        coords = _pick(v, _POINT_KEYS)
        if coords is None and "x" in v and "y" in v:
            coords = [v["x"], v["y"]]
        if coords is None:
            raise ParseError("bad_shape", "object without a point_2d key")
        v = coords
    if _is_seq(v) and len(v) == 2:
        return _num(v[0]), _num(v[1])
    raise ParseError("bad_shape", "a point needs [x, y]")


def points_from_structure(value: Any) -> list[tuple[float, float]]:
    """Points from a parsed structure (see the module docstring for the shapes accepted)."""
    if isinstance(value, dict) and (_pick(value, _POINT_KEYS) is not None or ("x" in value and "y" in value)):
        return [_point_item(value)]
    value = _unwrap(value)
    if not _is_seq(value):
        raise ParseError("bad_shape", f"expected a list of points, got {type(value).__name__}")
    if len(value) == 2 and all(_is_num(c) for c in value):
        return [_point_item(value)]
    _check_count(value)
    return [_point_item(v) for v in value]


def parse_points(text: Any) -> list[tuple[float, float]]:
    """Points ``(x, y)`` (model frame) from an answer text; ``[]`` for an empty list.

    Reads the first JSON / literal list or object; failing that, bare tuples
    ``(x, y), (x, y), ...``.  Raises :class:`ParseError` only.
    """
    text = _check_text(text)
    body = strip_code_fence(text)
    try:
        value = extract_structure(body)
    except ParseError as e:
        if e.reason != "no_json":
            raise
        tuples = _TUPLE_RE.findall(body)
        if not tuples:
            raise
        _check_count(tuples)
        out = []
        for x, y in tuples:
            try:
                out.append((_num(float(x)), _num(float(y))))
            except (ValueError, OverflowError):
                raise ParseError("bad_number", "unreadable number") from None
        return out
    return points_from_structure(value)
