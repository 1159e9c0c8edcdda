"""Request bodies within limits: measured before parsing, every problem a 4xx naming where."""

from __future__ import annotations

import json

import pytest

from guarded_serving.errors import BatchTooLargeError, PayloadError, SchemaError
from guarded_serving.payload import SMALL_BODY_BYTES, BodyLimits, parse_body

LIMITS = BodyLimits(max_string_length=100, max_depth=8)
ROW = {"carat": 0.5, "cut": "Ideal", "depth": 61.0}


def body(rows: list, pad_to: int = 0, **extra) -> bytes:
    raw = json.dumps({"rows": rows, **extra}).encode()
    return raw + b" " * max(0, pad_to - len(raw))  # trailing whitespace is valid JSON


@pytest.mark.parametrize("pad", [0, SMALL_BODY_BYTES + 1], ids=["small", "measured"])
def test_valid_bodies_parse(pad: int) -> None:
    assert parse_body(body([ROW] * 3, pad), LIMITS) == {"rows": [ROW] * 3}


@pytest.mark.parametrize("pad", [0, SMALL_BODY_BYTES + 1], ids=["small", "measured"])
def test_huge_integer_is_422_naming_row_and_column(pad: int) -> None:
    raw = body([ROW, {**ROW, "carat": 1}], pad).replace(b'"carat": 1,', b'"carat": ' + b"9" * 401 + b",")
    with pytest.raises(SchemaError) as e:
        parse_body(raw, LIMITS)
    (p,) = e.value.problems
    assert (p.row, p.column, p.problem) == (1, "carat", "number out of range")


@pytest.mark.parametrize("pad", [0, SMALL_BODY_BYTES + 1], ids=["small", "measured"])
def test_lone_surrogate_is_422_but_a_pair_is_text(pad: int) -> None:
    with pytest.raises(SchemaError) as e:
        parse_body(body([{**ROW, "cut": "\ud800"}], pad), LIMITS)
    assert e.value.problems[0].column == "cut" and "surrogate" in e.value.problems[0].problem
    assert parse_body(body([{**ROW, "cut": "\U0001f600"}], pad), LIMITS)["rows"][0]["cut"] == "\U0001f600"


@pytest.mark.parametrize("pad", [0, SMALL_BODY_BYTES + 1], ids=["small", "measured"])
def test_long_strings_are_422(pad: int) -> None:
    with pytest.raises(SchemaError) as e:
        parse_body(body([ROW, {**ROW, "cut": "x" * 101}], pad), LIMITS)
    assert (e.value.problems[0].row, e.value.problems[0].column) == (1, "cut")


@pytest.mark.parametrize("depth", [9, 50, 10_000])
def test_deep_nesting_is_400_without_recursion(depth: int) -> None:
    with pytest.raises((PayloadError, SchemaError), match="deeper than 8"):
        parse_body(b"[" * depth + b"]" * depth, LIMITS)


def test_brackets_and_escaped_quotes_inside_strings_are_not_nesting() -> None:
    rows = [{**ROW, "cut": '[[[[[[[[[[ \\" {{{{{{{{{{'}] * 200
    assert parse_body(body(rows, SMALL_BODY_BYTES + 1), BodyLimits(max_depth=4))["rows"] == rows


def test_too_many_rows_is_413_before_parsing() -> None:
    raw = body([{}] * 100_000)
    with pytest.raises(BatchTooLargeError, match="100000 rows"):
        parse_body(raw, LIMITS, max_rows=1000)


@pytest.mark.parametrize("raw", [b'{"rows": [{"carat": NaN}]}', b'{"rows": [{"carat": Infinity}]}'])
def test_non_json_numbers_are_400(raw: bytes) -> None:
    with pytest.raises(PayloadError, match="not a JSON number"):
        parse_body(raw, LIMITS)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"{not json"])
def test_not_json_is_400(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_body(raw, LIMITS)
