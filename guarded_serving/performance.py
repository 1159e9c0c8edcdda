"""Live performance: the guarded service, the primary and the fallback scored on true outcomes.

Works on the prediction log joined with outcomes (``Store.outcome_rows``), one row per predicted
row. "guarded" is what was served; "primary" and "fallback" are each model's own prediction,
where it made one (the fallback runs on every row in shadow mode; the primary only on rows that
passed the checks). A model's metrics use only the rows it predicted; ``n`` says how many.

The decision impact answers the question the guard exists for: on the rows it sent to the
fallback, did the fallback do better than the primary would have? It compares the two on the
rows where both predicted.

>>> df = pd.DataFrame({"route": ["primary", "fallback"], "outcome": [1.0, 10.0],
...                    "prediction": [1.0, 9.0], "primary_prediction": [1.0, 2.0],
...                    "fallback_prediction": [1.5, 9.0], "ts": [1.0, 2.0]})
>>> perf = live_performance(df, "regression")
>>> perf["decision_impact"]["guarded_better"], perf["decision_impact"]["improvement"]
(True, 7.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .codec import jsonable
from .scoring import score

__all__ = ["challenger_performance", "live_performance", "metric_gauges", "realized_beside"]

ROLES = {"guarded": "prediction", "primary": "primary_prediction", "fallback": "fallback_prediction",
         "challenger": "challenger_prediction"}
#: Key of each role's probabilities in the log's ``probabilities`` column.
PROBABILITY_KEYS = {"guarded": "served", "primary": "primary", "fallback": "fallback",
                    "challenger": "challenger"}
ROUTES = ("primary", "fallback")
GAUGE = "guarded_serving_live_metric"


@dataclass
class _Probabilities:
    """What ``scoring.score`` reads for ROC AUC."""

    probabilities: np.ndarray
    classes: list[Any]


def live_performance(df: pd.DataFrame, task: str, baseline: dict[str, Any] | None = None,
                     window_rows: int | None = None) -> dict[str, Any]:
    """Metrics of the served, primary and fallback predictions on rows with outcomes: overall,
    by route, the fallback decision's impact, and per tumbling window of ``window_rows`` rows
    (in ts order). JSON-safe (no NaN)."""
    rows = _with_outcomes(df, task)
    out: dict[str, Any] = {
        "task": task,
        "rows_with_outcomes": len(rows),
        "baseline": baseline or {},
        "overall": _metrics(rows, task),
        "by_route": {},
        "decision_impact": _decision_impact(rows, task),
        "windows": [],
    }
    route = rows["route"].astype(object).to_numpy() if "route" in rows else np.full(len(rows), None)
    for r in ROUTES:
        part = rows[route == r]
        out["by_route"][r] = {"rows": len(part), **_metrics(part, task)}
    if window_rows and len(rows):
        ordered = rows.sort_values("ts", kind="mergesort") if "ts" in rows else rows
        for i in range(0, len(ordered), int(window_rows)):
            part = ordered.iloc[i : i + int(window_rows)]
            ts = part["ts"].astype(float) if "ts" in part else pd.Series([math.nan])
            out["windows"].append({"start": _num(ts.iloc[0]), "end": _num(ts.iloc[-1]),
                                   "rows": len(part), **_metrics(part, task)})
    return jsonable(out)


def metric_gauges(perf: dict[str, Any]) -> list[tuple[str, dict[str, str], float]]:
    """Flat ``(name, {model, route, metric}, value)`` triples of a ``live_performance`` result,
    for one Prometheus gauge; route "all" is the overall figure.

    >>> metric_gauges({"overall": {"guarded": {"n": 2.0, "mae": 0.5}}})[1]
    ('guarded_serving_live_metric', {'model': 'guarded', 'route': 'all', 'metric': 'mae'}, 0.5)
    """
    out: list[tuple[str, dict[str, str], float]] = []
    scopes = [("all", perf.get("overall") or {})]
    scopes += [(r, m) for r, m in (perf.get("by_route") or {}).items()]
    for route, by_model in scopes:
        for model in ROLES:
            for metric, value in (by_model.get(model) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    out.append((GAUGE, {"model": model, "route": route, "metric": metric}, float(value)))
    return out


def realized_beside(windows: list[dict[str, Any]], df: pd.DataFrame, task: str) -> list[dict[str, Any]]:
    """Estimated windows (``estimates.estimated_view``, oldest first, each with ``end``) with
    ``realized``: the metrics of the rows in ``df`` (with outcomes) that each window holds. A row
    belongs to the first window ending at or after its request time (a row is counted into its
    window's drift segment after it was served); rows after the last window's end are in none
    yet. JSON-safe."""
    rows = _with_outcomes(df, task)
    ends = np.array([w["end"] if w.get("end") is not None else -np.inf for w in windows], dtype=float)
    ts = rows["ts"].astype(float).to_numpy() if "ts" in rows else np.full(len(rows), np.nan)
    which = np.searchsorted(ends, ts, side="left")
    out = []
    for i, w in enumerate(windows):
        part = rows[which == i]
        out.append({**w, "realized": {"rows_with_outcomes": len(part), **_metrics(part, task)}})
    return jsonable(out)  # type: ignore[no-any-return]


def challenger_performance(df: pd.DataFrame, task: str, margin: float = 0.0) -> dict[str, Any] | None:
    """The challenger against the live models on the logged rows it scored that have outcomes,
    as ``replay`` judges a candidate (bootstrap intervals, verdict against the guarded service);
    None when it scored none. Only rows of one challenger version count: the newest logged."""
    from .replay import replay

    rows = _with_outcomes(df, task)
    if "challenger_prediction" not in rows or "challenger_version" not in rows:
        return None
    versions = rows["challenger_version"].to_numpy()
    scored = ~pd.isna(rows["challenger_prediction"]).to_numpy() & ~pd.isna(versions)
    if not scored.any():
        return None
    version = versions[np.flatnonzero(scored)[-1]]
    rows = rows[scored & (versions == version)].reset_index(drop=True)
    result = replay(rows, rows["challenger_prediction"].to_numpy(), task, target="outcome", margin=margin)
    out = result.to_dict()
    out["version"] = str(version)
    return jsonable(out)


# -- internals -----------------------------------------------------------------------------------


def _with_outcomes(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows with a usable outcome (numeric for regression), with a positional index."""
    if "outcome" not in df or len(df) == 0:
        return df.iloc[0:0].reset_index(drop=True)
    y = df["outcome"]
    if task == "regression":
        y = pd.to_numeric(y.astype(object), errors="coerce").astype(float)
    keep = ~pd.isna(y).to_numpy()
    rows = df.loc[keep].reset_index(drop=True)
    rows["outcome"] = y[keep].reset_index(drop=True)
    return rows


def _metrics(rows: pd.DataFrame, task: str) -> dict[str, dict[str, float]]:
    # The challenger's figures appear only where one was scored (a config with a challenger).
    return {role: _score_role(rows, task, role) for role, col in ROLES.items()
            if role != "challenger" or (col in rows and rows[col].notna().any())}


def _predicted(rows: pd.DataFrame, task: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows the role predicted, its predictions)."""
    col = ROLES[role]
    if col not in rows or len(rows) == 0:
        return np.zeros(len(rows), dtype=bool), np.empty(len(rows))
    values = rows[col]
    if task == "regression":
        values = pd.to_numeric(values.astype(object), errors="coerce").astype(float)
    mask = ~pd.isna(values).to_numpy()
    return mask, values.to_numpy()


def _score_role(rows: pd.DataFrame, task: str, role: str) -> dict[str, float]:
    mask, pred = _predicted(rows, task, role)
    y = rows["outcome"].to_numpy() if len(rows) else np.empty(0)
    probs = _probabilities(rows, role, mask) if task == "classification" else None
    return score(task, y[mask], pred[mask], probs)


def _probabilities(rows: pd.DataFrame, role: str, mask: np.ndarray) -> _Probabilities | None:
    """The role's class probabilities on the masked rows; None (no ROC AUC) unless every one of
    them has probabilities over the same classes."""
    if "probabilities" not in rows or not mask.any():
        return None
    key = PROBABILITY_KEYS[role]
    cells = rows["probabilities"].to_numpy()[mask]
    classes: list[Any] | None = None
    matrix = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get(key) is None or cell.get("classes") is None:
            return None
        if classes is None:
            classes = list(cell["classes"])
        elif list(cell["classes"]) != classes:
            return None
        matrix.append(cell[key])
    p = np.asarray(matrix, dtype=float)
    if classes is None or p.ndim != 2 or p.shape[1] != len(classes) or np.isnan(p).any():
        return None
    return _Probabilities(p, classes)


def _decision_impact(rows: pd.DataFrame, task: str) -> dict[str, Any]:
    metric = "mae" if task == "regression" else "accuracy"
    route = rows["route"].astype(object).to_numpy() if "route" in rows else np.full(len(rows), None)
    fb = rows[route == "fallback"]
    p_mask, p_pred = _predicted(fb, task, "primary")
    f_mask, f_pred = _predicted(fb, task, "fallback")
    both = p_mask & f_mask
    out: dict[str, Any] = {"fallback_rows": len(fb), "paired_rows": int(both.sum()), "metric": metric,
                           "primary_on_fallback_rows": None, "fallback_on_fallback_rows": None,
                           "guarded_better": None, "improvement": None}
    if not both.any():
        return out
    y = fb["outcome"].to_numpy()[both]
    primary = score(task, y, p_pred[both])[metric]
    fallback = score(task, y, f_pred[both])[metric]
    improvement = primary - fallback if metric == "mae" else fallback - primary
    out.update(primary_on_fallback_rows=primary, fallback_on_fallback_rows=fallback,
               improvement=improvement, guarded_better=bool(improvement > 0))
    return out


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
