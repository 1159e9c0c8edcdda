"""Drift windows by calendar period of a time index: one ``DriftState`` per month (or day, week,
quarter, year) of the rows' own time, not of their arrival. Pure numpy/pandas.

Serving windows (``windows``) cut traffic by when it arrived; a batch of history (a backfill, an
export, a test set) arrives at once but spans years. Counting it by the period its time index
names shows when it drifted.

>>> import numpy as np, pandas as pd
>>> from guarded_serving.profile import build_profile
>>> t = pd.date_range("2020-01-01", periods=400, freq="D")
>>> p = build_profile(pd.DataFrame({"t": t, "x": np.arange(400.0), "y": 0.0}), "y", time_index=["t"])
>>> states = PeriodStates.empty(p, "t", "quarter")
>>> live = pd.DataFrame({"t": t[:200], "x": np.arange(200.0)})
>>> states.update(dict(live.items()))
>>> [(period, s.rows) for period, s in states.states.items()]
[('2020Q1', 91), ('2020Q2', 91), ('2020Q3', 18)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..profile import Profile, epoch_seconds
from .state import DriftState
from .stats import DriftThresholds, evaluate

#: Calendar periods, as pandas period codes.
PERIODS = {"day": "D", "week": "W", "month": "M", "quarter": "Q", "year": "Y"}


def period_labels(seconds: np.ndarray, period: str, timezone: str | None = None) -> np.ndarray:
    """The calendar ``period`` ("2012-03", "2012Q1"...) of each epoch-seconds value, read in
    ``timezone`` (naive values: as they are); None for a null."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {list(PERIODS)}, got {period!r}")
    t = pd.Series(pd.to_datetime(seconds, unit="s", utc=True))
    local = t.dt.tz_convert(timezone).dt.tz_localize(None) if timezone else t.dt.tz_localize(None)
    labels = local.dt.to_period(PERIODS[period]).astype(str).to_numpy(dtype=object)
    labels[np.isnan(seconds)] = None
    return labels  # type: ignore[no-any-return]


@dataclass
class PeriodStates:
    """A ``DriftState`` per calendar period of the datetime feature ``column``.

    Build with ``empty``, feed with ``update`` (columns as the checks hand them over, or a
    DataFrame's), read with ``evaluate``. Rows whose time is null are counted under ``None``.
    """

    profile: Profile
    column: str
    period: str
    states: dict[str | None, DriftState] = field(default_factory=dict)

    @classmethod
    def empty(cls, profile: Profile, column: str, period: str) -> PeriodStates:
        fp = profile.feature(column)
        if not fp.is_datetime:
            raise ValueError(f"{column!r} is a {fp.kind} feature; drift by period needs a datetime")
        if period not in PERIODS:
            raise ValueError(f"period must be one of {list(PERIODS)}, got {period!r}")
        return cls(profile, column, period)

    def update(self, columns: Mapping[str, Any], predictions: Any = None) -> None:
        """Count one batch, each row into the state of its period."""
        values = columns[self.column]
        if not (isinstance(values, np.ndarray) and values.dtype == np.float64):
            values = epoch_seconds(pd.Series(values), self.column)[0]
        labels = period_labels(values, self.period, self.profile.feature(self.column).timezone)
        codes, uniques = pd.factorize(labels, use_na_sentinel=False)
        # A loop over periods, not rows.
        for code, label in enumerate(uniques.tolist()):
            rows = np.flatnonzero(codes == code)
            part = {k: _take(v, rows) for k, v in columns.items()}
            state = self.states.get(label)
            if state is None:
                state = self.states[label] = DriftState.empty(self.profile)
            state.update(part, None if predictions is None else _take(predictions, rows))

    def merge(self, other: PeriodStates) -> PeriodStates:
        """A new set holding the counts of both, period by period."""
        out = PeriodStates(self.profile, self.column, self.period, dict(self.states))
        for label, state in other.states.items():
            mine = out.states.get(label)
            out.states[label] = state.copy() if mine is None else mine.merge(state)
        return out

    def evaluate(self, thresholds: DriftThresholds | None = None) -> list[dict[str, Any]]:
        """``drift.stats.evaluate`` of each period, in calendar order, with its ``period``."""
        ordered = sorted(self.states, key=lambda label: (label is None, label or ""))
        return [{"period": label, **evaluate(self.states[label], self.profile, thresholds)}
                for label in ordered]


def _take(values: Any, rows: np.ndarray) -> Any:
    if isinstance(values, pd.Series):
        return values.iloc[rows]
    return np.asarray(values, dtype=object)[rows] if isinstance(values, list) else values[rows]
