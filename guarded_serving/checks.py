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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .errors import PayloadError, Problem
from .policy import FeatureRules, Policy
from .profile import FeatureProfile, OutlierModel, Profile, epoch_seconds, is_aware

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


class Coded(NamedTuple):
    """A categorical column of ``Verdicts.columns`` (``values``) as each row's position among
    its profile's ``categories``, -1 for a row holding anything else (null, an unseen value)."""

    codes: np.ndarray
    categories: tuple[str, ...]
    values: np.ndarray


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
    #: The datetime features and their training time zone (None: naive). Their ``columns`` hold
    #: epoch seconds (what the checks, drift and ONNX models use); ``features`` holds datetimes.
    datetime_columns: dict[str, str | None] = field(default_factory=dict)
    #: Categorical columns as codes, a by-product of the unseen-category check (see ``Coded``):
    #: what the hand-off to the recording process sends instead of the text.
    codes: dict[str, Coded] = field(default_factory=dict)
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def features(self) -> pd.DataFrame:
        """The checked columns as a DataFrame (datetime features as datetimes, in their training
        time zone or naive), for models that take a DataFrame."""
        if self._frame is None:
            frame = pd.DataFrame(self.columns, copy=False)
            for name, tz in self.datetime_columns.items():
                frame[name] = _datetimes(self.columns[name], tz)
            self._frame = frame
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
        dicts = all_dicts(rows)
        bad = [] if dicts else [i for i, r in enumerate(rows) if not isinstance(r, Mapping)]
        if bad:
            raise PayloadError(
                "every row must be an object of column -> value",
                [Problem("row is not an object", row=i, expected="object",
                         got=type(rows[i]).__name__) for i in bad[:50]],
            )
        names = _column_names(rows)
        # dict.get over the rows in C (map) where every row is a plain dict, as parsed JSON is.
        cols = {str(name): list(map(dict.get, rows, repeat(name), repeat(_MISSING))) if dicts
                else [r.get(name, _MISSING) for r in rows] for name in names}
        return cols, len(rows)
    raise PayloadError(f"cannot read a batch from {type(data).__name__}", [])


