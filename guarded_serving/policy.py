"""Thresholds and defaults of the per-row checks, in one place.

Every default is documented here and nowhere else; the serving config's ``policy:`` block overrides
any of them by name, and ``policy.features.<name>`` overrides them for one feature. A feature's
rules resolve in this order: its own entry under ``features``, then the time-index defaults if the
column is a time index, then the global keys.

>>> p = Policy.from_dict({"range_margin": 0.05, "features": {"year": {"range": "ignore"}}},
...                      time_index=["date"])
>>> p.rules("year").range_margin is None, p.rules("carat").range_margin
(True, 0.05)
>>> r = p.rules("date")  # a time index: no range check, not in the outlier score, no drift test
>>> r.range_margin, r.outlier, r.drift, r.nulls
(None, False, False, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import ConfigError, Problem

OUTLIER_QUANTILES = (0.99, 0.995, 0.999, 0.9999)
#: Drift tests a feature can use (see ``drift.stats``): Pearson's chi-square goodness of fit on
#: the training buckets (significance and effect size), or the PSI alone (effect size only, for
#: features whose windows are so large that every difference is significant).
DRIFT_TESTS = ("chi2", "psi")
DriftTest = Literal["chi2", "psi"]
#: A per-feature switch reads "check" or "ignore" in the config.
_SWITCH = {"check": True, "ignore": False}


@dataclass(frozen=True)
class FeaturePolicy:
    """The policy of one feature, as written under ``policy.features.<name>``; ``None`` inherits.

    ``range`` is "check", "ignore" or a margin (a fraction of the training range, like
    ``range_margin``); ``categories`` and ``nulls`` are "check" or "ignore"; ``outlier`` and
    ``drift`` are booleans; ``drift_test`` one of ``DRIFT_TESTS``.

    >>> FeaturePolicy.from_dict("year", {"range": 0.1, "outlier": False}).range
    0.1
    """

    name: str
    range: Literal["check", "ignore"] | float | None = None
    categories: Literal["check", "ignore"] | None = None
    nulls: Literal["check", "ignore"] | None = None
    outlier: bool | None = None
    drift: bool | None = None
    drift_test: DriftTest | None = None

    @classmethod
    def from_dict(cls, name: str, data: Any) -> FeaturePolicy:
        """Validate one ``policy.features.<name>`` entry; every bad value is named."""
        where = f"policy.features.{name}"
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: must be a mapping of rule -> value, got {data!r}")
        known = [f.name for f in fields(cls) if f.name != "name"]
        problems = [
            Problem(f"unknown key; known keys are {known}", column=name, got=k)
            for k in data
            if k not in known
        ]
        for key, value in data.items():
            if key not in known or value is None:
                continue
            if key == "range":
                ok = value in _SWITCH or (_is_number(value) and value >= 0)
                expected = "'check', 'ignore' or a margin >= 0"
            elif key in ("categories", "nulls"):
                ok, expected = value in _SWITCH, "'check' or 'ignore'"
            elif key == "drift_test":
                ok, expected = value in DRIFT_TESTS, f"one of {list(DRIFT_TESTS)}"
            else:
                ok, expected = isinstance(value, bool), "true or false"
            if not ok:
                problems.append(
                    Problem(
                        f"{where}.{key} must be {expected}",
                        column=name,
                        expected=expected,
                        got=value,
                    )
                )
        if problems:
            raise ConfigError(
                f"{where}: "
                + "; ".join(
                    p.problem if p.expected else f"{p.problem}: {p.got!r}" for p in problems
                ),
                problems,
            )
        clean: dict[str, Any] = {k: (float(v) if k == "range" and _is_number(v) else v) for k, v in data.items()}
        return cls(name=name, **clean)


@dataclass(frozen=True)
class FeatureRules:
    """The resolved rules of one feature: what ``checks`` and ``drift`` apply to it.

    ``range_margin`` None means the range is not checked."""

    range_margin: float | None
    categories: bool
    nulls: bool
    outlier: bool
    drift: bool
    drift_test: DriftTest


@dataclass(frozen=True)
class Policy:
    """How strict the guard is.

    >>> Policy().range_margin
    0.0
    >>> Policy.from_dict({"range_margin": 0.1}).range_margin
    0.1
    """

    #: A numeric value is out of range when it lies beyond the training [min, max] by more than
    #: this fraction of the training range (0.0: exactly the training range).
    range_margin: float = 0.0
    #: Route rows with a category never seen in training to the fallback.
    check_categories: bool = True
    #: Route rows with a null in a column that had no nulls in training to the fallback.
    check_nulls: bool = True
    #: Multivariate outlier score threshold, as a quantile of the training scores
    #: (one of OUTLIER_QUANTILES); None turns the outlier check off.
    outlier_quantile: float | None = 0.999
    #: Columns the profile does not know: "ignore" (listed in the result) or "reject".
    extra_columns: Literal["ignore", "reject"] = "ignore"
    #: Put feature values on spans (off by default: they may be personal data).
    record_feature_values: bool = False
    #: The drift test of every feature that does not name its own (one of DRIFT_TESTS).
    drift_test: DriftTest = "chi2"
    #: Per-feature overrides (``policy.features.<name>``), one entry per feature named.
    features: tuple[FeaturePolicy, ...] = ()
    #: Columns that are the time of a row (the serving config's ``time_index``): not
    #: range-checked, left out of the outlier score and of the drift tests, unless their own
    #: ``features`` entry says otherwise. The profile's own time index (``profile
    #: --time-index``) adds to these.
    time_index: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.range_margin < 0:
            raise ConfigError("policy.range_margin must be >= 0", [])
        if self.outlier_quantile is not None and self.outlier_quantile not in OUTLIER_QUANTILES:
            raise ConfigError(
                f"policy.outlier_quantile must be one of {OUTLIER_QUANTILES} or null, "
                f"got {self.outlier_quantile!r}"
            )
        if self.extra_columns not in ("ignore", "reject"):
            raise ConfigError(
                f"policy.extra_columns must be 'ignore' or 'reject', got {self.extra_columns!r}"
            )
        if self.drift_test not in DRIFT_TESTS:
            raise ConfigError(
                f"policy.drift_test must be one of {list(DRIFT_TESTS)}, got {self.drift_test!r}"
            )
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ConfigError(f"policy.features names a feature twice: {names}")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | None, time_index: str | Sequence[str] | None = None
    ) -> Policy:
        """Build a policy from a mapping (the config's ``policy:`` block) and the config's
        ``time_index``, naming any unknown key or wrongly typed value."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"time_index"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown policy key(s) {unknown}; known keys are {sorted(known)}")
        features_raw = data.pop("features", None) or {}
        if not isinstance(features_raw, Mapping):
            raise ConfigError("policy.features must be a mapping of feature name -> rules")
        defaults = cls()
        for key, value in data.items():
            default = getattr(defaults, key)
            if key == "outlier_quantile" and value is None:
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = _is_number(value)
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ConfigError(
                    f"policy.{key} must be of type {type(default).__name__}, got {value!r}"
                )
        features = tuple(FeaturePolicy.from_dict(str(k), v) for k, v in features_raw.items())
        return replace(cls(), **data, features=features, time_index=_time_index(time_index))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["features"] = {
            f.name: {
                k.name: getattr(f, k.name)
                for k in fields(f)
                if k.name != "name" and getattr(f, k.name) is not None
            }
            for f in self.features
        }
        out["time_index"] = list(self.time_index)
        return out

    def with_time_index(self, columns: Iterable[str]) -> Policy:
        """The same policy with ``columns`` added to its time index."""
        extra = tuple(c for c in columns if c not in self.time_index)
        return replace(self, time_index=self.time_index + extra) if extra else self

    def rules(self, name: str, time_index: Iterable[str] = ()) -> FeatureRules:
        """The resolved rules of feature ``name``; ``time_index`` adds columns (the profile's
        own) to the policy's time index."""
        own = next((f for f in self.features if f.name == name), None)
        is_time = name in self.time_index or name in set(time_index)
        rules = FeatureRules(
            range_margin=None if is_time else self.range_margin,
            categories=self.check_categories,
            nulls=self.check_nulls,
            outlier=not is_time,
            drift=not is_time,
            drift_test=self.drift_test,
        )
        if own is None:
            return rules
        margin = rules.range_margin
        if own.range is not None:
            margin = (
                self.range_margin
                if own.range == "check"
                else None
                if own.range == "ignore"
                else float(own.range)
            )
        return replace(
            rules,
            range_margin=margin,
            categories=rules.categories if own.categories is None else _SWITCH[own.categories],
            nulls=rules.nulls if own.nulls is None else _SWITCH[own.nulls],
            outlier=rules.outlier if own.outlier is None else own.outlier,
            drift=rules.drift if own.drift is None else own.drift,
            drift_test=own.drift_test or rules.drift_test,
        )

    def require_features(self, feature_names: Iterable[str]) -> None:
        """Raise a ConfigError naming every feature of ``features`` or ``time_index`` that is
        not in ``feature_names`` (the profile's)."""
        known = set(feature_names)
        problems = [
            Problem(
                "no such feature in the profile",
                column=f.name,
                expected="a feature of the profile",
                got=f.name,
            )
            for f in self.features
            if f.name not in known
        ]
        problems += [
            Problem(
                "time_index names no feature of the profile",
                column=c,
                expected="a feature of the profile",
                got=c,
            )
            for c in self.time_index
            if c not in known
        ]
        if problems:
            names = ", ".join(repr(p.column) for p in problems)
            raise ConfigError(
                f"policy names feature(s) the profile does not have: {names}; the profile's "
                f"features are {sorted(known)}",
                problems,
            )


def _time_index(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"time_index: must be a column name or a list of them, got {value!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
