"""The drift monitor: stored drift segments -> the drift view, status-change events and alerts,
compaction and archiving. The service (``GET /drift`` and its background evaluation) and the
report use the same ``evaluate``, so they agree.

>>> view, windows = evaluate(store_segments, profile, config.drift)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from .config import DriftConfig, ServingConfig
from .drift.stats import DriftThresholds
from .drift.windows import (
    KEEP_WINDOWS,
    MAX_LISTED_WINDOWS,
    Segment,
    Window,
    archive,
    assemble_windows,
    compact,
    drift_view,
)
from .errors import StoreError
from .estimates import LiveEstimates, merged_tally, with_tally
from .policy import Policy
from .profile import Profile
from .store.sql import Store

log = logging.getLogger(__name__)

#: Archive only once this many windows beyond KEEP_WINDOWS have closed, not on every evaluation.
ARCHIVE_SLACK = 20
#: The event kind of the chain of drift statuses.
DRIFT_STATUS_EVENT = "drift_status"


class DriftStatus(StrEnum):
    """A feature's (or the model's) drift status, as the drift view reports it."""

    OK = "ok"
    WARN = "warn"
    DRIFT = "drift"
    INSUFFICIENT_DATA = "insufficient_data"


def segments(store: Store) -> list[Segment]:
    """Every stored drift segment."""
    return [Segment.from_row(row) for row in store.segments()]


def evaluate(segs: list[Segment], profile: Profile, d: DriftConfig, policy: Policy | None = None,
             now: float | None = None) -> tuple[dict[str, Any], list[Window]]:
    """The drift view of ``segs`` and the windows it was computed over. ``now`` closes a time
    window whose period has passed, even with no traffic."""
    now = time.time() if now is None else now
    thresholds = DriftThresholds(min_rows=d.min_rows, policy=policy)
    windows = assemble_windows(segs, profile, d.window_rows, d.window_seconds, now=now)
    view = drift_view(segs, profile, d.window_rows, d.window_seconds,
                      d.consecutive_windows_for_retrain, thresholds, now=now, windows=windows)
    return view, windows


class DriftMonitor:
    """Evaluates the merged drift view from the store and acts on it: gauges, one event per
    status change (recorded once across processes), a webhook alert, compaction.

    ``on_view(view)`` receives each evaluated view (metrics); it must not raise."""

    def __init__(self, config: ServingConfig, profile: Profile, store: Callable[[], Store],
                 on_view: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.profile = profile
        self.store = store
        self.on_view = on_view
        #: The live estimates evaluated over the same windows (set by the runtime), or None.
        self.estimates: LiveEstimates | None = None

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The drift view of every worker and replica writing to the store."""
        store = self.store()
        now = time.time() if now is None else now
        segs = segments(store)
        view, windows = evaluate(segs, self.profile, self.config.drift, self.config.policy, now)
        if self.on_view is not None:
            self.on_view(view)
        self._record_changes(store, view)
        if self.estimates is not None:
            try:
                self.estimates.evaluate(store, segs, windows, view)
            except Exception as e:  # estimates must not cost the drift view
                log.warning("live estimates could not be evaluated: %s", e)
        self._compact(store, view, windows, now, segs)
        view["model"] = self.config.name
        view["profile_hash"] = self.profile.content_hash
        return view

    def _record_changes(self, store: Store, view: dict[str, Any]) -> None:
        current = view["current"]
        statuses = {f["name"]: f["status"] for f in current.get("features") or []}
        statuses["__overall__"] = current["status"]
        if current.get("prediction"):
            statuses["prediction"] = current["prediction"]["status"]
        # The statuses last recorded by any process: each change is recorded, and alerted, once.
        last = store.last_event(DRIFT_STATUS_EVENT)
        prev: dict[str, str] = last["body"].get("statuses", {}) if last else {}
        prev_retrain = bool(last["body"].get("retrain_recommended")) if last else False
        changes = [{"feature": k, "from": prev[k], "to": v} for k, v in statuses.items()
                   if k in prev and prev[k] != v]
        retrain = bool(view.get("retrain_recommended"))
        if last is not None and not changes and retrain == prev_retrain:
            return
        body = {"statuses": statuses, "changes": changes, "retrain_recommended": retrain,
                "window": current.get("window"), "model": self.config.name}
        recorded = store.add_event_after(DRIFT_STATUS_EVENT, last["id"] if last else 0, body)
        if recorded is None or not (changes or retrain != prev_retrain):
            return
        for c in changes:
            log.warning("drift: feature %s changed from %s to %s (model %s)",
                        c["feature"], c["from"], c["to"], self.config.name)
        _span_event(changes, retrain, self.config.name)
        if retrain and not prev_retrain:
            self._start_retrain()
        if self.config.drift.webhook_url and (
                any(c["to"] == DriftStatus.DRIFT for c in changes) or (retrain and not prev_retrain)):
            # Off the caller's thread: GET /drift must not wait for a slow receiver.
            self.alert({"kind": "drift_alert", **body})

    def _start_retrain(self) -> None:
        """``guarded-serving retrain`` for this config, in a process of its own (it exports, runs the
        user's training script and replays the candidate: minutes of work that must not run in a
        serving worker, nor die with it). Called once across processes, on the recorded change."""
        spec = self.config.retrain
        if spec is None or not spec.on_recommendation or self.config.source is None:
            return
        cmd = [sys.executable, "-m", "guarded_serving.cli", "retrain", str(self.config.source), "--json"]
        try:
            spec.workdir.mkdir(parents=True, exist_ok=True)
            out = spec.workdir / "auto-retrain.log"
            with out.open("ab") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        except OSError as e:
            log.error("retraining recommended, but %s could not start: %s", " ".join(cmd), e)
            return
        log.warning("retraining recommended: started guarded-serving retrain (pid %d, output in %s)",
                    proc.pid, out)

        def reap() -> None:  # no zombie; say how it ended
            code = proc.wait()
            (log.info if code == 0 else log.warning)("guarded-serving retrain (pid %d) exited with "
                                                     "status %d; see %s", proc.pid, code, out)

        threading.Thread(target=reap, name="guarded-retrain-reaper", daemon=True).start()

    def alert(self, payload: dict[str, Any]) -> None:
        """POST ``payload`` to ``drift.webhook_url``, if set, off the caller's thread (GET /drift
        must not wait for a slow receiver)."""
        if self.config.drift.webhook_url:
            threading.Thread(target=self._send_webhook, args=(payload,), daemon=True).start()

    def _compact(self, store: Store, view: dict[str, Any], windows: list[Window], now: float,
                 segs: list[Segment]) -> None:
        # Closed windows need one segment each, not one per flush.
        by_id = {s.id: s for s in segs}
        for w in windows:
            if not w.closed or len(w.segment_ids) < 2:
                continue
            row = compact([w])[0].as_row()
            # The window's estimation tallies stay with it (drift state alone would drop them).
            row["state"] = with_tally(row["state"], merged_tally([by_id[i] for i in w.segment_ids if i in by_id]))
            try:
                store.replace_segments([i for i in w.segment_ids if i is not None], row)
            except StoreError as e:  # another process may be compacting too
                log.debug("compaction skipped: %s", e)
        closed = sum(1 for w in view.get("windows") or [] if w["closed"])
        if closed >= MAX_LISTED_WINDOWS:  # maybe more than KEEP_WINDOWS closed: check
            self._archive(store, now)

    def _archive(self, store: Store, now: float) -> None:
        """Fold windows older than the newest KEEP_WINDOWS into one segment (bounded reads)."""
        segs = segments(store)
        d = self.config.drift
        windows = assemble_windows(segs, self.profile, d.window_rows, d.window_seconds, now=now)
        if sum(1 for w in windows if w.closed) <= KEEP_WINDOWS + ARCHIVE_SLACK:
            return
        folded = archive(segs, windows, KEEP_WINDOWS)
        if folded is not None:
            seg, ids = folded
            row = seg.as_row()
            # The folded windows' estimation tallies stay in the cumulative view, as their counts do.
            by_id = {s.id: s for s in segs}
            row["state"] = with_tally(row["state"], merged_tally([by_id[i] for i in ids if i in by_id]))
            store.replace_segments(ids, row)

    def _send_webhook(self, body: dict[str, Any]) -> None:
        import httpx  # adapter-only dependency

        payload = {"ts": time.time(), **body}
        url = self.config.drift.webhook_url
        assert url
        try:
            httpx.post(url, json=payload, timeout=5.0).raise_for_status()
        except Exception as e:
            log.warning("drift webhook %s failed: %s", url, e)


def _span_event(changes: list[dict[str, Any]], retrain: bool, model: str) -> None:
    from opentelemetry import trace

    tracer = trace.get_tracer("guarded_serving")
    with tracer.start_as_current_span("guarded_serving.drift.evaluate") as span:
        span.set_attribute("guarded_serving.model.name", model)
        span.set_attribute("guarded_serving.drift.retrain_recommended", retrain)
        for c in changes:
            span.add_event("guarded_serving.drift.status_change",
                           {"guarded_serving.feature": c["feature"], "guarded_serving.drift.from": str(c["from"]),
                            "guarded_serving.drift.to": str(c["to"])})