def _column_names(rows: list[Mapping[str, Any]]) -> list[Any]:
    """Every key of the rows, in order of first appearance."""
    if not rows:
        return []
    first = list(rows[0])
    if len(set().union(*rows)) == len(first):  # the usual batch: the first row names them all
        return first
    names: dict[Any, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return list(names)


def all_dicts(rows: list[Any]) -> bool:
    """Whether ``rows`` is a non-empty list of plain dicts (as parsed JSON rows are); one pass in C."""
    return bool(rows) and set(map(type, rows)) == {dict}


@dataclass(frozen=True)
class CheckPlan:
    """What ``check_batch`` applies to one profile under one policy, resolved once.

    ``rules`` holds each feature's resolved ``FeatureRules``; ``bounds`` each range-checked
    numeric or datetime feature's [lo, hi] (the training range widened by its margin). The
    numeric (non-datetime) features with a training range form the ``block``: when a batch holds
    nothing but plain numbers in them, they are checked as one matrix against ``block_lo`` and
    ``block_hi`` (infinite for a feature whose range is ignored). ``outlier`` is the profile's
    outlier model over the features the policy leaves in it, ``outlier_threshold`` its threshold
    (None: no outlier check). ``datetimes`` maps each datetime feature to its time zone.
    """

    rules: dict[str, FeatureRules]
    bounds: dict[str, tuple[float, float]]
    block: list[str]
    block_lo: np.ndarray
    block_hi: np.ndarray
    block_integer: np.ndarray
    outlier: OutlierModel | None
    outlier_threshold: float | None
    outlier_in_block: np.ndarray | None
    datetimes: dict[str, str | None]
    #: Per feature, what the one-row path checks; None when a feature's kind needs the columnar
    #: coercion (datetime, boolean) or the outlier model reads a feature it cannot.
    row_specs: tuple[RowSpec, ...] | None = None
    #: Positions in ``row_specs`` of the outlier model's columns.
    row_outlier: tuple[int, ...] = ()

    @classmethod
    def build(cls, profile: Profile, policy: Policy) -> CheckPlan:
        """Resolve ``policy`` for ``profile``; a ConfigError names any feature the policy names
        that the profile lacks."""
        policy.require_features(profile.feature_names)
        rules = {f.name: policy.rules(f.name, profile.time_index) for f in profile.features}
        bounds = {}
        for f in profile.features:
            margin = rules[f.name].range_margin
            if f.is_numeric and f.count and margin is not None:
                low, high = float(f.min or 0.0), float(f.max or 0.0)
                bounds[f.name] = (low - margin * (high - low), high + margin * (high - low))
        ranged = [f for f in profile.features if f.is_numeric and not f.is_datetime and f.count]
        block = [f.name for f in ranged]
        lo = np.array([bounds.get(n, (-np.inf, np.inf))[0] for n in block], dtype=np.float64)
        hi = np.array([bounds.get(n, (-np.inf, np.inf))[1] for n in block], dtype=np.float64)
        integer = np.array([i for i, f in enumerate(ranged) if f.kind == "integer"], dtype=np.intp)
        om, threshold, in_block = profile.outlier, None, None
        if om is not None:
            om = om.without(c for c in om.columns if not rules[c].outlier)
        if om is not None and policy.outlier_quantile is not None:
            threshold = om.threshold(policy.outlier_quantile)
            if set(om.columns) <= set(block):
                in_block = np.array([block.index(c) for c in om.columns], dtype=np.intp)
        datetimes = {f.name: f.timezone for f in profile.features if f.is_datetime}
        specs: tuple[RowSpec, ...] | None = tuple(
            RowSpec.of(f, rules[f.name], bounds.get(f.name)) for f in profile.features)
        row_outlier: tuple[int, ...] = ()
        names = [f.name for f in profile.features]
        if any(f.is_datetime or f.kind == "boolean" for f in profile.features):
            specs = None
        elif om is not None and threshold is not None:
            row_outlier = tuple(names.index(c) for c in om.columns)
            if not all(profile.features[i].is_numeric for i in row_outlier):
                specs = None
        return cls(rules, bounds, block, lo, hi, integer, om, threshold, in_block, datetimes,
                   specs, row_outlier)


@dataclass(frozen=True)
class RowSpec:
    """One feature as the one-row path checks it: the flag names it may raise (None: not
    checked), its bounds and its known categories."""

    name: str
    numeric: bool
    integer: bool
    null_flag: str | None
    range_flag: str | None
    lo: float
    hi: float
    unseen_flag: str | None
    known: frozenset[str]

    @classmethod
    def of(cls, fp: FeatureProfile, rules: FeatureRules, bounds: tuple[float, float] | None) -> RowSpec:
        categories = not fp.is_numeric and rules.categories and not fp.categories_truncated
        return cls(
            fp.name, fp.is_numeric, fp.kind == "integer",
            f"{NULL_UNSEEN}:{fp.name}" if rules.nulls and not fp.nullable else None,
            f"{OUT_OF_RANGE}:{fp.name}" if fp.is_numeric and bounds is not None else None,
            *(bounds or (-np.inf, np.inf)),
            f"{UNSEEN_CATEGORY}:{fp.name}" if categories else None,
            fp.category_set if categories else frozenset(),
        )


def plan_for(profile: Profile, policy: Policy) -> CheckPlan:
    """The (cached) ``CheckPlan`` of ``profile`` under ``policy``."""
    # Kept on the profile instance (frozen, so its __dict__ directly): a plan lives exactly as
    # long as its profile, and a hot path with one policy finds it with one dict lookup.
    plans: dict[Policy, CheckPlan] = profile.__dict__.setdefault("_check_plans", {})
    plan = plans.get(policy)
    if plan is None:
        plan = plans[policy] = CheckPlan.build(profile, policy)
    return plan


def check_batch(
    data: pd.DataFrame | Columns | Sequence[Mapping[str, Any]],
    profile: Profile,
    policy: Policy | None = None,
) -> Verdicts:
    """Check every row of ``data`` against ``profile`` under ``policy``."""
    policy = policy or Policy()
    plan = plan_for(profile, policy)
    if type(data) is list and len(data) == 1 and type(data[0]) is dict:
        verdicts = _check_row(data[0], profile, plan, policy)
        if verdicts is not None:
            return verdicts
    columns, n = as_columns(data)
    status = np.zeros(n, dtype=np.int8)
    flag_cols: list[np.ndarray] = []
    flag_names: list[str] = []
    problems: list[Problem] = []
    coerced: dict[str, np.ndarray] = {}
    codes: dict[str, Coded] = {}

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
    block = _numeric_block(columns, plan)
    in_block: dict[str, int] = {}
    has_null: list[bool] = []
    has_oor: list[bool] = []
    if block is not None:
        matrix, nulls, out_of_range = block
        in_block = {name: j for j, name in enumerate(plan.block)}
        has_null = np.asarray(nulls.any(axis=0)).tolist()
        has_oor = np.asarray(out_of_range.any(axis=0)).tolist()
        for j, name in enumerate(plan.block):
            coerced[name] = matrix[:, j]

    for fp in profile.features:
        rules = plan.rules[fp.name]
        j = in_block.get(fp.name, -1)
        if j >= 0:
            if rules.nulls and not fp.nullable and has_null[j]:
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
        values, null, bad, why = _coerce(raw, fp)
        coerced[fp.name] = values
        if bad is not None and bad.any():
            status[bad] = REJECT
            rows_bad = np.flatnonzero(bad)
            raw_list = raw if isinstance(raw, list) else list(np.asarray(raw, dtype=object))
            for r in rows_bad[:1000].tolist():
                got = raw_list[r]
                problems.append(
                    Problem(
                        "missing value" if got is _MISSING else why if isinstance(why, str) else str(why[r]),
                        r,
                        fp.name,
                        _expected(fp),
                        None if got is _MISSING else _show(got),
                    )
                )
        if rules.nulls and not fp.nullable:
            flag(f"{NULL_UNSEEN}:{fp.name}", null if bad is None else null & ~bad)
        if fp.is_numeric:
            bounds = plan.bounds.get(fp.name)
            if bounds is not None:
                flag(f"{OUT_OF_RANGE}:{fp.name}", _out_of_range(values, *bounds))
        elif rules.categories and not fp.categories_truncated:
            coded = _coded(values, fp)
            if coded is not None:
                codes[fp.name] = coded
            known = (coded.codes >= 0 if coded is not None else _isin(values, fp)) | null
            if bad is not None:
                known |= bad
            unseen = ~known
            flag(f"{UNSEEN_CATEGORY}:{fp.name}", unseen)

    scores = None
    om = plan.outlier
    if om is not None and plan.outlier_threshold is not None and n:
        if block is not None and plan.outlier_in_block is not None:
            # The same columns, already one matrix.
            idx = plan.outlier_in_block
            whole = idx.size == block[0].shape[1] and bool((idx == np.arange(idx.size)).all())
            outlier_input = block[0] if whole else block[0][:, idx]
        else:
            outlier_input = np.column_stack([coerced[c].astype(float, copy=False) for c in om.columns])
        scores = om.scores(outlier_input)
        flag(OUTLIER, scores > plan.outlier_threshold)

    flags = np.column_stack(flag_cols) if flag_cols else np.zeros((n, 0), dtype=bool)
    if flag_cols:
        # OR over the columns: a row-wise any() over the (rows x flags) matrix costs 100x more.
        flagged = flag_cols[0].copy()
        for col in flag_cols[1:]:
            flagged |= col
        status[flagged & (status != REJECT)] = FALLBACK
    return Verdicts(status, flags, flag_names, coerced, problems, extra, scores,
                    datetime_columns=plan.datetimes, codes=codes)


def _check_row(row: dict[str, Any], profile: Profile, plan: CheckPlan, policy: Policy) -> Verdicts | None:
    """One row (the usual one-row request) checked in plain Python: numpy's per-call cost over
    a few dozen one-element arrays is most of a one-row check. The same verdicts as the columnar
    path (tests/test_checks.py holds both to it); None when the row holds anything but plain
    numbers, strings and nulls, or lacks a feature: the columnar path then names the problem."""
    specs = plan.row_specs
    if specs is None:
        return None
    by_name = profile._by_name  # type: ignore[attr-defined]
    extra = [c for c in row if c not in by_name]
    if extra and policy.extra_columns == "reject":
        return None
    values: list[Any] = []
    names: list[str] = []
    for s in specs:
        v = row.get(s.name, _MISSING)
        if s.numeric:
            t = type(v)
            if t is float:
                x = v
            elif t is int:
                if not -_INT_LIMIT < v < _INT_LIMIT:
                    return None
                x = float(v)
            elif v is None:
                x = math.nan
            else:
                return None
            if x != x:
                if s.null_flag is not None:
                    names.append(s.null_flag)
            elif s.integer and math.isfinite(x) and x % 1.0 != 0:
                return None
            elif s.range_flag is not None and (x < s.lo or x > s.hi):
                names.append(s.range_flag)
            values.append(x)
        else:
            if v is None:
                if s.null_flag is not None:
                    names.append(s.null_flag)
            elif type(v) is not str:
                return None
            elif s.unseen_flag is not None and v not in s.known:
                names.append(s.unseen_flag)
            values.append(v)
    scores = None
    if plan.row_outlier and plan.outlier is not None and plan.outlier_threshold is not None:
        scores = plan.outlier.scores(np.array([[values[i] for i in plan.row_outlier]], dtype=np.float64))
        if scores[0] > plan.outlier_threshold:
            names.append(OUTLIER)
    columns = {s.name: np.array([v], dtype=np.float64 if s.numeric else object)
               for s, v in zip(specs, values, strict=True)}
    return Verdicts(np.array([FALLBACK if names else OK], dtype=np.int8), np.ones((1, len(names)), dtype=bool),
                    names, columns, [], extra, scores, datetime_columns=plan.datetimes)


#: Integers beyond this are left to the columnar path (float() would overflow past ~1e308).
_INT_LIMIT = 2**1000


def _out_of_range(values: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """Values beyond [lo, hi]: one column with scalar bounds, or a (rows x columns) matrix with
    a bound per column."""
    oor = values < lo  # NaN compares False, without a warning
    oor |= values > hi
    return oor


def _numeric_block(columns: Mapping[str, Any], plan: CheckPlan) -> tuple[
        np.ndarray, np.ndarray, np.ndarray] | None:
    """The plan's block of numeric columns as one float64 matrix, with its null and
    out-of-range masks, when every one of them is a list of plain int or float values, integers
    whole: (matrix, nulls, out_of_range). None otherwise: the columns are then checked one by
    one, which also names each problem."""
    names = plan.block
    if len(names) < 2:
        return None
    raws = []
    for name in names:
        raw = columns.get(name)
        if type(raw) is not list:
            return None
        raws.append(raw)
    types: set[type] = set()
    for raw in raws:
        types.update(map(type, raw))
    if not types <= _NUMBER_SET:
        return None
    matrix = np.array(raws, dtype=np.float64).T
    integer = plan.block_integer
    if integer.size:
        part = matrix[:, integer]
        with np.errstate(invalid="ignore"):
            if (np.isfinite(part) & (np.mod(part, 1.0) != 0)).any():
                return None  # a fractional "integer": the per-column path names the rows
    return matrix, np.isnan(matrix), _out_of_range(matrix, plan.block_lo, plan.block_hi)


# -- coercion ----------------------------------------------------------------------------------

#: Below this many rows, plain Python over a column beats pandas' per-call overhead (a single-row
#: request would otherwise spend most of its time in pandas constructors).
SMALL = 64
#: Up to this many values, a category column is looked up value by value (a set or dict lookup
#: each) rather than through a hash table pandas builds.
ROW_BY_ROW = 4096
_NUMBER_TYPES = (int, float)
_NUMBER_SET = frozenset(_NUMBER_TYPES)


def _coded(values: Any, fp: FeatureProfile) -> Coded | None:
    """The column's codes (a dict lookup per value: what the set lookup of ``_isin`` costs), for
    object arrays of a size ``_isin`` looks up value by value; None otherwise."""
    if not isinstance(values, np.ndarray) or values.dtype != object or len(values) > ROW_BY_ROW:
        return None
    cats = fp.category_tuple
    dtype = np.int8 if len(cats) < 127 else np.int16 if len(cats) < 32767 else None
    if dtype is None:
        return None
    codes = np.fromiter(map(fp.category_index.get, values, repeat(-1)), dtype, len(values))
    return Coded(codes, cats, values)


def _isin(values: Any, fp: FeatureProfile) -> np.ndarray:
    if isinstance(values, np.ndarray):
        if len(values) <= ROW_BY_ROW:
            known = fp.category_set
            return np.fromiter(map(known.__contains__, values), bool, len(values))
        # dtype=object: otherwise pandas 3 converts the strings to Arrow first, which costs more.
        return pd.Series(values, dtype=object, copy=False).isin(list(fp.categories)).to_numpy()
    return pd.Series(values, copy=False).isin(list(fp.categories)).to_numpy()


_MISSING = object()  # a row that lacks the key altogether (rows given as mappings)
_EXPECTED = {
    "numeric": "number",
    "integer": "integer",
    "boolean": "boolean",
    "categorical": "string",
    "datetime": "ISO 8601 datetime",
}
CANNOT_CONVERT = "cannot convert"


def _expected(fp: FeatureProfile) -> str:
    if fp.is_datetime:
        return ("ISO 8601 datetime with a time zone" if fp.timezone
                else "ISO 8601 datetime without a time zone")
    return _EXPECTED[fp.kind]


def _empty(fp: FeatureProfile, n: int) -> np.ndarray:
    return np.full(n, np.nan) if fp.is_numeric else np.full(n, None, dtype=object)


def _show(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)[:80]


def _coerce(raw: Any, fp: FeatureProfile) -> tuple[Any, np.ndarray, np.ndarray | None, Any]:
    """(values, null mask, bad mask or None, why) for one column. Values of numeric kinds are
    float64 (NaN for null; datetimes in epoch seconds); of other kinds an object array of str
    (None for null). ``why`` names the problem of the bad rows: one string, or one per row."""
    if fp.is_datetime:
        return _coerce_datetime(raw, fp.timezone is not None)
    if fp.is_numeric:
        return (*_coerce_numeric(raw, fp.kind == "integer"), CANNOT_CONVERT)
    if fp.kind == "boolean":
        return (*_coerce_boolean(raw), CANNOT_CONVERT)
    return (*_coerce_categorical(raw), CANNOT_CONVERT)


def _coerce_numeric(raw: Any, integer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(raw, pd.Series) and pd.api.types.is_numeric_dtype(raw.dtype) \
            and not pd.api.types.is_bool_dtype(raw.dtype):
        arr = raw.to_numpy(dtype=np.float64, na_value=np.nan)  # nullable Int64 and friends too
    else:
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
    if isinstance(raw, list) and (not raw or set(map(type, raw)) == {str}):
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
    if pd.api.types.is_bool_dtype(s.dtype):  # numpy bool, or pandas' nullable "boolean"
        null = s.isna().to_numpy()
        out = np.where(s.to_numpy(dtype=bool, na_value=False), "True", "False").astype(object)
        out[null] = None
        return out, null, None
    null = s.isna().to_numpy()
    text = s.astype(str).str.strip().str.lower()
    true, false = text.isin(_TRUE).to_numpy(), text.isin(_FALSE).to_numpy()
    out = np.full(len(s), None, dtype=object)
    out[true], out[false] = "True", "False"
    bad = ~null & ~true & ~false
    return out, null, (bad if bad.any() else None)


# -- datetimes ---------------------------------------------------------------------------------

NAIVE_WHERE_AWARE = "naive datetime where training had time-zone-aware ones"
AWARE_WHERE_NAIVE = "time-zone-aware datetime where training had naive ones"


def _coerce_datetime(raw: Any, aware: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Any]:
    """Epoch seconds (NaN for null) of a datetime column: a pandas datetime column, or ISO 8601
    text and datetime objects. A value that is not a time, or naive where training was aware (or
    the reverse), is bad; ``why`` then says which, per row."""
    if isinstance(raw, pd.Series) and pd.api.types.is_datetime64_any_dtype(raw.dtype):
        null = raw.isna().to_numpy()
        values, _ = epoch_seconds(raw)
        if (getattr(raw.dtype, "tz", None) is not None) == aware:
            return values, null, None, CANNOT_CONVERT
        return values, np.zeros(len(raw), bool), ~null, NAIVE_WHERE_AWARE if aware else AWARE_WHERE_NAIVE
    obj = raw.to_numpy(dtype=object) if isinstance(raw, pd.Series) else _object_1d(raw)
    missing = np.fromiter((v is _MISSING for v in obj), bool, len(obj))
    if missing.any():
        obj = obj.copy()
        obj[missing] = None
    null = pd.isna(obj) if obj.size else np.zeros(0, dtype=bool)
    if len(obj) <= SMALL:
        values, aware_mask = _parse_times_small(obj)
    else:
        values, aware_mask = _parse_times(obj)
    unreadable = np.isnan(values) & ~null
    mismatch = ~null & ~unreadable & (aware_mask != aware)
    bad = unreadable | mismatch | missing
    if not bad.any():
        return values, null, None, CANNOT_CONVERT
    why = np.where(mismatch, NAIVE_WHERE_AWARE if aware else AWARE_WHERE_NAIVE, CANNOT_CONVERT)
    values = np.where(bad, np.nan, values)
    return values, null & ~bad, bad, why


def _parse_times_small(obj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds, aware) per value, in plain Python: a few values parse faster so than
    through pandas; what ``datetime.fromisoformat`` cannot read goes to pandas."""
    values = np.full(len(obj), np.nan)
    aware = np.zeros(len(obj), dtype=bool)
    rest = []
    for i, v in enumerate(obj):
        t = v
        if isinstance(v, str):
            try:
                t = datetime.fromisoformat(v)
            except ValueError:
                rest.append(i)
                continue
        if isinstance(t, datetime):
            aware[i] = t.tzinfo is not None
            values[i] = (t if aware[i] else t.replace(tzinfo=UTC)).timestamp()
        elif isinstance(t, (date, np.datetime64)):
            rest.append(i)
    if rest:
        values[rest], aware[rest] = _parse_times(obj[rest])
    return values, aware


def _parse_times(obj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch seconds, aware) per value, through pandas (ISO 8601 text, datetime objects)."""
    is_time = np.fromiter((isinstance(v, (str, date, np.datetime64)) for v in obj), bool, len(obj))
    kept = obj.copy()
    kept[~is_time] = None  # a number is not a time here (pandas would read it as nanoseconds)
    parsed = pd.to_datetime(pd.Series(kept, dtype=object), errors="coerce", utc=True, format="ISO8601")
    values, _ = epoch_seconds(parsed)
    return values, is_aware(kept)


def _datetimes(seconds: np.ndarray, tz: str | None) -> pd.Series:
    """Epoch seconds back to datetimes: in ``tz``, or naive (as the training column was)."""
    t = pd.Series(pd.to_datetime(seconds, unit="s", utc=True))
    return t.dt.tz_convert(tz) if tz else t.dt.tz_localize(None)
