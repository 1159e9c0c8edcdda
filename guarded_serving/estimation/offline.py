"""Estimates for a table of unlabeled rows, routed as the guard routes them.

Each row is checked against the profile (``checks.check_batch``); rejected rows are left out,
both models predict the rest, and the guarded role takes the primary's answer where the checks
passed and the fallback's where they flagged the row (latency budgets and model faults, which
also send rows to the fallback when serving, do not arise offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .window import WindowEstimator, WindowTally

if TYPE_CHECKING:
    from ..adapters.base import Model
    from ..policy import Policy
    from ..profile import Profile


@dataclass
class TableEstimate:
    """The tally of a table's served rows and how many rows the checks rejected."""

    tally: WindowTally
    rejected: int = 0

    def merge(self, other: TableEstimate) -> TableEstimate:
        return TableEstimate(self.tally.merge(other.tally), self.rejected + other.rejected)


def estimate_rows(
    estimator: WindowEstimator,
    data: pd.DataFrame,
    profile: Profile,
    policy: Policy | None,
    models: dict[str, Model],
) -> TableEstimate:
    """Check, route and predict ``data`` (a chunk of a table), then tally its estimates."""
    from ..checks import OK, check_batch
    from ..guard import predict_on_columns

    v = check_batch(data, profile, policy)
    kept = ~np.asarray(v.rejected, dtype=bool)
    columns: dict[str, Any] = {k: np.asarray(c)[kept] for k, c in v.columns.items()}
    status = np.asarray(v.status)[kept]
    predictions = {role: predict_on_columns(m, columns) for role, m in models.items()}
    routes = np.where(status == OK, "primary", "fallback")
    tally = estimator.tally(columns, predictions, routes=routes, flagged=status != OK)
    return TableEstimate(tally, int((~kept).sum()))
