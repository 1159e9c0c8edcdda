"""Vectorized per-row checks of a batch against the training profile.

Schema problems (a missing column, a value that cannot be coerced to the feature's type) reject a
row. Support problems (a null where training had none, a number outside the training range, an
unseen category, a joint outlier) send it to the fallback. Everything is numpy over columns; the
only Python loops run over columns or over the (few) rows that failed.

>>> import pandas as pd
>>> from guarded_serving.profile import build_profile
>>> train = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "c": ["a", "b", "a", "b"], "y": [0, 1, 0, 1]})
>>> v = check_batch(pd.DataFrame({"x": [1.5, 9.0], "c": ["a", "z"]}), build_profile(train, "y"))
>>> v.reasons()
[[], ['out_of_range:x', 'unseen_category:c', 'outlier']]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .errors import PayloadError, Problem
from .policy import Policy
from .profile import FeatureProfile, Profile

OK, FALLBACK, REJECT = 0, 1, 2

# Reason codes. A reason is "code:column" for a column's problem, or "code" for the row as a whole.
OUT_OF_RANGE = "out_of_range"
NULL_UNSEEN = "null_unseen"
UNSEEN_CATEGORY = "unseen_category"
OUTLIER = "outlier"
PRIMARY_ERROR = "primary_error"
LATENCY_BUDGET = "latency_budget"

_TRUE = {"true", "1", "yes", "t", "y", "1.0"}
_FALSE = {"false", "0", "no", "f", "n", "0.0"}

Columns = Mapping[str, Sequence[Any] | np.ndarray | pd.Series]


@dataclass
class Verdicts:
    """The checks' result for a batch.

    ``status`` holds per row OK (0), FALLBACK (1) or REJECT (2). ``flags`` is a boolean matrix
    (rows x ``flag_names``); each flag name is a reason string. ``columns`` is the batch coerced
    to the profile's types (numeric: float64 with NaN for null; others: str with None), in profile
    column order, ready for the models; ``features`` is the same as a DataFrame, built on demand.
    """

    status: np.ndarray
    flags: np.ndarray
    flag_names: list[str]
    columns: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    outlier_scores: np.ndarray | None = None
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def features(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = pd.DataFrame(self.columns, copy=False)
        return self._frame

    @property
    def n_rows(self) -> int:
        return int(self.status.shape[0])

    @property
    def rejected(self) -> np.ndarray:
        return self.status == REJECT

    @property
    def to_fallback(self) -> np.ndarray:
        return self.status == FALLBACK

    def reasons(self) -> list[list[str]]:
        """Per row, the reasons it was flagged (empty for rows that pass)."""
        out: list[list[str]] = [[] for _ in range(self.n_rows)]
        rows, cols = np.nonzero(self.flags)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            out[r].append(self.flag_names[c])
        return out

    def reason_counts(self) -> dict[str, int]:
        """How many rows carry each reason."""
        if not self.flag_names:
            return {}
        counts = self.flags.sum(axis=0)
        return {n: int(c) for n, c in zip(self.flag_names, counts, strict=True) if c}


def as_columns(data: pd.DataFrame | Columns | Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], int]:
    """Normalise a DataFrame, a mapping of columns or a list of row mappings to (columns, n_rows)."""
    if isinstance(data, pd.DataFrame):
        return {str(c): data[c] for c in data.columns}, len(data)
    if isinstance(data, Mapping):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise PayloadError("columns have different lengths", [])
        return dict(data), (lengths.pop() if lengths else 0)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        bad = [i for i, r in enumerate(rows) if not isinstance(r, Mapping)]
        if bad:
            raise PayloadError(
                "every row must be an object of column -> value",
                [Problem("row is not an object", row=i, expected="object",
                         got=type(rows[i]).__name__) for i in bad[:50]],
            )
        names: dict[str, None] = {}
        for r in rows:
            names.update(dict.fromkeys(r))
        cols = {str(name): [r.get(name, _MISSING) for r in rows] for name in names}
        return cols, len(rows)
    raise PayloadError(f"cannot read a batch from {type(data).__name__}", [])


def check_batch(
    data: pd.DataFrame | Columns | Sequence[Mapping[str, Any]],
    profile: Profile,
    policy: Policy | None = None,
) -> Verdicts:
    """Check every row of ``data`` against ``profile`` under ``policy``."""
    policy = policy or Policy()
    columns, n = as_columns(data)
    status = np.zeros(n, dtype=np.int8)
    flag_cols: list[np.ndarray] = []
    flag_names: list[str] = []
    problems: list[Problem] = []
    coerced: dict[str, np.ndarray] = {}

    def flag(name: str, mask: np.ndarray) -> None:
        if mask.any():
            flag_cols.append(mask)
            flag_names.append(name)

    extra = [c for c in columns if c not in profile._by_name]  # type: ignore[attr-defined]
    if extra and policy.extra_columns == "reject":
        for c in extra:
            problems.append(Problem("unexpected column", None, c, "no such column", None))
        status[:] = REJECT

    # Numeric columns that hold nothing but plain numbers (the usual JSON request) are checked
    # as one matrix: a few numpy calls in all instead of several per column.
    block = _numeric_block(columns, profile, policy.range_margin)
    in_block: dict[str, int] = {}
    has_null: list[bool] = []
    has_oor: list[bool] = []
    if block is not None:
        names, matrix, nulls, out_of_range = block
        in_block = {name: j for j, name in enumerate(names)}
        has_null = np.asarray(nulls.any(axis=0)).tolist()
        has_oor = np.asarray(out_of_range.any(axis=0)).tolist()
        for j, name in enumerate(names):
            coerced[name] = matrix[:, j]

    for fp in profile.features:
        j = in_block.get(fp.name, -1)
        if j >= 0:
            if policy.check_nulls and not fp.nullable and has_null[j]:
                flag(f"{NULL_UNSEEN}:{fp.name}", nulls[:, j])
            if has_oor[j]:
                flag(f"{OUT_OF_RANGE}:{fp.name}", out_of_range[:, j])
            continue
        raw = columns.get(fp.name)
        if raw is None:
            problems.append(Problem("missing column", None, fp.name, fp.kind, None))
            status[:] = REJECT
            coerced[fp.name] = _empty(fp, n)
            continue
        values, null, bad = _coerce(raw, fp)
        coerced[fp.name] = values
        if bad is not None and bad.any():
            status[bad] = REJECT
            rows_bad = np.flatnonzero(bad)
            raw_list = raw if isinstance(raw, list) else list(np.asarray(raw, dtype=object))
            for r in rows_bad[:1000].tolist():
                got = raw_list[r]
                problems.append(
                    Problem(
                        "missing value" if got is _MISSING else "cannot convert",
                        r,
                        fp.name,
                        _EXPECTED[fp.kind],
                        None if got is _MISSING else _show(got),
                    )
                )
        if policy.check_nulls and not fp.nullable:
            flag(f"{NULL_UNSEEN}:{fp.name}", null if bad is None else null & ~bad)
        if fp.is_numeric:
            if fp.count == 0:
                continue
            flag(f"{OUT_OF_RANGE}:{fp.name}",
                 _out_of_range(values, float(fp.min or 0.0), float(fp.max or 0.0), policy.range_margin))
        elif policy.check_categories:
            known = _isin(values, fp) | null
            if bad is not None:
                known |= bad
            unseen = ~known
            flag(f"{UNSEEN_CATEGORY}:{fp.name}", unseen)

    scores = None
    om = profile.outlier
    if om is not None and policy.outlier_quantile is not None and n:
        if block is not None and om.columns == block[0]:
            outlier_input = block[1]  # the same columns, already one matrix
        else:
            outlier_input = np.column_stack([coerced[c].astype(float, copy=False) for c in om.columns])
        scores = om.scores(outlier_input)
        flag(OUTLIER, scores > om.threshold(policy.outlier_quantile))

    flags = np.column_stack(flag_cols) if flag_cols else np.zeros((n, 0), dtype=bool)
    if flag_cols:
        # OR over the columns: a row-wise any() over the (rows x flags) matrix costs 100x more.
        flagged = flag_cols[0].copy()
        for col in flag_cols[1:]:
            flagged |= col
        status[flagged & (status != REJECT)] = FALLBACK
    return Verdicts(status, flags, flag_names, coerced, problems, extra, scores)


def _out_of_range(values: np.ndarray, lo: Any, hi: Any, range_margin: float) -> np.ndarray:
    """Values beyond [lo, hi] widened by ``range_margin`` of its width: one column with scalar
    bounds, or a (rows x columns) matrix with a bound per column."""
    if range_margin:
        lo, hi = lo - range_margin * (hi - lo), hi + range_margin * (hi - lo)
    oor = values < lo  # NaN compares False, without a warning
    oor |= values > hi
    return oor


def _numeric_block(columns: Mapping[str, Any], profile: Profile, range_margin: float) -> tuple[
        list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """The profile's numeric columns (those with a training range) as one float64 matrix, with
    its null and out-of-range masks, when every one of them is a list of plain int or float
    values, integers whole: (names, matrix, nulls, out_of_range). None otherwise: the columns are
    then checked one by one, which also names each problem."""
    names, lo, hi = profile.numeric_ranges
    if len(names) < 2:
        return None
    raws = []
    for name in names:
        raw = columns.get(name)
        if type(raw) is not list:
            return None
        raws.append(raw)
    if not all(type(v) in _NUMBER_TYPES for raw in raws for v in raw):
        return None
    matrix = np.array(raws, dtype=np.float64).T
    integer = profile.integer_columns
    if integer.size:
        part = matrix[:, integer]
        with np.errstate(invalid="ignore"):
            if (np.isfinite(part) & (np.mod(part, 1.0) != 0)).any():
                return None  # a fractional "integer": the per-column path names the rows
    return names, matrix, np.isnan(matrix), _out_of_range(matrix, lo, hi, range_margin)


# -- coercion ----------------------------------------------------------------------------------

#: Below this many rows, plain Python over a column beats pandas' per-call overhead (a single-row
#: request would otherwise spend most of its time in pandas constructors).
SMALL = 64
_NUMBER_TYPES = (int, float)


def _isin(values: Any, fp: FeatureProfile) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if len(values) <= 4096:  # a set lookup per value beats building a hash table
            known = fp.category_set
            return np.fromiter((v in known for v in values), bool, len(values))
        # dtype=object: otherwise pandas 3 converts the strings to Arrow first, which costs more.
        return pd.Series(values, dtype=object, copy=False).isin(list(fp.categories)).to_numpy()
    return pd.Series(values, copy=False).isin(list(fp.categories)).to_numpy()


_MISSING = object()  # a row that lacks the key altogether (rows given as mappings)
_EXPECTED = {
    "numeric": "number",
    "integer": "integer",
    "boolean": "boolean",
    "categorical": "string",
}


def _empty(fp: FeatureProfile, n: int) -> np.ndarray:
    return np.full(n, np.nan) if fp.is_numeric else np.full(n, None, dtype=object)


def _show(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)[:80]


def _coerce(raw: Any, fp: FeatureProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(values, null mask, bad mask or None) for one column. Values of numeric kinds are float64
    (NaN for null); of other kinds an object array of str (None for null)."""
    if fp.is_numeric:
        return _coerce_numeric(raw, fp.kind == "integer")
    if fp.kind == "boolean":
        return _coerce_boolean(raw)
    return _coerce_categorical(raw)


