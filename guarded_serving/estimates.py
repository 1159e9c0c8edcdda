"""Live performance estimates: the adapter between the recording pipeline, the drift monitor
and ``estimation`` (which knows nothing of serving).

The recorder's consumer thread tallies each served batch (``LiveEstimates.tally``, off the
request path, after the shadow predictions so both models have answered every served row). The
tally travels with the drift counts: it is stored inside the drift segment that the same flush
writes (key ``ESTIMATE_KEY`` of the segment's state), so it is merged across workers and
replicas into exactly the drift windows that ``GET /drift`` shows, and compaction keeps it.
``estimated_view`` merges the tallies per window into metrics with bands; ``LiveEstimates``
publishes them (gauges) and alerts once across processes when an estimate is worse than the
profile's holdout baseline by more than ``estimation.alert_margin``.

>>> live = LiveEstimates.for_config(config, profile)  # doctest: +SKIP
>>> tally = live.tally(columns, routes, primary, fallback, results)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .adapters.base import Prediction
from .checks import FALLBACK as FLAGGED_STATUS
from .config import ServingConfig
from .drift.windows import ARCHIVED, MAX_LISTED_WINDOWS, Segment, Window
from .estimation import WindowEstimator, WindowTally
from .guard import FALLBACK_ROUTE, REJECTED, GuardedResult
from .profile import Profile
from .store.sql import Store

log = logging.getLogger(__name__)

#: Key of the estimation tally inside a stored drift segment's state.
ESTIMATE_KEY = "estimate"
#: The event kind of the chain of estimate alert statuses (one record per change, all processes).
ESTIMATE_STATUS_EVENT = "estimate_status"
#: Metrics where higher is better (the others, MAE and RMSE, are errors).
HIGHER_IS_BETTER = frozenset({"accuracy", "f1", "roc_auc"})
ESTIMATE_ROLES = ("primary", "fallback", "guarded")


class LiveEstimates:
    """Tallies served batches and turns stored tallies into the estimated view, per process.

    ``on_view(view)`` gets each estimated view (gauges); ``webhook(body)`` each new alert; neither
    may raise. ``cost`` holds the tally's own time and rows in this process (seconds, rows)."""

    def __init__(
        self,
        estimator: WindowEstimator,
        config: ServingConfig,
        profile: Profile,
        on_view: Callable[[dict[str, Any]], None] | None = None,
        webhook: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.estimator: WindowEstimator | None = estimator
        self.config = config
        self.profile = profile
        self.on_view = on_view
        self.webhook = webhook
        self.view: dict[str, Any] | None = None
        self.cost = [0.0, 0]
        self._lock = threading.Lock()
        self.sample_rate = config.estimation.sample_rate
        self._rng = np.random.default_rng()

    @classmethod
    def for_config(cls, config: ServingConfig, profile: Profile, **kw: Any) -> LiveEstimates | None:
        """The live estimates of ``config``, or None when they are off, when drift monitoring
        (whose windows they use) is off, or when the profile has no estimation artefacts."""
        if not (config.estimation.enabled and config.drift.enabled):
            return None
        if not WindowEstimator.available(config.profile):
            log.info(
                "no live estimates: the profile %s has no estimation artefacts (build it "
                "with --holdout)",
                config.profile,
            )
            return None
        rate, drift = config.estimation.sample_rate, config.drift
        if rate < 1.0 and drift.window_seconds is None and drift.window_rows * rate < drift.min_rows:
            log.warning(
                "estimation.sample_rate %g estimates about %d rows of a %d-row drift window, fewer "
                "than drift.min_rows (%d): estimate alerts will not fire; raise the rate or the window",
                rate, round(drift.window_rows * rate), drift.window_rows, drift.min_rows)
        try:
            return cls(WindowEstimator.load(config.profile, profile), config, profile, **kw)
        except Exception as e:  # a bad artefact must not stop serving
            log.warning("no live estimates: the estimation artefacts could not be loaded: %s", e)
            return None

    def follow(self, profile_path: str | Path, profile: Profile) -> None:
        """Estimate with the artefacts beside ``profile_path``: a newly served primary's (after a
        promotion or a rollback). Artefacts fitted for another model would estimate the wrong
        errors, so without any beside it the tallies that follow are left out (None)."""
        try:
            self.estimator = (WindowEstimator.load(profile_path, profile)
                              if WindowEstimator.available(profile_path) else None)
        except Exception as e:  # a bad artefact must not stop serving
            log.warning("live estimates off: the artefacts beside %s could not be loaded: %s", profile_path, e)
            self.estimator = None
        if self.estimator is None:
            log.warning("live estimates off for the primary of %s: no estimation artefacts beside it",
                        profile_path)

    # -- per batch (the recorder's consumer thread) -----------------------------------------

    def tally(
        self,
        columns: dict[str, np.ndarray],
        routes: np.ndarray,
        primary: np.ndarray,
        fallback: np.ndarray,
        results: Sequence[GuardedResult],
    ) -> WindowTally | None:
        """The estimation sums of one recorded lot (the concatenated batches of ``results``);
        rejected rows are left out. Never raises: None when it fails."""
        start = time.perf_counter()
        estimator = self.estimator  # one reference: a promotion may swap it meanwhile
        if estimator is None:
            return None
        try:
            keep = routes != REJECTED
            if not keep.any():
                return None
            status = np.concatenate([r.verdicts.status for r in results if r.verdicts is not None])
            cols = columns if keep.all() else {k: v[keep] for k, v in columns.items()}
            preds = self._predictions(estimator.task, routes, primary, fallback, results)
            n = int(keep.sum())
            tally = estimator.tally(
                cols,
                {role: p.take(np.flatnonzero(keep)) for role, p in preds.items()},
                routes=routes[keep],
                flagged=status[keep] == FLAGGED_STATUS,
                sample=None if self.sample_rate >= 1.0 else self._rng.random(n) < self.sample_rate,
            )
        except Exception as e:  # monitoring must never take serving down
            log.warning("live estimates: could not tally %d row(s): %s", len(routes), e)
            return None
        with self._lock:
            self.cost[0] += time.perf_counter() - start
            self.cost[1] += n
        return tally

    def _predictions(
        self,
        task: str,
        routes: np.ndarray,
        primary: np.ndarray,
        fallback: np.ndarray,
        results: Sequence[GuardedResult],
    ) -> dict[str, Prediction]:
        if task == "regression":
            return {
                "primary": Prediction(_floats(primary)),
                "fallback": Prediction(_floats(fallback)),
            }
        # Classification: the served probabilities are known for the role that answered a row;
        # each role's estimate covers the rows it served, the guarded one every row.
        classes = next((list(r.classes) for r in results if r.classes is not None), None)
        if classes is None:
            return {}
        k = len(classes)
        probs = np.concatenate(
            [
                r.probabilities if r.probabilities is not None else np.full((r.n_rows, k), np.nan)
                for r in results
            ]
        )
        out = {}
        for role, labels in (("primary", primary), ("fallback", fallback)):
            p = np.where(
                (routes == (FALLBACK_ROUTE if role == "fallback" else "primary"))[:, None],
                probs,
                np.nan,
            )
            out[role] = Prediction(labels, p, classes)
        return out

    # -- per window (the drift monitor) -----------------------------------------------------

    def evaluate(
        self,
        store: Store,
        segs: Sequence[Segment],
        windows: Sequence[Window],
        drift: dict[str, Any],
    ) -> dict[str, Any]:
        """The estimated view of the drift windows just evaluated; gauges and the alert."""
        view = estimated_view(
            segs,
            windows,
            drift,
            self.profile.baseline or {},
            self.config.drift.min_rows,
            self.config.estimation.alert_margin,
        )
        self.view = view
        if self.on_view is not None:
            self.on_view(view)
        self._record_alert(store, view)
        return view

    def _record_alert(self, store: Store, view: dict[str, Any]) -> None:
        breaches = sorted(view["current"].get("below_baseline") or [])
        last = store.last_event(ESTIMATE_STATUS_EVENT)
        before = list(last["body"].get("below_baseline", [])) if last else []
        if last is not None and before == breaches:
            return
        body = {
            "below_baseline": breaches,
            "window": view["current"].get("window"),
            "model": self.config.name,
            "alert_margin": self.config.estimation.alert_margin,
            "estimated": {r: view["current"].get(r) for r in ESTIMATE_ROLES},
            "baseline": view.get("baseline"),
        }
        recorded = store.add_event_after(ESTIMATE_STATUS_EVENT, last["id"] if last else 0, body)
        new = [b for b in breaches if b not in before]
        if recorded is None or not new:
            return
        log.warning(
            "estimated performance below the baseline by more than %s: %s (model %s)",
            self.config.estimation.alert_margin,
            ", ".join(new),
            self.config.name,
        )
        if self.webhook is not None:
            self.webhook({"kind": "estimate_alert", "new": new, **body})


def merged_tally(segs: Sequence[Segment]) -> WindowTally | None:
    """The estimation tallies stored in ``segs``, merged (None when none holds one)."""
    out: WindowTally | None = None
    for s in segs:
        d = s.state.get(ESTIMATE_KEY)
        if d:
            t = WindowTally.from_dict(d)
            out = t if out is None else out.merge(t)
    return out


def with_tally(state: dict[str, Any], tally: WindowTally | None) -> dict[str, Any]:
    """A drift segment's state carrying ``tally`` too."""
    return state if tally is None else {**state, ESTIMATE_KEY: tally.to_dict()}


def estimated_view(
    segs: Sequence[Segment],
    windows: Sequence[Window],
    drift: dict[str, Any],
    baseline: dict[str, Any],
    min_rows: int,
    margin: float | None,
) -> dict[str, Any]:
    """Estimated metrics per drift window (the newest ``MAX_LISTED_WINDOWS``), for the window
    the drift view calls current, and over all windows; each ``{"n", "primary", "fallback",
    "guarded", "bands", "flagged": {...}}`` as ``WindowTally.metrics`` gives them. The current
    window's ``below_baseline`` lists ``"role.metric"`` estimates (on at least ``min_rows``
    rows) worse than the baseline by more than ``margin`` of it."""
    by_id = {s.id: s for s in segs}
    tallies = {
        w.index: merged_tally([by_id[i] for i in w.segment_ids if i in by_id]) for w in windows
    }
    listed = [
        {
            "index": w.index,
            "start": w.start,
            "end": w.end,
            "rows": w.rows,
            "closed": w.closed,
            **_metrics(tallies[w.index]),
        }
        for w in windows[-MAX_LISTED_WINDOWS:]
    ]
    # Windows folded into the archive (monitor._archive) still count in the cumulative figure.
    archived = merged_tally([s for s in segs if s.worker == ARCHIVED])
    every = [t for t in (archived, *tallies.values()) if t is not None]
    total = every[0] if every else None
    for t in every[1:]:
        total = total.merge(t)  # type: ignore[union-attr]
    cur = drift.get("current_window")
    current: dict[str, Any] = {"window": cur}
    if cur is not None and cur["index"] in tallies:
        current.update(_metrics(tallies[cur["index"]]))
        current["below_baseline"] = below_baseline(current, baseline, min_rows, margin)
    else:
        current.update(_metrics(None), below_baseline=[])
    return {
        "current": current,
        "cumulative": _metrics(total),
        "windows": listed,
        "baseline": _baselines(baseline),
        "alert_margin": margin,
    }


def below_baseline(
    est: dict[str, Any], baseline: dict[str, Any], min_rows: int, margin: float | None
) -> list[str]:
    """``"role.metric"`` of the estimates in ``est`` worse than the role's baseline by more
    than ``margin`` of it (the guarded service is held to the primary's baseline).

    >>> below_baseline({"primary": {"n": 300, "mae": 115.0}, "guarded": {"n": 300, "mae": 150.0}},
    ...                {"primary": {"mae": 100.0}}, 200, 0.2)
    ['guarded.mae']
    """
    if margin is None:
        return []
    base = _baselines(baseline)
    out = []
    for role in ESTIMATE_ROLES:
        values = est.get(role) or {}
        if (values.get("n") or 0) < min_rows:
            continue
        for metric, b in (base.get(role) or {}).items():
            v = values.get(metric)
            if v is None or b is None or not math.isfinite(v):
                continue
            worse = v < b * (1 - margin) if metric in HIGHER_IS_BETTER else v > b * (1 + margin)
            if worse:
                out.append(f"{role}.{metric}")
    return out


def _baselines(baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {
        r: {k: float(v) for k, v in (baseline.get(r) or {}).items() if k != "n" and v is not None}
        for r in ("primary", "fallback")
    }
    out["guarded"] = dict(out["primary"])
    return out


def _metrics(tally: WindowTally | None) -> dict[str, Any]:
    if tally is None:
        return {"n": 0, "bands": {}, "flagged": {"n": 0, "bands": {}}}
    return tally.metrics()


def _floats(values: np.ndarray) -> np.ndarray:
    """Regression predictions as floats (NaN where a model did not answer)."""
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return np.array([np.nan if v is None else float(v) for v in values])


def estimate_gauges(
    view: dict[str, Any],
) -> list[tuple[dict[str, str], float, float | None, float | None]]:
    """``({role, scope, metric}, value, band_low, band_high)`` of the current window's estimates;
    scope "all" or "flagged".

    >>> estimate_gauges({"current": {"primary": {"n": 3.0, "mae": 2.0}, "bands": {"primary":
    ...     {"mae": [1.0, 3.0]}}, "flagged": {"n": 0}}})
    [({'role': 'primary', 'scope': 'all', 'metric': 'mae'}, 2.0, 1.0, 3.0)]
    """
    out = []
    cur = view.get("current") or {}
    for scope, part in (("all", cur), ("flagged", cur.get("flagged") or {})):
        for role in ESTIMATE_ROLES:
            bands = (part.get("bands") or {}).get(role) or {}
            for metric, value in (part.get(role) or {}).items():
                if metric == "n" or value is None or not math.isfinite(value):
                    continue
                lo, hi = (bands.get(metric) or [None, None])[:2]
                out.append(({"role": role, "scope": scope, "metric": metric}, float(value), lo, hi))
    return out
