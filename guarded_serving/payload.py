"""Request bodies as JSON, within limits: size, nesting, rows, string length, valid numbers and text.

Bodies are parsed by orjson. The limits are then checked on the bytes where that settles them
(few brackets or one object per row: shallow; no backslash and no long gap between quotes: no
long string) and by a walk over the values otherwise; orjson itself refuses lone surrogates,
numbers beyond float64 and nesting past 1,024 levels. A body orjson refuses is parsed again by the
standard library, whose errors name the problem (and the row and column where there is one).
A large body is measured before it is parsed when it may hold more rows than allowed (a
vectorized pass over the bytes), so a body of 100,000 rows is refused with 413 without building
100,000 dicts, and a body nested 10,000 deep never reaches a recursive parser.

>>> limits = BodyLimits(max_string_length=5)
>>> parse_body(b'{"rows": [{"carat": 0.5}]}', limits)
{'rows': [{'carat': 0.5}]}
>>> parse_body(b'{"rows": [{"cut": "Premium"}]}', limits)
Traceback (most recent call last):
...
guarded_serving.errors.SchemaError: string too long (row 0, column 'cut')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from .checks import all_dicts
from .errors import BatchTooLargeError, PayloadError, Problem, SchemaError

#: Bodies up to this size are never measured before parsing (they cannot hold many rows).
SMALL_BODY_BYTES = 8192
#: Integers with more digits than this cannot be a float64 (about 1.8e308).
MAX_DIGITS = 309
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class BodyLimits:
    """Limits of one request body (the serving config's ``limits`` section)."""

    max_string_length: int = 1000
    max_depth: int = 32


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send null for a missing value")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def parse_body(raw: bytes, limits: BodyLimits, max_rows: int | None = None) -> Any:
    """The JSON value of ``raw``; PayloadError (400) when it is not valid JSON within the limits,
    BatchTooLargeError (413) when ``{"rows": [...]}`` holds more than ``max_rows`` rows, and
    SchemaError (422, naming row and column) for a value no model can take: a string too long or
    not valid Unicode, an integer beyond float64."""
    if not raw:
        raise PayloadError("the request body is empty; send a JSON object")
    if max_rows is not None and len(raw) > SMALL_BODY_BYTES and raw.count(b"{") > max_rows + 1:
        _measure(raw, limits, max_rows)  # may hold too many rows: count them before parsing
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_exactly(raw, limits, max_rows)
    if not _within_limits(raw, body, limits):
        _check_values(body, limits)
    return body


def _parse_exactly(raw: bytes, limits: BodyLimits, max_rows: int | None) -> Any:
    """The standard library's parse of a body orjson refused: its error names the problem, and
    the values it accepts (NaN spelled out is refused here; lone surrogates and integers past
    float64 are refused by the walk, with their row and column)."""
    walk = len(raw) <= SMALL_BODY_BYTES or _measure(raw, limits, max_rows)
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PayloadError("the request body is not UTF-8 text") from None
    except RecursionError:
        raise PayloadError(f"the request body nests deeper than {limits.max_depth} levels") from None
    except ValueError as e:
        raise PayloadError(f"the request body is not valid JSON: {e}") from None
    if walk:
        _check_values(body, limits)
    return body


def _within_limits(raw: bytes, body: Any, limits: BodyLimits) -> bool:
    """Whether the bytes alone show that an orjson-parsed body is within the depth and string
    limits (orjson refuses what else the walk would catch); False means: walk it."""
    opens = raw.count(b"{") + raw.count(b"[")
    if opens > limits.max_depth:
        # {"rows": [{...}, ...]} with no other bracket anywhere (not even in a string) is three
        # levels deep: every "{" or "[" byte is the body's, the list's or one row's.
        rows = body.get("rows") if type(body) is dict else None
        if type(rows) is not list or opens != len(rows) + 2 or not all_dicts(rows):
            return False
    if len(raw) <= limits.max_string_length + 2:
        return True
    if b"\\" in raw:  # escaped quotes would pair up the wrong quotes below
        return False
    quotes = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == ord('"'))
    if quotes.size < 2:
        return True
    # Without escapes, quotes pair up in order; a string's characters are at most its bytes.
    pairs = quotes.size - quotes.size % 2
    return int((quotes[1:pairs:2] - quotes[0:pairs:2]).max()) - 1 <= limits.max_string_length


