"""vlm_grpo_ma.tasks._parsing: what real models write, what is rejected and why, and a hypothesis fuzz
proving that nothing but ParseError ever leaves the parsers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlm_grpo_ma.tasks._parsing import MAX_ABS, MAX_ITEMS, ParsedBox, extract_structure, parse_boxes, parse_points
from vlm_grpo_ma.task import ParseError


def boxes(text):
    return [(p.box, p.label) for p in parse_boxes(text)]


# ---------------------------------------------------------------------------------------------
# boxes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[10, 20, 30, 40]", [((10, 20, 30, 40), None)]),
        ('[{"bbox_2d": [10, 20, 30, 40], "label": "red circle"}]', [((10, 20, 30, 40), "red circle")]),
        ('{"bbox_2d": [10, 20, 30, 40], "label": "cup"}', [((10, 20, 30, 40), "cup")]),  # single object
        ('```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```', [((1, 2, 3, 4), None)]),  # code fence
        ('```json\n[{"bbox_2d": [1, 2, 3, 4]}]', [((1, 2, 3, 4), None)]),  # unclosed fence
        ('The box is [1, 2, 3, 4]. I am confident.', [((1, 2, 3, 4), None)]),  # prose around
        ('[{"bbox_2d": [1,2,3,4], "label": "a"}, {"bbox_2d": [5, 6', [((1, 2, 3, 4), "a")]),  # truncated
        ('[[1,2,3,4], [5,6,7,8], [9,', [((1, 2, 3, 4), None), ((5, 6, 7, 8), None)]),
        ("[{'bbox_2d': (1, 2, 3, 4), 'label': 'mug'}]", [((1, 2, 3, 4), "mug")]),  # Python literal
        ('{"objects": [{"bbox": [1, 2, 3, 4]}]}', [((1, 2, 3, 4), None)]),  # wrapper object
        ('[{"bbox_2d": [[1, 2], [3, 4]]}]', [((1, 2, 3, 4), None)]),  # corner pairs
        ("[30, 40, 10, 20]", [((10, 20, 30, 40), None)]),  # corners swapped -> ordered
        ("[-5, 2.5, 1e2, 40]", [((-5, 2.5, 100, 40), None)]),  # negative and exponent kept
        ("[]", []),
        (
            "<|object_ref_start|>red mug<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|> and "
            "<|box_start|>(1, 2), (3, 4)<|box_end|>",
            [((10, 20, 30, 40), "red mug"), ((1, 2, 3, 4), None)],
        ),
    ],
)
def test_parse_boxes_accepts(text, expected):
    assert boxes(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("no box here", "no_json"),
        ("[1, 2, 3]", "bad_shape"),
        ('[{"label": "cup"}]', "bad_shape"),
        ('[{"bbox_2d": [1, 2, "3", 4]}]', "bad_shape"),
        ("[true, 1, 2, 3]", "bad_shape"),
        ("[NaN, 1, 2, 3]", "bad_number"),
        ("[Infinity, 1, 2, 3]", "bad_number"),
        ("[1e400, 1, 2, 3]", "bad_number"),
        (f"[{MAX_ABS * 10}, 1, 2, 3]", "bad_number"),
        ('"just a string"', "no_json"),
        ("[" * 5000, "no_json"),
        ("x" * 30_000, "too_long"),
        (json.dumps([[1, 2, 3, 4]] * (MAX_ITEMS + 1)), "too_many"),
        ("<|box_start|>(1e999,2),(3,4)<|box_end|>", "bad_number"),
    ],
)
def test_parse_boxes_rejects_with_reason(text, reason):
    with pytest.raises(ParseError) as e:
        parse_boxes(text)
    assert e.value.reason == reason


def test_non_text_is_a_parse_error():
    for bad in (None, 3, b"[1,2,3,4]", ["[1,2,3,4]"]):
        with pytest.raises(ParseError) as e:
            parse_boxes(bad)
        assert e.value.reason == "not_text"


def test_first_readable_structure_wins():
    # a bracket in prose that is not JSON is skipped; the next structure is read
    assert boxes("Step [a]: here {it is} -> [1, 2, 3, 4]") == [((1, 2, 3, 4), None)]
    assert extract_structure('x {"a": [1, 2]} y [3]') == {"a": [1, 2]}


def test_parsed_box_is_frozen():
    b = ParsedBox((1.0, 2.0, 3.0, 4.0), "x")
    with pytest.raises(Exception):
        b.label = "y"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[10, 20]", [(10, 20)]),
        ("[[10, 20], [30, 40]]", [(10, 20), (30, 40)]),
        ('[{"point_2d": [10, 20], "label": "handle"}, {"point_2d": [1, 2]}]', [(10, 20), (1, 2)]),
        ('{"point_2d": [10, 20]}', [(10, 20)]),
        ('[{"x": 1, "y": 2}]', [(1, 2)]),
        ("(10, 20), (30.5, 40)", [(10, 20), (30.5, 40)]),  # bare tuples
        ("[(10, 20), (30, 40)]", [(10, 20), (30, 40)]),
        ("```\n[[1, 2], [3, 4]]\n```\nThat is the path.", [(1, 2), (3, 4)]),
        ("[[1, 2], [3, 4], [5", [(1, 2), (3, 4)]),  # truncated
        ('{"points": [[1, 2]]}', [(1, 2)]),
        ("[[-3, 2000]]", [(-3, 2000)]),  # outside the image: kept, the task decides
        ("[]", []),
    ],
)
def test_parse_points_accepts(text, expected):
    assert parse_points(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("somewhere left", "no_json"),
        ("[[1, 2, 3]]", "bad_shape"),
        ("[[1, 2], [3]]", "bad_shape"),
        ('[{"label": "x"}]', "bad_shape"),
        ("[[NaN, 2]]", "bad_number"),
        ("[[1, -Infinity]]", "bad_number"),
        ("(1e999, 2)", "bad_number"),
        (json.dumps([[1, 2]] * (MAX_ITEMS + 1)), "too_many"),
    ],
)
def test_parse_points_rejects_with_reason(text, reason):
    with pytest.raises(ParseError) as e:
        parse_points(text)
    assert e.value.reason == reason


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------
_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 1e5, 1e6, -1e308, 5e-324]),
)
_scalars = st.one_of(_numbers, st.text(max_size=8), st.booleans(), st.none())
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.one_of(st.sampled_from(["bbox_2d", "bbox", "label", "point_2d", "x", "y", "boxes"]), st.text(max_size=5)),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=30,
)


@st.composite
def model_like_text(draw):
    """JSON-ish answers as models write them: dumped (NaN/Infinity allowed), maybe truncated,
    maybe fenced, maybe with prose and unicode around, maybe box tokens."""
    value = draw(_json)
    text = json.dumps(value, allow_nan=True, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    if draw(st.booleans()):
        text = f"```json\n{text}\n```"
    if draw(st.booleans()):
        text = draw(st.text(max_size=20)) + text + draw(st.text(max_size=20))
    if draw(st.booleans()):
        a, b = draw(st.tuples(_numbers, _numbers))
        text += f"<|box_start|>({a},{b}),({b},{a})<|box_end|>"
    if draw(st.booleans()):
        text = text.replace(",", draw(st.sampled_from([", (", ")", "'", '"', "[", "{"])), 1)
    return text


def _check_boxes(out):
    assert isinstance(out, list)
    for b in out:
        assert isinstance(b, ParsedBox) and len(b.box) == 4
        assert all(math.isfinite(v) and abs(v) <= MAX_ABS for v in b.box)
        assert b.box[0] <= b.box[2] and b.box[1] <= b.box[3]
        assert b.label is None or isinstance(b.label, str)


def _check_points(out):
    assert isinstance(out, list)
    for p in out:
        assert len(p) == 2 and all(math.isfinite(v) and abs(v) <= MAX_ABS for v in p)


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.one_of(st.text(max_size=200), model_like_text()))
def test_fuzz_parsers_raise_only_parse_error(text):
    for parse, check in ((parse_boxes, _check_boxes), (parse_points, _check_points)):
        try:
            out = parse(text)
        except ParseError as e:
            assert e.reason in {"not_text", "empty", "too_long", "no_json", "bad_shape", "bad_number", "too_many"}
        else:
            check(out)


@pytest.mark.parametrize("depth", [1, 2, 16, 17, 199, 200, 201, 1000, 4000])
@pytest.mark.parametrize("bracket", "[{(")
def test_deep_nesting(depth, bracket):
    """Nesting is read as far as a box can be (a list, or a list of one list), a deeper
    structure is the wrong shape, one past the scanner's depth limit is no structure at all,
    and parentheses never open one: always that ParseError, never a RecursionError or a box."""
    text = bracket * depth + "1, 2, 3, 4" + {"[": "]", "{": "}", "(": ")"}[bracket] * depth
    if bracket == "[" and depth <= 2:
        assert boxes(text) == [((1, 2, 3, 4), None)]
        expected_points = "bad_shape"  # four numbers are not a point
    else:
        expected = "no_json" if bracket == "(" or depth >= 199 else "bad_shape"
        with pytest.raises(ParseError) as e:
            parse_boxes(text)
        assert e.value.reason == expected
        expected_points = expected
    with pytest.raises(ParseError) as e:
        parse_points(text)
    assert e.value.reason == expected_points


def test_objects_one_after_another():
    text = '{"bbox_2d": [1, 2, 3, 4], "label": "a"}\n{"bbox_2d": [5, 6, 7, 8], "label": "b"}, {"bbox_2d": [9, 9, 9, 9]} done'
    assert boxes(text) == [((1, 2, 3, 4), "a"), ((5, 6, 7, 8), "b"), ((9, 9, 9, 9), None)]
    assert parse_points('{"point_2d": [1, 2]}\n{"point_2d": [3, 4]}') == [(1, 2), (3, 4)]
    # a later object that is not a box is malformed, not silently dropped
    with pytest.raises(ParseError) as e:
        parse_boxes('{"bbox_2d": [1, 2, 3, 4]} {"note": 1}')
    assert e.value.reason == "bad_shape"
