"""The training profile: what the model saw in training, and how it behaved there.

Built once from a training DataFrame; saved as versioned, human-readable JSON with a content hash;
loaded (and validated) by every process that serves or monitors the model. Pure numpy/pandas.

>>> import pandas as pd
>>> df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "c": ["a", "b", "a", "b"], "y": [0, 1, 0, 1]})
>>> p = build_profile(df, target="y")
>>> p.feature("x").max, sorted(p.feature("c").categories)
(4.0, ['a', 'b'])
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .errors import ProfileError
from .policy import OUTLIER_QUANTILES

if TYPE_CHECKING:
    from .adapters.base import Model

FORMAT = "guarded-serving/profile"
VERSION = 1
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
DEFAULT_BINS = 20

Kind = Literal["numeric", "integer", "boolean", "categorical"]
KINDS: tuple[str, ...] = ("numeric", "integer", "boolean", "categorical")
NUMERIC_KINDS = ("numeric", "integer")


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

    @property
    def nullable(self) -> bool:
        """Whether training had nulls in this column."""
        return self.null_count > 0

    @property
    def is_numeric(self) -> bool:
        return self.kind in NUMERIC_KINDS

    @cached_property
    def category_set(self) -> frozenset[str]:
        return frozenset(self.categories)

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
        else:
            d["categories"] = self.categories
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @cached_property
    def numeric_ranges(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(names, minima, maxima) of the numeric features that have a training range."""
        ranged = [f for f in self.features if f.is_numeric and f.count]
        return ([f.name for f in ranged], np.array([float(f.min or 0.0) for f in ranged]),
                np.array([float(f.max or 0.0) for f in ranged]))

    @cached_property
    def integer_columns(self) -> np.ndarray:
        """Positions of the integer features in ``numeric_ranges``' names."""
        names = self.numeric_ranges[0]
        return np.array([i for i, n in enumerate(names) if self.feature(n).kind == "integer"], dtype=np.intp)

    def feature(self, name: str) -> FeatureProfile:
        try:
            return self._by_name[name]  # type: ignore[attr-defined, no-any-return]
        except KeyError:
            raise KeyError(f"no feature {name!r} in the profile") from None

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
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
        if version != VERSION:
            raise ProfileError(
                f"profile version {version!r} is not supported (this guarded-serving reads "
                f"version {VERSION}); rebuild it with `guarded-serving profile`"
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


# -- building ----------------------------------------------------------------------------------


def infer_kind(series: pd.Series) -> Kind:
    """The logical type of a training column, from its dtype."""
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
    if pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype):
        raise ProfileError(
            f"column {series.name!r} is a datetime; datetimes are not supported yet: derive "
            "numeric features from it or pass --exclude"
        )
    return "categorical"


def profile_feature(series: pd.Series, name: str, kind: Kind | None = None,
                    n_bins: int = DEFAULT_BINS) -> FeatureProfile:
    """Profile one column."""
    kind = kind or infer_kind(series)
    null_mask = series.isna().to_numpy()
    null_count = int(null_mask.sum())
    count = int(len(series) - null_count)
    if kind in NUMERIC_KINDS:
        x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
        x = x[~np.isnan(x)]
        if x.size == 0:
            return FeatureProfile(name, kind, 0, null_count)
        qs = np.quantile(x, QUANTILES)
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size < 2:  # a constant column: one bin around the value
            edges = np.array([edges[0], np.nextafter(edges[0], np.inf)])
        idx = np.clip(np.searchsorted(edges[1:-1], x, side="right"), 0, edges.size - 2)
        counts = np.bincount(idx, minlength=edges.size - 1)
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
            bin_counts=[int(c) for c in counts],
        )
    values = series[~null_mask]
    if kind == "boolean":
        values = values.astype(bool)
    counts_s = values.astype(str).value_counts()
    return FeatureProfile(
        name=name,
        kind=kind,
        count=count,
        null_count=null_count,
        categories={str(k): int(v) for k, v in counts_s.items()},
    )


def fit_outlier_model(df: pd.DataFrame, columns: list[str]) -> OutlierModel | None:
    """Fit the robust, shrunk Mahalanobis model over ``columns`` (None if fewer than 2 rows)."""
    x = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if x.shape[0] < 2 or not columns:
        return None
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
) -> Profile:
    """Profile ``data`` (features are every column but ``target`` and ``exclude``).

    With ``primary``, the profile records its prediction distribution on ``data``; with
    ``holdout`` too, the baseline metrics of the primary and of the ``fallback`` on that split.
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
    task = task or infer_task(data[target])
    if task not in ("regression", "classification"):
        raise ProfileError(f"task must be 'regression' or 'classification', got {task!r}")
    features = [profile_feature(data[c], str(c), n_bins=n_bins) for c in feature_cols]
    numeric = [f.name for f in features if f.is_numeric and (f.std or 0) > 0]
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
        outlier=fit_outlier_model(data, numeric),
        target_profile=target_profile,
        prediction_profile=prediction_profile,
        baseline=baseline,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
    )