def _measure(raw: bytes, limits: BodyLimits, max_rows: int | None) -> bool:
    """Check nesting and the row count on the raw bytes; True when some string or number needs
    a closer look after parsing."""
    a = np.frombuffer(raw, dtype=np.uint8)
    quote = a == ord('"')
    if b"\\" in raw:  # a quote after an odd run of backslashes is inside a string
        idx = np.arange(a.size)
        last_plain = np.maximum.accumulate(np.where(a != ord("\\"), idx, -1))
        run = np.zeros(a.size, dtype=np.int64)
        run[1:] = idx[:-1] - last_plain[:-1]
        quote &= run % 2 == 0
    outside = (np.cumsum(quote) & 1) == 0
    opens = ((a == ord("{")) | (a == ord("["))) & outside
    closes = ((a == ord("}")) | (a == ord("]"))) & outside
    depth = np.cumsum(opens.astype(np.int32) - closes.astype(np.int32))
    if depth.size and int(depth.max()) > limits.max_depth:
        raise PayloadError(f"the request body nests deeper than {limits.max_depth} levels")
    if max_rows is not None:
        # {"rows": [ {row}, ... ]}: each row opens an object at depth 3.
        n = int(np.count_nonzero((a == ord("{")) & opens & (depth == 3)))
        if n > max_rows:
            raise BatchTooLargeError(f"{n} rows is more than this service's maximum of {max_rows} "
                                     "(max_rows in the serving config); split the batch")
    q = np.flatnonzero(quote)
    longest = int((q[1::2] - q[: q.size - q.size % 2: 2]).max()) - 1 if q.size >= 2 else 0
    digits = np.diff(np.concatenate(([0], ((a >= 48) & (a <= 57)).astype(np.int8), [0])))
    runs = np.flatnonzero(digits == -1) - np.flatnonzero(digits == 1)
    return (longest > limits.max_string_length or (runs.size > 0 and int(runs.max()) >= MAX_DIGITS)
            or _SURROGATE_ESCAPE.search(raw) is not None)


def _check_values(body: Any, limits: BodyLimits) -> None:
    problems: list[Problem] = []
    rows = body.get("rows") if isinstance(body, dict) else None
    if isinstance(rows, list):
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                for k, v in row.items():
                    _check(k, limits, problems, 3, row=i, column=k)
                    _check(v, limits, problems, 3, row=i, column=k)
        rest = {k: v for k, v in body.items() if k != "rows"}
        _check(rest, limits, problems, 0, column="")
    else:
        _check(body, limits, problems, 0, column="")
    if problems:
        in_rows = all(p.row is not None for p in problems)
        cls = SchemaError if in_rows else PayloadError
        first = problems[0]
        where = (f"row {first.row}, column {first.column!r}" if first.row is not None
                 else f"at {first.column!r}" if first.column else "in the body")
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise cls(f"{first.problem} ({where}){more}", problems[:100])


def _check(v: Any, limits: BodyLimits, out: list[Problem], depth: int,
           row: int | None = None, column: str = "") -> None:
    """Append a Problem for each string, number or nesting in ``v`` beyond the limits."""
    if isinstance(v, str):
        if len(v) > limits.max_string_length:
            out.append(Problem(problem="string too long", row=row, column=column or None,
                               expected=f"at most {limits.max_string_length} characters",
                               got=f"{len(v)} characters"))
        elif not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                out.append(Problem(problem="string is not valid Unicode (a lone surrogate)", row=row,
                                   column=column or None, expected="valid Unicode text",
                                   got=v.encode("utf-8", "backslashreplace").decode()[:80]))
    elif isinstance(v, int) and not isinstance(v, bool) and row is not None:
        # Only model inputs must fit float64; elsewhere the route's own checks judge numbers.
        try:
            float(v)
        except OverflowError:
            out.append(Problem(problem="number out of range", row=row, column=column or None,
                               expected="a number within float64 (about ±1.8e308)",
                               got=f"an integer of {len(str(abs(v)))} digits"))
    elif isinstance(v, (list, dict)):
        if depth + 1 > limits.max_depth:
            out.append(Problem(problem=f"nested deeper than {limits.max_depth} levels", row=row,
                               column=column or None))
            return
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in items:
            where = f"{column}.{k}" if column else str(k)
            if isinstance(k, str):
                _check(k, limits, out, depth + 1, row, where)
            _check(x, limits, out, depth + 1, row, where)
