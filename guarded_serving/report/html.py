"""The drift report: one self-contained HTML page a person would rather look at than read.

Input is plain data (the same dicts ``GET /drift`` and ``GET /performance`` return, plus the history
of closed windows), so the page and the endpoint cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from . import svg

STATUS_CLASS = {"ok": "ok", "warn": "warn", "drift": "drift", "insufficient_data": "na"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;font-size:12px}.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px}
.ok{background:#dff3e4;color:#1d6b34}.warn{background:#fff2cc;color:#7a5a00}.drift{background:#fbdcd6;color:#9c2a12}.na{background:#eee;color:#666}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{padding:4px 10px;border-bottom:1px solid #eee;text-align:right}
th{background:#fafafa}td:first-child,th:first-child{text-align:left}
.grid-charts{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #e6e6e6;border-radius:6px;padding:8px}
.chart .t{font-size:12px;font-weight:600}.chart .ax{font-size:10px;fill:#555}.chart .grid{stroke:#eee}.chart .thr{stroke:#9c2a12;stroke-dasharray:4 3}
.callout{padding:10px 14px;border-radius:6px;margin:10px 0}
"""


def _badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "na")}" data-status="{escape(status)}">{escape(status)}</span>'


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return escape(str(v))


def render_report(
    *,
    title: str,
    drift: dict[str, Any],
    distributions: dict[str, dict[str, Sequence[Any]]],
    history: Sequence[dict[str, Any]] = (),
    performance: dict[str, Any] | None = None,
    generated_at: datetime | None = None,
    estimated: dict[str, Any] | None = None,
) -> str:
    """The report as one HTML string.

    ``drift``: the ``GET /drift`` body. ``distributions``: per feature (and "prediction"),
    ``{"labels", "training", "live"}`` proportions over the profile's bins or categories.
    ``history``: closed windows, oldest first, each ``{"end", "rows", "statistics": {feature: value},
    "fallback_rate", "reasons": {reason: rows}}``. ``performance``: the ``GET /performance`` body.
    ``estimated``: its ``estimated`` part (windows with ``realized`` beside the estimates).
    """
    generated_at = generated_at or datetime.now(UTC)
    overall = str(drift.get("status", "insufficient_data"))
    window = drift.get("window") or {}
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">generated {generated_at.isoformat(timespec="seconds")} · window '
        f'{escape(_when(window.get("start")))} → {escape(_when(window.get("end")))} · '
        f'<span id="window-rows">{_num(window.get("rows"))}</span> rows</div>',
        f'<p>Overall drift status: <span id="overall-status">{_badge(overall)}</span></p>',
    ]
    if drift.get("retrain_recommended"):
        out.append('<div class="callout drift" id="retrain">Retraining recommended: drift has persisted '
                   'over consecutive windows. Export production data with <code>guarded-serving export</code>.</div>')

    features = list(drift.get("features") or [])
    out.append("<h2>Features</h2><table id=features><tr><th>feature</th><th>status</th><th>test</th>"
               "<th>statistic</th><th>p (corrected)</th><th>PSI</th><th>JS distance</th><th>live rows</th></tr>")
    for f in features:
        out.append(
            f'<tr data-feature="{escape(str(f.get("name")))}"><td>{escape(str(f.get("name")))}</td>'
            f'<td>{_badge(str(f.get("status")))}</td><td>{escape(str(f.get("test", "")))}</td>'
            f'<td class=stat>{_num(f.get("statistic"))}</td><td>{_num(f.get("p_value_corrected"))}</td>'
            f'<td class=psi>{_num(f.get("psi"))}</td><td>{_num(f.get("js_distance"))}</td>'
            f'<td>{_num(f.get("live_rows"))}</td></tr>'
        )
    out.append("</table>")
    pred = drift.get("prediction")
    if pred:
        out.append(f'<p>Prediction drift: {_badge(str(pred.get("status")))} '
                   f'(PSI {_num(pred.get("psi"))}, p {_num(pred.get("p_value_corrected", pred.get("p_value")))})</p>')

    out.append("<h2>Training vs live distributions</h2><div class=grid-charts>")
    order = [f.get("name") for f in features] + (["prediction"] if "prediction" in distributions else [])
    for name in order:
        d = distributions.get(str(name))
        if not d:
            continue
        out.append(f'<div class=card>{svg.overlaid_bars(d["labels"], d["training"], d["live"], title=str(name))}</div>')
    out.append("</div>")

    if history:
        xs = [_short_time(h.get("end")) for h in history]
        stat_series: dict[str, Sequence[float | None]] = {
            str(name): [h.get("statistics", {}).get(name) for h in history]
            for name in [f.get("name") for f in features]
        }
        out.append("<h2>Drift over time</h2>")
        out.append(svg.lines(xs, stat_series, title="PSI per feature, per closed window", y_label="PSI",
                             threshold=drift.get("thresholds", {}).get("psi_drift")))
        reasons = sorted({r for h in history for r in (h.get("reasons") or {})})
        out.append("<h2>Fallback rate and reasons over time</h2>")
        out.append(svg.lines(xs, {"fallback rate": [h.get("fallback_rate") for h in history]},
                             title="share of rows answered by the fallback", y_max=1.0))
        if reasons:
            top = sorted(reasons, key=lambda r: -sum((h.get("reasons") or {}).get(r, 0) for h in history))[:8]
            out.append(svg.lines(xs, {r: [(h.get("reasons") or {}).get(r, 0) for h in history] for r in top},
                                 title="rows per reason, per window", y_label="rows"))

    if performance:
        out.append(_performance(performance))
    if estimated and any(w.get("n") for w in estimated.get("windows") or []):
        out.append(_estimated(estimated, (performance or {}).get("task")))
    out.append("</body></html>")
    return "".join(out)


