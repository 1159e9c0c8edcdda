"""Thresholds and defaults of the per-row checks, in one place.

Every default is documented here and nowhere else; the serving config's ``policy:`` block overrides
any of them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import ConfigError

OUTLIER_QUANTILES = (0.99, 0.995, 0.999, 0.9999)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Policy:
        """Build a policy from a mapping, naming any unknown key or wrongly typed value."""
        data = dict(data or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown policy key(s) {unknown}; known keys are {sorted(known)}"
            )
        defaults = cls()
        for key, value in data.items():
            default = getattr(defaults, key)
            if key == "outlier_quantile" and value is None:
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise ConfigError(
                    f"policy.{key} must be of type {type(default).__name__}, got {value!r}"
                )
        return replace(cls(), **data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
