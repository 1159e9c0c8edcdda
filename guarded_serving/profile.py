"""The training profile: what the model saw in training, and how it behaved there.

Built once from a training DataFrame; saved as versioned, human-readable JSON with a content hash;
loaded (and validated) by every process that serves or monitors the model. Pure numpy/pandas.

>>> import pandas as pd
>>> df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "c": ["a", "b", "a", "b"], "y": [0, 1, 0, 1]})
>>> p = build_profile(df, target="y")
>>> p.feature("x").max, sorted(p.feature("c").categories)
(4.0, ['a', 'b'])

Datetimes are profiled as epoch seconds (naive ones as if UTC), with their time zone recorded:

>>> t = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=4, freq="D", tz="UTC"), "y": [1.0] * 4})
>>> f = build_profile(t, target="y").feature("t")
>>> f.kind, f.timezone, f.min == pd.Timestamp("2024-01-01", tz="UTC").timestamp()
('datetime', 'UTC', True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .errors import Problem, ProfileError
from .policy import OUTLIER_QUANTILES

if TYPE_CHECKING:
    from .adapters.base import Model

log = logging.getLogger(__name__)

FORMAT = "guarded-serving/profile"
#: Version 2 added datetime features, ``time_index``, and the ``timezone``, ``other_count`` and
#: ``invalid_*`` fields of a feature; version 1 profiles load with those at their defaults.
VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
DEFAULT_BINS = 20
#: A categorical column keeps its most frequent values up to this many; the rest are counted
#: together as "other" (so a column of user ids keeps the profile small).
DEFAULT_MAX_CATEGORIES = 200
#: A column with more distinct values than that keeps only those with at least this many rows
#: (and at least 1/max_categories of them).
MIN_KEPT_COUNT = 20
#: A text column is numeric when at least this share of its non-null values reads as a number;
#: the rest are reported as invalid (``invalid_count``, ``invalid_values``), never silently
#: turning the column categorical. ``categorical=`` forces such a column categorical.
NUMERIC_LOOKING_SHARE = 0.95
#: How many invalid values a feature profile keeps as examples.
INVALID_EXAMPLES = 5

Kind = Literal["numeric", "integer", "boolean", "categorical", "datetime"]
KINDS: tuple[str, ...] = ("numeric", "integer", "boolean", "categorical", "datetime")
#: Kinds whose values are numbers to the checks and drift (datetimes as epoch seconds): they have
#: a range, quantiles and histogram bins.
NUMERIC_KINDS = ("numeric", "integer", "datetime")


def _f(x: Any) -> float | None:
    """A JSON-safe float (None for NaN/missing)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class FeatureProfile:
    """What one column looked like in training.

    Numeric and integer columns carry ``bin_edges`` (B+1 increasing edges from min to max, at
    training quantiles) and ``bin_counts`` (B counts). A value falls in bin
    ``clip(searchsorted(bin_edges[1:-1], x, side="right"), 0, B-1)``; drift monitoring counts live
    traffic into the same bins. Categorical and boolean columns carry ``categories``: value (as a
    string) -> training count.
    """

    name: str
    kind: Kind
    count: int
    null_count: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)
    bin_edges: list[float] = field(default_factory=list)
    bin_counts: list[int] = field(default_factory=list)
    categories: dict[str, int] = field(default_factory=dict)
    #: Datetime features: the training values' time zone ("UTC", "America/Chicago"), or None for
    #: naive timestamps. Live values must be aware exactly when training's were.
    timezone: str | None = None
    #: Categorical features: training values beyond the ``DEFAULT_MAX_CATEGORIES`` most frequent.
    other_count: int = 0
    #: Numeric features read from text: values that were not numbers (left out of the statistics).
    invalid_count: int = 0
    invalid_values: dict[str, int] = field(default_factory=dict)

    @property
    def nullable(self) -> bool:
        """Whether training had nulls in this column."""
        return self.null_count > 0

    @property
    def is_numeric(self) -> bool:
        """Numbers to the checks and drift (datetimes as epoch seconds)."""
        return self.kind in NUMERIC_KINDS

    @property
    def is_datetime(self) -> bool:
        return self.kind == "datetime"

    @property
    def categories_truncated(self) -> bool:
        """Whether training had more distinct values than the profile keeps: a value not among
        them may still have been seen, so it is not flagged as unseen."""
        return self.other_count > 0

    @cached_property
    def category_set(self) -> frozenset[str]:
        return frozenset(self.categories)

    @cached_property
    def category_tuple(self) -> tuple[str, ...]:
        return tuple(self.categories)

    @cached_property
    def category_index(self) -> dict[str, int]:
        """Category -> its position in ``categories`` (the codes of ``Verdicts.codes``)."""
        return {c: i for i, c in enumerate(self.categories)}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "null_count": self.null_count,
        }
        if self.is_numeric:
            d.update(
                min=self.min,
                max=self.max,
                mean=self.mean,
                std=self.std,
                quantiles=self.quantiles,
                bin_edges=self.bin_edges,
                bin_counts=self.bin_counts,
            )
            if self.is_datetime:
                d["timezone"] = self.timezone
                d["min_time"], d["max_time"] = _iso(self.min, self.timezone), _iso(self.max, self.timezone)
            if self.invalid_count:
                d["invalid_count"], d["invalid_values"] = self.invalid_count, self.invalid_values
        else:
            d["categories"] = self.categories
            if self.other_count:
                d["other_count"] = self.other_count
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> FeatureProfile:
        _require(d, ("name", "kind", "count", "null_count"), where)
        if d["kind"] not in KINDS:
            raise ProfileError(f"{where}.kind must be one of {KINDS}, got {d['kind']!r}")
        fp = cls(
            name=str(d["name"]),
            kind=d["kind"],
            count=int(d["count"]),
            null_count=int(d["null_count"]),
            min=_f(d.get("min")),
            max=_f(d.get("max")),
            mean=_f(d.get("mean")),
            std=_f(d.get("std")),
            quantiles={str(k): float(v) for k, v in (d.get("quantiles") or {}).items()},
            bin_edges=[float(x) for x in d.get("bin_edges") or []],
            bin_counts=[int(x) for x in d.get("bin_counts") or []],
            categories={str(k): int(v) for k, v in (d.get("categories") or {}).items()},
            timezone=None if d.get("timezone") is None else str(d["timezone"]),
            other_count=int(d.get("other_count", 0)),
            invalid_count=int(d.get("invalid_count", 0)),
            invalid_values={str(k): int(v) for k, v in (d.get("invalid_values") or {}).items()},
        )
        if fp.is_numeric and fp.count > 0:
            if fp.min is None or fp.max is None:
                raise ProfileError(f"{where}: a {fp.kind} feature needs min and max")
            if len(fp.bin_edges) != len(fp.bin_counts) + 1 or not fp.bin_counts:
                raise ProfileError(
                    f"{where}: bin_edges must have one more entry than bin_counts "
                    f"(got {len(fp.bin_edges)} and {len(fp.bin_counts)})"
                )
            if any(b <= a for a, b in zip(fp.bin_edges, fp.bin_edges[1:], strict=False)):
                raise ProfileError(f"{where}: bin_edges must be strictly increasing")
        return fp