def _when(ts: Any) -> str:
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    return str(ts or "")


def _short_time(v: Any) -> str:
    s = str(v or "")
    return s[11:19] if len(s) >= 19 else s


def _metrics(ms: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in (ms or {}).items() if k != "n") or "–"


def _performance(perf: dict[str, Any]) -> str:
    """Live metrics per route for the guarded service, the primary and the fallback (shadow)."""
    rows = ["<h2>Live performance on true outcomes</h2>",
            f'<p class=sub><span id="outcome-rows">{_num(perf.get("rows_with_outcomes"))}</span> rows with outcomes</p>',
            "<table id=performance><tr><th>rows routed to</th><th>model</th><th>rows</th><th>metrics</th></tr>"]
    sections = [("all", perf.get("overall") or {})] + list((perf.get("by_route") or {}).items())
    for route, by_model in sections:
        for model in ("guarded", "primary", "fallback", "challenger"):
            ms = by_model.get(model)
            if not ms:
                continue
            rows.append(f'<tr data-route="{escape(route)}" data-model="{model}"><td>{escape(route)}</td>'
                        f"<td>{model}</td><td>{_num(ms.get('n'))}</td><td>{_metrics(ms)}</td></tr>")
    rows.append("</table>")
    baseline = perf.get("baseline") or {}
    if baseline:
        rows.append("<p class=sub>Baseline at training time (holdout): " + "; ".join(
            f"{escape(k)}: {_metrics(ms)}" for k, ms in baseline.items()) + "</p>")
    impact = perf.get("decision_impact") or {}
    if impact.get("fallback_rows"):
        better = impact.get("guarded_better")
        verdict = "the fallback did better than the primary would have" if better else (
            "the primary would have done better" if better is False else "no verdict yet")
        rows.append(
            f'<div class="callout {"ok" if better else "warn"}" id=decision-impact>Decision impact: on '
            f'{_num(impact.get("fallback_rows"))} rows routed to the fallback, {escape(str(impact.get("metric")))} '
            f'primary {_num(impact.get("primary_on_fallback_rows"))} vs fallback '
            f'{_num(impact.get("fallback_on_fallback_rows"))}: {verdict}.</div>')
    return "".join(rows) + _challenger(perf)


