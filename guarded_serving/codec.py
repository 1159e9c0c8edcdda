"""The one JSON codec: numpy values to Python, NaN and infinities to null.

Every module that writes JSON (responses, the store's JSON columns, events, webhooks) goes
through ``dumps``, ``dumps_bytes`` or ``jsonable``, so a value is encoded the same way wherever it
lands. orjson encodes the common case (plain values, numpy arrays of numbers, NaN as null) without
a walk in Python; what it cannot take (object arrays, non-text keys, datetimes, huge integers) goes
through ``jsonable`` and the standard library, with ``str`` for anything else.

>>> import numpy as np
>>> dumps({"a": np.float32(1.5), "b": float("nan"), "c": np.array([1, 2])})
'{"a":1.5,"b":null,"c":[1,2]}'
>>> column_values(np.array([1.0, np.nan]))
[1.0, None]
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson

__all__ = ["column_values", "dumps", "dumps_bytes", "jsonable", "loads"]

#: numpy arrays and scalars natively; datetimes go the standard way (text from ``str``).
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_DATETIME


def jsonable(v: Any) -> Any:
    """``v`` with numpy scalars and arrays turned into Python values and NaN into None."""
    if isinstance(v, np.ndarray):
        return column_values(v) if v.ndim == 1 else [jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def column_values(a: np.ndarray | None) -> list[Any]:
    """A 1-D array as a list of JSON-ready values (the fast path for a column of a batch)."""
    if a is None:
        return []
    if a.dtype.kind == "f":
        values = a.tolist()
        if np.isfinite(a).all():
            return values  # type: ignore[no-any-return]
        return [x if math.isfinite(x) else None for x in values]
    if a.dtype.kind in "iub":
        return a.tolist()  # type: ignore[no-any-return]
    return [jsonable(x) for x in a.tolist()]


def dumps_bytes(v: Any) -> bytes:
    """Compact JSON of ``v`` as UTF-8 bytes (numpy values converted, NaN as null)."""
    try:
        return orjson.dumps(v, option=_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: a value it does not take
        return json.dumps(jsonable(v), separators=(",", ":"), allow_nan=False, default=str,
                          ensure_ascii=False).encode()


def dumps(v: Any) -> str:
    """Compact JSON text of ``v`` (numpy values converted, NaN as null)."""
    return dumps_bytes(v).decode()


def loads(v: str | bytes | None) -> Any:
    """The value of JSON text; None stays None."""
    return None if v is None else json.loads(v)
