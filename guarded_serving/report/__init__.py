"""The drift and performance report, built from the store a serving config names.

``build_report(config)`` reads what the service wrote (drift segments, the prediction log and
outcomes) and computes the same views ``GET /drift`` and ``GET /performance`` return, with the same
functions, so the page and the endpoints agree.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from ..config import ServingConfig
from ..estimates import estimated_view
from ..monitor import evaluate, segments
from ..performance import challenger_performance, live_performance, realized_beside
from ..profile import Profile
from ..promotion import switches
from .html import render_report

__all__ = ["build_report", "render_report", "report_data"]


def report_data(config: ServingConfig) -> dict[str, Any]:
    """Everything the report shows, as plain data: drift view, distributions, history, performance."""
    from ..store.sql import Store  # adapter: only the report's data loading touches the database

    profile = Profile.load(config.profile)
    store = Store(config.store.url, prefix=config.store.table_prefix, timeout_s=config.store.timeout_seconds)
    try:
        d = config.drift
        segs = segments(store)
        view, windows = evaluate(segs, profile, d, config.policy)
        # Only the stretch of the log the listed windows cover, and without the features.
        starts = [w["start"] for w in view.get("windows") or [] if w.get("start") is not None]
        log = store.joined(since=min(starts) if starts else None, features=False)
        outcomes = store.outcome_rows()
        switch_events = [e.to_dict() for e in switches(store)]
    finally:
        store.close()
    current = view["current"]
    distributions = {
        f["name"]: {"labels": f["buckets"], "training": f["expected"], "live": f["observed"]}
        for f in list(current.get("features") or []) + ([current["prediction"]] if current.get("prediction") else [])
        if f.get("buckets")
    }
    summary = {w["index"]: w for w in view.get("windows") or []}
    history = []
    for w in windows:
        rows = log[(log["ts"] >= w.start) & (log["ts"] <= w.end)] if len(log) else log
        reasons: Counter[str] = Counter()
        for r in rows.get("reasons", []):
            reasons.update(x for x in str(r or "").split(";") if x)
        s = summary.get(w.index, {})
        history.append({
            "end": _iso(w.end),
            "rows": w.rows,
            "closed": w.closed,
            "status": s.get("status"),
            "statistics": {k: v.get("psi") for k, v in (s.get("features") or {}).items()},
            "fallback_rate": float((rows["route"] == "fallback").mean()) if len(rows) else None,
            "reasons": dict(reasons),
        })
    perf = live_performance(outcomes, profile.task, profile.baseline, window_rows=d.window_rows)
    # The estimates the service stored with the drift segments, beside the realized figures.
    estimated = estimated_view(segs, windows, view, profile.baseline or {}, d.min_rows,
                               config.estimation.alert_margin)
    estimated["windows"] = realized_beside(estimated["windows"], outcomes, profile.task)
    challenger = challenger_performance(outcomes, profile.task, config.auto_promote.margin)
    if challenger is not None:
        perf["challenger"] = challenger
    perf["switches"] = switch_events
    return {"drift": view, "distributions": distributions, "history": history, "performance": perf,
            "estimated": estimated, "model": config.name}


def build_report(config: ServingConfig) -> str:
    """The self-contained HTML report for the model a serving config names."""
    data = report_data(config)
    view = data["drift"]
    return render_report(
        title=f"{config.name}: drift and live performance",
        drift={**view["current"], "retrain_recommended": view.get("retrain_recommended")},
        distributions=data["distributions"],
        history=data["history"],
        performance=data["performance"],
        estimated=data["estimated"],
        generated_at=datetime.now(UTC),
    )


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