def _challenger(perf: dict[str, Any]) -> str:
    """The challenger's verdict against the guarded service, and the model switches (promotion.py)."""
    out = []
    ch = perf.get("challenger") or {}
    cmp = (ch.get("comparisons") or {}).get("guarded") or {}
    if cmp:
        metric = str(cmp.get("metric"))
        lo, hi = (cmp.get("intervals") or {}).get(metric) or [None, None]
        out.append(f'<div class="callout {"ok" if ch.get("verdict") == "better" else "warn"}" id=challenger>'
                   f'Challenger {escape(str(ch.get("version")))} against the guarded service on '
                   f'{_num(cmp.get("n"))} rows: {escape(metric)} improvement '
                   f'{_num((cmp.get("improvement") or {}).get(metric))} [{_num(lo)}, {_num(hi)}]: '
                   f'{escape(str(ch.get("verdict")))}.</div>')
    events = perf.get("switches") or []
    if events:
        out.append("<h2>Model switches</h2><table id=switches><tr><th>time</th><th>action</th><th>from</th>"
                   "<th>to</th><th>actor</th><th>reason</th></tr>")
        for e in events:
            out.append(f'<tr><td>{escape(_when(e.get("ts")))}</td><td>{escape(str(e.get("action")))}</td>'
                       f'<td>{escape(str(e.get("from_version")))}</td><td>{escape(str(e.get("to_version")))}</td>'
                       f'<td>{escape(str(e.get("actor")))}</td><td>{escape(str(e.get("reason") or ""))}</td></tr>')
        out.append("</table>")
    return "".join(out)


def _estimated(est: dict[str, Any], task: str | None) -> str:
    """Estimated against realized per drift window: a chart of the headline metric and a table."""
    windows = [w for w in est.get("windows") or [] if w.get("n")]
    metric = "accuracy" if task == "classification" else "mae"
    xs = [_short_time(_when(w.get("end"))) for w in windows]
    series: dict[str, Sequence[float | None]] = {}
    for role in ("guarded", "primary"):
        series[f"{role} estimated"] = [(w.get(role) or {}).get(metric) for w in windows]
        series[f"{role} realized"] = [((w.get("realized") or {}).get(role) or {}).get(metric)
                                      if (w.get("realized") or {}).get("rows_with_outcomes") else None
                                      for w in windows]
    out = ["<h2>Estimated against realized performance over windows</h2>",
           '<p class=sub>Estimates need no outcomes (the profile\'s estimation artefacts); the realized '
           "figure appears once outcomes arrive. Estimates are unreliable on flagged rows (outside "
           "the training support) and under concept drift.</p>",
           svg.lines(xs, series, title=f"{metric} per drift window, estimated and realized", y_label=metric),
           "<table id=estimated><tr><th>window end</th><th>rows</th><th>flagged</th><th>model</th>"
           f"<th>estimated {metric}</th><th>band</th><th>realized {metric}</th><th>rows with outcomes</th></tr>"]
    for w, x in zip(windows, xs, strict=True):
        realized = w.get("realized") or {}
        for role in ("guarded", "primary", "fallback"):
            band = ((w.get("bands") or {}).get(role) or {}).get(metric) or [None, None]
            got = (realized.get(role) or {}).get(metric) if realized.get("rows_with_outcomes") else None
            out.append(f'<tr data-window="{w.get("index")}" data-model="{role}"><td>{escape(x)}</td>'
                       f'<td>{_num(w.get("n"))}</td><td>{_num((w.get("flagged") or {}).get("n"))}</td>'
                       f'<td>{role}</td><td class=estimated>{_num((w.get(role) or {}).get(metric))}</td>'
                       f"<td>{_num(band[0])} – {_num(band[1])}</td><td class=realized>{_num(got)}</td>"
                       f'<td>{_num(realized.get("rows_with_outcomes"))}</td></tr>')
    out.append("</table>")
    return "".join(out)