def _coerce_numeric(raw: Any, integer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    arr = raw.to_numpy() if isinstance(raw, pd.Series) else raw
    if isinstance(arr, list) and all(type(v) in _NUMBER_TYPES for v in arr):
        arr = np.array(arr, dtype=np.float64)
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "fiu":
        values = arr.astype(np.float64, copy=False)
        null = np.isnan(values)
        bad = None
    else:
        obj = _object_1d(arr) if not isinstance(arr, np.ndarray) else arr.astype(object)
        missing = np.fromiter((v is _MISSING for v in obj), bool, len(obj)) if isinstance(raw, list) else None
        if missing is not None and missing.any():
            obj = obj.copy()
            obj[missing] = None
        # bools are not numbers here: True for a price is a client bug, not 1.0.
        isbool = np.fromiter((isinstance(v, (bool, np.bool_)) for v in obj), bool, len(obj))
        if isbool.any():
            obj = obj.copy()
            obj[isbool] = "<bool>"
        nested = np.fromiter((isinstance(v, _NESTED) for v in obj), bool, len(obj))
        if nested.any():
            obj = obj.copy()
            obj[nested] = "<nested>"
        null = pd.isna(obj) if obj.size else np.zeros(0, dtype=bool)
        values = pd.to_numeric(pd.Series(obj, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(values) & ~null
        if missing is not None:
            bad |= missing
        null = null & ~bad
    if integer:
        with np.errstate(invalid="ignore"):
            frac = np.isfinite(values) & (np.mod(values, 1.0) != 0)
        if frac.any():
            bad = frac if bad is None else (bad | frac)
            values = np.where(frac, np.nan, values)
    return values, null, bad


_NESTED = (list, dict, tuple, set)


def _object_1d(values: Any) -> np.ndarray:
    """A 1-D object array even when the values are lists (np.asarray would add dimensions)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values) if not isinstance(values, list) else values
    return out


def _coerce_categorical(raw: Any) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """Values come back as the column's own pandas array for typed string columns, else as an
    object array of str (None for null)."""
    if isinstance(raw, pd.Series) and (
        isinstance(raw.dtype, pd.CategoricalDtype)
        or (pd.api.types.is_string_dtype(raw.dtype) and raw.dtype != object)
    ):
        # A typed string column: keep its (Arrow) array, no conversion on the hot path.
        return raw.array, raw.isna().to_numpy(), None
    if isinstance(raw, list) and all(type(v) is str for v in raw):
        return np.array(raw, dtype=object), np.zeros(len(raw), dtype=bool), None
    obj = raw.to_numpy(dtype=object) if isinstance(raw, pd.Series) else _object_1d(raw)
    missing = None
    if isinstance(raw, list):
        missing = np.fromiter((v is _MISSING for v in raw), bool, len(raw))
        if missing.any():
            obj = obj.copy()
            obj[missing] = None
        else:
            missing = None
    null = pd.isna(obj)
    # Nested objects (lists, dicts) are not categories.
    nested = np.fromiter((isinstance(v, _NESTED) for v in obj), bool, len(obj))
    bad = None
    if nested.any():
        bad = nested
        obj = obj.copy()
        obj[nested] = "<nested>"
    if missing is not None:
        bad = missing if bad is None else (bad | missing)
    text = obj.astype(str).astype(object) if obj.size else obj
    text[null] = None
    if bad is not None:
        null = null & ~bad
    return text, null, bad


def _coerce_boolean(raw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    s = raw if isinstance(raw, pd.Series) else pd.Series(_object_1d(raw), dtype=object)
    if pd.api.types.is_bool_dtype(s.dtype):
        return np.where(s.to_numpy(), "True", "False").astype(object), np.zeros(len(s), bool), None
    null = s.isna().to_numpy()
    text = s.astype(str).str.strip().str.lower()
    true, false = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()
    out = np.full(len(s), None, dtype=object)
    out[true], out[false] = "True", "False"
    bad = ~null & ~true & ~false
    return out, null, (bad if bad.any() else None)