@dataclass(frozen=True)
class OutlierModel:
    """A Mahalanobis-style score over the numeric features.

    Each value is robustly standardised ((x - median) / (IQR / 1.349)); the covariance of the
    standardised training data (winsorised at +-4 and shrunk towards the identity, Ledoit-Wolf) is
    inverted once. The score of a row is sqrt(z' P z); nulls count as the median.
    ``score_quantiles`` holds the training scores' quantiles, from which the policy picks a threshold.
    """

    columns: list[str]
    center: list[float]
    scale: list[float]
    precision: list[list[float]]
    shrinkage: float
    score_quantiles: dict[str, float]

    def threshold(self, quantile: float) -> float:
        return self.score_quantiles[_qkey(quantile)]

    def without(self, columns: Iterable[str]) -> OutlierModel | None:
        """The score over the other columns only (None if fewer than one is left).

        The precision of the remaining columns is the inverse of their block of the covariance
        (the marginal distribution, not the conditional one). Its training quantiles are not
        known without the training data, so each is scaled by the ratio of the chi-square
        quantiles (score^2 of k Gaussian features follows chi2(k)): an approximation that
        ``profile --time-index`` (or ``--no-outlier``) avoids by leaving the column out at fit time.
        """
        drop = set(columns) & set(self.columns)
        if not drop:
            return self
        keep = [i for i, c in enumerate(self.columns) if c not in drop]
        if not keep:
            return None
        from scipy.stats import chi2

        cov = np.linalg.pinv(np.asarray(self.precision))
        precision = np.linalg.pinv(cov[np.ix_(keep, keep)])
        k, k2 = len(self.columns), len(keep)
        quantiles = {}
        for key, v in self.score_quantiles.items():
            q = float(key)
            quantiles[key] = v * math.sqrt(chi2.ppf(q, k2) / chi2.ppf(q, k))
        return OutlierModel(
            columns=[self.columns[i] for i in keep],
            center=[self.center[i] for i in keep],
            scale=[self.scale[i] for i in keep],
            precision=[[float(x) for x in row] for row in precision],
            shrinkage=self.shrinkage,
            score_quantiles=quantiles,
        )

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        """Scores of an (n_rows, n_columns) float matrix whose columns follow ``columns``."""
        center, scale, p = self._arrays
        z = (matrix - center) / scale
        z[np.isnan(z)] = 0.0
        # einsum, not (.. * z).sum(axis=1): a row-wise sum over a narrow matrix is 3x slower.
        return np.sqrt(np.maximum(np.einsum("ij,ij->i", z @ p, z), 0.0))

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.center), np.asarray(self.scale), np.asarray(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "center": self.center,
            "scale": self.scale,
            "precision": self.precision,
            "shrinkage": self.shrinkage,
            "score_quantiles": self.score_quantiles,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutlierModel:
        _require(d, ("columns", "center", "scale", "precision", "score_quantiles"), "outlier")
        k = len(d["columns"])
        if len(d["center"]) != k or len(d["scale"]) != k or len(d["precision"]) != k:
            raise ProfileError("outlier: columns, center, scale and precision differ in length")
        missing = [_qkey(q) for q in OUTLIER_QUANTILES if _qkey(q) not in d["score_quantiles"]]
        if missing:
            raise ProfileError(f"outlier.score_quantiles lacks {missing}")
        return cls(
            columns=[str(c) for c in d["columns"]],
            center=[float(x) for x in d["center"]],
            scale=[float(x) for x in d["scale"]],
            precision=[[float(x) for x in row] for row in d["precision"]],
            shrinkage=float(d.get("shrinkage", 0.0)),
            score_quantiles={str(k): float(v) for k, v in d["score_quantiles"].items()},
        )


@dataclass(frozen=True)
class Profile:
    """The profile of a training set: features, outlier model, target, predictions, baseline.

    ``baseline`` maps a model role ("primary", "fallback") to its metrics on the held-out split
    (see ``scoring.score``), empty when no split was given.
    """

    features: list[FeatureProfile]
    target: str
    task: str
    n_rows: int
    outlier: OutlierModel | None = None
    target_profile: FeatureProfile | None = None
    prediction_profile: FeatureProfile | None = None
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    created_at: str = ""
    source: str = ""
    #: Columns that are the time of a row (``profile --time-index``): profiled like any feature,
    #: left out of the outlier model, and under the time-index rules of ``policy.Policy``.
    time_index: list[str] = field(default_factory=list)
    #: The format version the profile was read from (it is written back in the same version, so
    #: its content hash, which drift states refer to, does not change).
    version: int = VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature(self, name: str) -> FeatureProfile:
        try:
            return self._by_name[name]  # type: ignore[attr-defined, no-any-return]
        except KeyError:
            raise KeyError(f"no feature {name!r} in the profile") from None

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "source": self.source,
            "target": self.target,
            "task": self.task,
            "n_rows": self.n_rows,
            "features": [f.to_dict() for f in self.features],
            "outlier": self.outlier.to_dict() if self.outlier else None,
            "target_profile": self.target_profile.to_dict() if self.target_profile else None,
            "prediction_profile": (
                self.prediction_profile.to_dict() if self.prediction_profile else None
            ),
            "baseline": self.baseline,
        }
        if self.version >= 2:
            body["time_index"] = self.time_index
        body["content_hash"] = content_hash(body)
        return body

    @property
    def content_hash(self) -> str:
        return self.to_dict()["content_hash"]  # type: ignore[no-any-return]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: Any) -> Profile:
        """Validate and load; every error names what is wrong and where."""
        if not isinstance(d, dict):
            raise ProfileError("a profile must be a JSON object")
        if d.get("format") != FORMAT:
            raise ProfileError(
                f"not a guarded-serving profile (format is {d.get('format')!r}, expected {FORMAT!r})"
            )
        version = d.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ProfileError(
                f"profile version {version!r} is not supported (this guarded-serving reads "
                f"versions {list(READABLE_VERSIONS)}); rebuild it with `guarded-serving profile`"
            )
        _require(d, ("target", "task", "n_rows", "features", "content_hash"), "profile")
        expected = content_hash(d)
        if d["content_hash"] != expected:
            raise ProfileError(
                "profile content hash does not match its content (edited by hand or truncated?); "
                f"stored {d['content_hash']}, computed {expected}. Rebuild it with "
                "`guarded-serving profile`"
            )
        if not isinstance(d["features"], list) or not d["features"]:
            raise ProfileError("profile.features must be a non-empty list")
        features = [
            FeatureProfile.from_dict(f, f"features[{i}]") for i, f in enumerate(d["features"])
        ]
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ProfileError("profile.features has duplicate names")
        outlier = OutlierModel.from_dict(d["outlier"]) if d.get("outlier") else None
        if outlier and set(outlier.columns) - set(names):
            raise ProfileError("outlier.columns names features the profile does not have")
        time_index = [str(c) for c in d.get("time_index") or []]
        if set(time_index) - set(names):
            raise ProfileError(f"profile.time_index names columns that are not features: "
                               f"{sorted(set(time_index) - set(names))}")
        return cls(
            features=features,
            target=str(d["target"]),
            task=str(d["task"]),
            n_rows=int(d["n_rows"]),
            outlier=outlier,
            target_profile=(
                FeatureProfile.from_dict(d["target_profile"], "target_profile")
                if d.get("target_profile")
                else None
            ),
            prediction_profile=(
                FeatureProfile.from_dict(d["prediction_profile"], "prediction_profile")
                if d.get("prediction_profile")
                else None
            ),
            baseline={
                str(k): {str(m): float(v) for m, v in ms.items()}
                for k, ms in (d.get("baseline") or {}).items()
            },
            created_at=str(d.get("created_at", "")),
            source=str(d.get("source", "")),
            time_index=time_index,
            version=int(version),
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile {path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except ProfileError as e:
            raise ProfileError(f"{path}: {e.message}") from e
        except (TypeError, ValueError) as e:
            raise ProfileError(f"{path}: malformed profile ({e})") from e


def content_hash(body: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of everything but the hash itself."""
    payload = {k: v for k, v in body.items() if k != "content_hash"}
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _require(d: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(d, dict):
        raise ProfileError(f"{where} must be an object")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ProfileError(f"{where} lacks required key(s) {missing}")


def _qkey(q: float) -> str:
    return repr(float(q))


def _iso(seconds: float | None, timezone: str | None) -> str | None:
    """An epoch-seconds value as ISO 8601, in ``timezone`` (naive if None)."""
    if seconds is None:
        return None
    ts = pd.Timestamp(seconds, unit="s", tz="UTC")
    return (ts.tz_convert(timezone) if timezone else ts.tz_localize(None)).isoformat()


# -- building ----------------------------------------------------------------------------------

# An ISO 8601 time of day followed by a zone designator ("2024-01-01" alone has no zone).
_AWARE_TEXT = r"[T ]\d\d(?::?\d\d(?::?\d\d(?:[.,]\d+)?)?)?\s*(?:[Zz]|[+-]\d\d(?::?\d\d)?)$"


def infer_kind(series: pd.Series) -> Kind:
    """The logical type of a training column, from its dtype (and, for text, its values).

    A text column whose values read as numbers (at least ``NUMERIC_LOOKING_SHARE`` of them) is
    numeric, one whose values all read as ISO 8601 times is a datetime; any other is categorical.
    """
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_float_dtype(dtype):
        non_null = series.dropna()
        if len(non_null) and np.all(np.mod(non_null.to_numpy(), 1) == 0) and series.isna().any():
            # pandas turns an integer column with nulls into float; keep its integer nature.
            return "integer"
        return "numeric"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if pd.api.types.is_timedelta64_dtype(dtype):
        raise ProfileError(
            f"column {series.name!r} is a timedelta; durations are not supported: convert it to "
            "seconds (a number) or pass --exclude"
        )
    if isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    values = series.dropna()
    if values.empty:
        return "categorical"
    inferred = pd.api.types.infer_dtype(values, skipna=True)
    if inferred == "boolean":
        return "boolean"
    if inferred in ("datetime", "datetime64", "date"):
        return "datetime"
    numbers = _as_numbers(values)
    parsed = np.isfinite(numbers)
    if parsed.mean() >= NUMERIC_LOOKING_SHARE:
        return "integer" if np.all(np.mod(numbers[parsed], 1) == 0) else "numeric"
    if inferred == "string" and _looks_like_datetimes(values):
        return "datetime"
    return "categorical"


def _as_numbers(values: pd.Series) -> np.ndarray:
    """Values as float64, NaN where one is not a number (booleans are not numbers here)."""
    obj = values.to_numpy(dtype=object)
    isbool = np.fromiter((isinstance(v, (bool, np.bool_)) for v in obj), bool, len(obj))
    if isbool.any():
        obj = obj.copy()
        obj[isbool] = None
    return pd.to_numeric(pd.Series(obj, dtype=object), errors="coerce").to_numpy(dtype=np.float64)


def _looks_like_datetimes(values: pd.Series) -> bool:
    sample = values.iloc[:1000].astype(str)
    if not sample.str.match(r"\d{4}-\d\d").all():
        return False
    parsed = pd.to_datetime(sample, errors="coerce", utc=True, format="ISO8601")
    return bool(parsed.notna().all())


def is_missing(v: Any) -> bool:
    """Whether one value is what pandas counts as missing among a column's objects: None, NaN,
    ``pd.NA`` or ``NaT`` (the code -1 of ``pd.factorize``)."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v)


def epoch_seconds(series: pd.Series, name: str | None = None) -> tuple[np.ndarray, str | None]:
    """A datetime column as float64 epoch seconds (NaN for null) and its time zone (None for naive
    timestamps, read as if UTC). Text and datetime objects are parsed as ISO 8601; a column that
    mixes naive and aware timestamps, or holds a value that is not a time, is a ProfileError
    naming the column and the first such row."""
    name = str(series.name if name is None else name)
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        tz = getattr(series.dtype, "tz", None)
        s = series.dt.tz_convert("UTC").dt.tz_localize(None) if tz is not None else series
        arr = s.to_numpy(dtype="datetime64[us]")
        out = arr.astype(np.int64).astype(np.float64) / 1e6
        out[np.isnat(arr)] = np.nan
        return out, (None if tz is None else str(tz))
    obj = series.to_numpy(dtype=object)
    null = pd.isna(obj)
    aware = is_aware(obj)
    if aware.any() and (~aware & ~null).any():
        row = int(np.flatnonzero(~aware & ~null)[0])
        raise ProfileError(
            f"column {name!r} mixes naive and time-zone-aware timestamps (row {row}: "
            f"{obj[row]!r} has no time zone, row {int(np.flatnonzero(aware)[0])} has one); "
            "make them all one or the other",
            [Problem("naive and aware timestamps mixed", row, name, "one kind of timestamp",
                     str(obj[row]))],
        )
    parsed = pd.to_datetime(pd.Series(obj, dtype=object), errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy() & ~null
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ProfileError(f"column {name!r} row {row}: {obj[row]!r} is not a date or time",
                           [Problem("cannot convert", row, name, "ISO 8601 datetime", str(obj[row]))])
    tz = None
    if aware.any():
        first = obj[int(np.flatnonzero(aware)[0])]
        tz = str(getattr(first, "tzinfo", None) or "UTC")
    seconds, _ = epoch_seconds(parsed, name)
    return seconds, tz


def is_aware(obj: np.ndarray) -> np.ndarray:
    """Per value: a time-zone-aware timestamp (an object with a tzinfo, or text with a zone)."""
    out = np.fromiter((getattr(v, "tzinfo", None) is not None for v in obj), bool, len(obj))
    text = np.fromiter((isinstance(v, str) for v in obj), bool, len(obj))
    if text.any():
        zoned = pd.Series(obj[text], dtype=object).str.contains(_AWARE_TEXT, regex=True)
        out[text] = zoned.to_numpy(dtype=bool)
    return out


def profile_feature(series: pd.Series, name: str, kind: Kind | None = None,
                    n_bins: int = DEFAULT_BINS,
                    max_categories: int = DEFAULT_MAX_CATEGORIES) -> FeatureProfile:
    """Profile one column."""
    kind = kind or infer_kind(series)
    null_mask = np.asarray(series.isna().to_numpy(), dtype=bool)
    invalid_count, invalid_values, timezone = 0, {}, None
    if kind == "datetime":
        x, timezone = epoch_seconds(series, name)
    elif kind in NUMERIC_KINDS:
        x = _as_numbers(series) if series.dtype == object or pd.api.types.is_string_dtype(series.dtype) \
            else series.to_numpy(dtype=np.float64, na_value=np.nan)
        invalid = np.isnan(x) & ~null_mask
        if invalid.any():
            invalid_count = int(invalid.sum())
            counts = series[invalid].astype(str).value_counts().iloc[:INVALID_EXAMPLES]
            invalid_values = {str(k): int(v) for k, v in counts.items()}
            log.warning("column %r is numeric; %d value(s) that are not numbers were left out: %s",
                        name, invalid_count, invalid_values)
    null_count = int(null_mask.sum())
    count = int(len(series) - null_count - invalid_count)
    if kind in NUMERIC_KINDS:
        x = x[~np.isnan(x)]
        if x.size == 0:
            return FeatureProfile(name, kind, 0, null_count, timezone=timezone,
                                  invalid_count=invalid_count, invalid_values=invalid_values)
        qs = np.quantile(x, QUANTILES)
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size < 2:  # a constant column: one bin around the value
            edges = np.array([edges[0], np.nextafter(edges[0], np.inf)])
        idx = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, edges.size - 2)
        counts_b = np.bincount(idx, minlength=edges.size - 1)
        return FeatureProfile(
            name=name,
            kind=kind,
            count=count,
            null_count=null_count,
            min=float(x.min()),
            max=float(x.max()),
            mean=float(x.mean()),
            std=float(x.std()),
            quantiles={_qkey(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
            bin_edges=[float(e) for e in edges],
            bin_counts=[int(c) for c in counts_b],
            timezone=timezone,
            invalid_count=invalid_count,
            invalid_values=invalid_values,
        )
    values = series[~null_mask]
    if kind == "boolean":
        values = values.astype(bool)
    counts_s = values.astype(str).value_counts()
    kept = counts_s.iloc[:max_categories]
    if len(counts_s) > max_categories:
        # Among thousands of rare values, the most frequent are so partly by chance, and less
        # frequent in fresh data: drift would see a shift that is not there. Only values
        # frequent enough to be frequent for a reason are kept apart from "other".
        kept = kept[kept >= max(MIN_KEPT_COUNT, count / max_categories)]
    return FeatureProfile(
        name=name,
        kind=kind,
        count=count,
        null_count=null_count,
        categories={str(k): int(v) for k, v in kept.items()},
        other_count=int(counts_s.sum() - kept.sum()),
    )


def feature_matrix(data: pd.DataFrame, features: Sequence[FeatureProfile]) -> np.ndarray:
    """The numeric and datetime ``features`` of ``data`` as one float64 matrix (datetimes in
    epoch seconds, anything unreadable NaN)."""
    cols = []
    for f in features:
        s = data[f.name]
        if f.is_datetime:
            cols.append(epoch_seconds(s, f.name)[0])
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            cols.append(_as_numbers(s))
        else:
            cols.append(s.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.column_stack(cols) if cols else np.zeros((len(data), 0))


def fit_outlier_model(df: pd.DataFrame, columns: list[str],
                      features: Sequence[FeatureProfile] | None = None) -> OutlierModel | None:
    """Fit the robust, shrunk Mahalanobis model over ``columns`` (None if fewer than 2 rows).
    ``features`` (their profiles) say how to read them; by default they are read as numbers."""
    if df.shape[0] < 2 or not columns:
        return None
    by_name = {f.name: f for f in features or []}
    x = feature_matrix(df, [by_name.get(c) or FeatureProfile(c, "numeric", 0, 0) for c in columns])
    center = np.nanmedian(x, axis=0)
    q75, q25 = np.nanpercentile(x, [75, 25], axis=0)
    scale = (q75 - q25) / 1.349
    std = np.nanstd(x, axis=0)
    scale = np.where(scale > 0, scale, np.where(std > 0, std, 1.0))
    z = (x - center) / scale
    z = np.where(np.isnan(z), 0.0, z)
    zw = np.clip(z, -4.0, 4.0)
    cov, shrinkage = _ledoit_wolf(zw)
    precision = np.linalg.pinv(cov)
    scores = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, precision, z), 0.0))
    return OutlierModel(
        columns=list(columns),
        center=[float(c) for c in center],
        scale=[float(s) for s in scale],
        precision=[[float(v) for v in row] for row in precision],
        shrinkage=float(shrinkage),
        score_quantiles={
            _qkey(q): float(v)
            for q, v in zip(OUTLIER_QUANTILES, np.quantile(scores, OUTLIER_QUANTILES), strict=True)
        },
    )


def _ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrinkage covariance of x (rows are samples), towards a scaled identity."""
    n, p = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = np.trace(emp) / p
    target = mu * np.eye(p)
    delta = np.sum((emp - target) ** 2) / p
    x2 = xc**2
    beta_ = (np.sum(x2.T @ x2) / n - np.sum(emp**2)) / (n * p)
    beta = min(beta_, delta)
    shrinkage = 0.0 if delta == 0 else beta / delta
    return shrinkage * target + (1.0 - shrinkage) * emp, shrinkage


def infer_task(target: pd.Series) -> str:
    """Classification for boolean, categorical or few-valued integer targets; else regression."""
    kind = infer_kind(target)
    if kind in ("boolean", "categorical"):
        return "classification"
    if kind == "integer" and target.nunique(dropna=True) <= 20:
        return "classification"
    return "regression"


def build_profile(
    data: pd.DataFrame,
    target: str,
    *,
    exclude: tuple[str, ...] | list[str] = (),
    task: str | None = None,
    n_bins: int = DEFAULT_BINS,
    primary: Model | None = None,
    fallback: Model | None = None,
    holdout: pd.DataFrame | None = None,
    source: str = "",
    time_index: Sequence[str] = (),
    categorical: Sequence[str] = (),
    no_outlier: Sequence[str] = (),
    max_categories: int = DEFAULT_MAX_CATEGORIES,
) -> Profile:
    """Profile ``data`` (features are every column but ``target`` and ``exclude``).

    With ``primary``, the profile records its prediction distribution on ``data``; with
    ``holdout`` too, the baseline metrics of the primary and of the ``fallback`` on that split.
    ``time_index`` columns are the time of a row (see ``Profile.time_index``); ``categorical``
    columns are profiled as categories whatever their values look like; ``no_outlier`` columns
    (and the time index) are left out of the outlier model.
    """
    if target not in data.columns:
        raise ProfileError(f"target column {target!r} is not in the data (columns: {list(data.columns)})")
    missing = [c for c in exclude if c not in data.columns]
    if missing:
        raise ProfileError(f"--exclude names columns the data does not have: {missing}")
    if len(data) == 0:
        raise ProfileError("cannot profile an empty data set")
    feature_cols = [c for c in data.columns if c != target and c not in set(exclude)]
    if not feature_cols:
        raise ProfileError("no feature columns left to profile")
    for option, cols in (("--time-index", time_index), ("--categorical", categorical),
                         ("--no-outlier", no_outlier)):
        unknown = [c for c in cols if c not in feature_cols]
        if unknown:
            raise ProfileError(f"{option} names columns that are not features: {unknown} "
                               f"(features: {[str(c) for c in feature_cols]})")
    task = task or infer_task(data[target])
    if task not in ("regression", "classification"):
        raise ProfileError(f"task must be 'regression' or 'classification', got {task!r}")
    features = [profile_feature(data[c], str(c), "categorical" if c in categorical else None,
                                n_bins, max_categories) for c in feature_cols]
    left_out = {*time_index, *no_outlier}
    numeric = [f.name for f in features
               if f.is_numeric and (f.std or 0) > 0 and f.name not in left_out]
    target_kind: Kind = "numeric" if task == "regression" else "categorical"
    target_profile = profile_feature(data[target], target, target_kind, n_bins)
    prediction_profile = None
    baseline: dict[str, dict[str, float]] = {}
    if primary is not None:
        preds = primary.predict(data[feature_cols]).labels
        prediction_profile = profile_feature(pd.Series(preds), "prediction", target_kind, n_bins)
        if holdout is not None:
            from .scoring import score

            for role, model in (("primary", primary), ("fallback", fallback)):
                if model is None:
                    continue
                out = model.predict(holdout[feature_cols])
                baseline[role] = score(task, holdout[target].to_numpy(), out.labels, out)
    return Profile(
        features=features,
        target=target,
        task=task,
        n_rows=int(len(data)),
        outlier=fit_outlier_model(data, numeric, features),
        target_profile=target_profile,
        prediction_profile=prediction_profile,
        baseline=baseline,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
        time_index=[str(c) for c in time_index],
    )
