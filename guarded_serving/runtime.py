"""What one serving process keeps around a GuardedModel: metrics, the prediction log, the drift
window and the store, with no HTTP in it (the service module maps this to routes and statuses).

Everything that talks to the store runs off the request path: predictions are logged by a
background writer, drift counts are flushed by a background thread every
``store.flush_seconds``. A store that is slow or down degrades monitoring, never predictions.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import pandas as pd

from .config import ServingConfig
from .drift.state import DriftState
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
from .errors import (
    GuardedServingError,
    NotFoundError,
    PayloadError,
    Problem,
    SchemaError,
    StoreError,
)
from .guard import GuardedModel, GuardedResult, predict_on_columns
from .performance import live_performance, metric_gauges
from .store.logwriter import LogWriter
from .store.sql import Store, dumps
from .telemetry import ServiceMetrics

log = logging.getLogger(__name__)

#: How often recorded predictions are turned into drift counts, shadow predictions and log rows
#: (sooner once ``prediction_log.batch_size`` rows wait): larger batches cost less per row.
MONITOR_INTERVAL_S = 0.5
#: Archive only once this many windows beyond KEEP_WINDOWS have closed, not on every evaluation.
ARCHIVE_SLACK = 20
#: How long /feedback waits for other workers' log writers before calling a request id unknown.
FEEDBACK_WAIT_S = 2.0


def new_request_id() -> str:
    """A UUIDv7 (RFC 9562) as 32 hex digits: 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered ids keep the prediction log's (request_id, row) key growing at one end of its
    index instead of landing at random pages of it (uuid4): inserts cost about a fifth less at
    150k logged rows here, and the gap widens as the log grows. Ids still sort by time."""
    ms = time.time_ns() // 1_000_000
    r = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 are used
    value = ((ms & _MS_MASK) << 80 | 0x7 << 76 | (r >> 68) << 64   # version 7, 12 random bits
             | 0b10 << 62 | (r & _RAND_B_MASK))                    # variant 10, 62 random bits
    return f"{value:032x}"


_MS_MASK = (1 << 48) - 1
_RAND_B_MASK = (1 << 62) - 1


class ServingRuntime:
    """A guarded model plus its monitoring, for one process.

    >>> rt = ServingRuntime(load_config("models/diamonds/serving.yaml"))  # doctest: +SKIP
    >>> result = rt.predict([{"carat": 0.5, ...}], request_id="abc")  # doctest: +SKIP
    """

    def __init__(self, config: ServingConfig, *, metrics: ServiceMetrics | None = None,
                 worker_id: str | None = None) -> None:
        self.config = config
        pl = config.prediction_log
        # Shadow predictions are for the record only: they run in the background, batched over
        # many requests, not on the request path (see _process).
        self.shadow_fallback = pl.enabled and pl.shadow_fallback
        self.shadow_primary = pl.enabled and pl.shadow_primary
        self.guard = GuardedModel.from_config(config, shadow_fallback=False, shadow_primary=False)
        self.profile = self.guard.profile
        self.metrics = metrics
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.thresholds = DriftThresholds(min_rows=config.drift.min_rows)
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._drift_lock = threading.Lock()
        self._drift: DriftState | None = DriftState.empty(self.profile) if config.drift.enabled else None
        self._stop = threading.Event()
        self._background_pid: int | None = None
        self.writer: LogWriter | None = None
        if pl.enabled:
            self.writer = LogWriter(self.store, queue_size=pl.queue_size, batch_size=pl.batch_size,
                                    on_drop=self._on_drop)
        self._last_purge = 0.0
        self._pending: deque[tuple[str, float, GuardedResult]] = deque()
        self._pending_rows = 0
        self._pending_limit = max(pl.queue_size, config.max_rows)
        self._pending_lock = threading.Lock()
        self._drain_rows = pl.batch_size
        self._wake = threading.Event()
        self._drain_lock = threading.Lock()

    # -- store -------------------------------------------------------------------------------

    def store(self) -> Store:
        """The shared store, opened on first use (so a store that is down at startup only
        degrades monitoring); raises StoreError while it cannot be reached."""
        with self._store_lock:
            if self._store is None:
                self._store = Store(self.config.store.url, prefix=self.config.store.table_prefix)
            return self._store

    def _on_drop(self, n: int, stage: str = "log") -> None:
        if self.metrics is not None:
            self.metrics.dropped(n, stage)

    # -- prediction --------------------------------------------------------------------------

    def predict(self, rows: Any, request_id: str, on_reject: str = "raise") -> GuardedResult:
        """Guarded prediction of a batch, counted into the drift window and the prediction log."""
        try:
            result = self.guard.predict(rows, on_reject=on_reject, request_id=request_id)
        except SchemaError:
            self._count_rejected(rows)
            raise
        self._record(result, request_id)
        return result

    async def apredict(self, rows: Any, request_id: str, on_reject: str = "raise") -> GuardedResult:
        """``predict`` from an event loop (see ``GuardedModel.apredict``)."""
        try:
            result = await self.guard.apredict(rows, on_reject=on_reject, request_id=request_id)
        except SchemaError:
            self._count_rejected(rows)
            raise
        self._record(result, request_id)
        return result

    def _count_rejected(self, rows: Any) -> None:
        if self.metrics is not None:
            self.metrics.rejected(_n_rows(rows))

    def _record(self, result: GuardedResult, request_id: str) -> None:
        """Metrics now; drift counts, shadow predictions and the log in the background."""
        if self.metrics is not None:
            self.metrics.observe(result)
        if self._drift is None and self.writer is None:
            return
        n = result.n_rows
        with self._pending_lock:
            if self._pending_rows + n > self._pending_limit:
                dropped = True
            else:
                dropped = False
                self._pending.append((request_id, time.time(), result))
                self._pending_rows += n
        if dropped:  # overload: count it, never make the request wait
            self._on_drop(n, "monitoring")
            return
        if self._pending_rows >= self._drain_rows:
            self._wake.set()
        self._ensure_background()

    def drain(self) -> None:
        """Process every prediction recorded so far (drift counts, shadows, log rows)."""
        with self._drain_lock:
            with self._pending_lock:
                items = list(self._pending)
                self._pending.clear()
                self._pending_rows = 0
            if items:
                try:
                    self._process(items)
                except Exception:  # monitoring must never take serving down
                    log.exception("could not record %d prediction(s) for monitoring", len(items))

    def _process(self, items: list[tuple[str, float, GuardedResult]]) -> None:
        items = [it for it in items if it[2].verdicts is not None]
        results = [r for _, _, r in items]
        if not results:
            return
        names = list(results[0].verdicts.columns)  # type: ignore[union-attr]
        cols = {k: _concat([r.verdicts.columns[k] for r in results]) for k in names}  # type: ignore[union-attr]
        routes = np.concatenate([r.routes for r in results])
        primary = _concat([r.primary_predictions for r in results])
        fallback = _concat([r.fallback_predictions for r in results])
        if self.shadow_fallback:
            self._shadow(self.guard.fallback, cols, (routes != "rejected") & pd.isna(fallback), fallback)
        if self.shadow_primary:
            self._shadow(self.guard.primary, cols, (routes == "fallback") & pd.isna(primary), primary)
        # Give each result its share back (the log rows are built from the results).
        start = 0
        for r in results:
            end = start + r.n_rows
            r.primary_predictions, r.fallback_predictions = primary[start:end], fallback[start:end]
            start = end
        if self.writer is not None:
            self._log(items, cols)
        if self._drift is not None:
            keep = routes != "rejected"
            if not keep.all():
                cols = {k: v[keep] for k, v in cols.items()}
                primary = primary[keep]
            with self._drift_lock:
                self._drift.update(cols, primary)

    def _log(self, items: list[tuple[str, float, GuardedResult]], cols: dict[str, Any]) -> None:
        """Hand the log rows of ``items`` to the writer, as many as its queue has room for: under
        overload the rest are counted as dropped without the cost of building them."""
        assert self.writer is not None
        room = self.writer.queue_size - self.writer.pending
        kept = 0  # rows of the leading items that fit
        for i, (_, _, r) in enumerate(items):
            if kept + r.n_rows > room:
                self._on_drop(sum(x.n_rows for _, _, x in items[i:]))
                items = items[:i]
                break
            kept += r.n_rows
        if not items:
            return
        features_json: list[str] | None = None
        if self.config.prediction_log.log_features:
            # pandas' C JSON writer, once for the whole drain (NaN becomes null).
            frame = pd.DataFrame({k: v[:kept] for k, v in cols.items()}, copy=False)
            features_json = frame.to_json(orient="records", lines=True, double_precision=15).splitlines()
        rows: list[Any] = []
        start = 0
        for rid, ts, r in items:
            feats = None if features_json is None else features_json[start:start + r.n_rows]
            rows.extend(self._log_rows(rid, r, ts, feats))
            start += r.n_rows
        self.writer.submit(rows)

    def _shadow(self, model: Any, cols: dict[str, Any], mask: np.ndarray, out: np.ndarray) -> None:
        idx = np.flatnonzero(mask)
        if not idx.size:
            return
        try:
            pred = predict_on_columns(model, {k: v[idx] for k, v in cols.items()})
            if len(pred) == idx.size:
                out[idx] = pred.labels
        except Exception as e:  # flagged rows may well break the primary; that is the point
            log.debug("shadow %s call on %d row(s) failed: %s", getattr(model, "name", "model"), idx.size, e)

    def _log_rows(self, request_id: str, result: GuardedResult, now: float,
                  features: list[str] | None) -> list[tuple[Any, ...]]:
        """One log row per served row, as the store's ready-made tuples (``PREDICTION_COLUMNS``
        order, JSON columns encoded): the writer thread then only binds and inserts."""
        g = self.guard
        served = _json_values(result.predictions)
        prim = _json_values(result.primary_predictions)
        fb = _json_values(result.fallback_predictions)
        probs = None
        if result.probabilities is not None:
            classes = [_py(c) for c in result.classes or []]
            probs = [dumps({"classes": classes, "served": p}) for p in np.round(result.probabilities, 6).tolist()]
        head = (request_id,)
        model = (now, self.config.name, g.primary.name, str(g.primary.version or ""),
                 g.fallback.name, str(g.fallback.version or ""))
        latency = result.timing_ms.get("total")
        routes = result.routes.tolist()
        return [
            (*head, i, *model, routes[i], ";".join(result.reasons[i]), served[i], prim[i], fb[i],
             None if probs is None else probs[i], latency, None if features is None else features[i])
            for i in range(result.n_rows)
        ]

    # -- drift ---------------------------------------------------------------------------------

    def flush_drift(self) -> bool:
        """Write this worker's drift counts as one segment; on failure keep them for next time."""
        if self._drift is None:
            return True
        self.drain()
        with self._drift_lock:
            pending, self._drift = self._drift, DriftState.empty(self.profile)
        if pending.is_empty:
            return True
        try:
            now = time.time()
            self.store().add_segment(self.worker_id, pending.first_ts or now, pending.last_ts or now,
                                     pending.rows, pending.to_dict())
            return True
        except Exception as e:
            log.warning("could not flush drift counts to the store (kept for the next try): %s", e)
            with self._drift_lock:
                self._drift = pending.merge(self._drift)
            return False

    def drift(self) -> dict[str, Any]:
        """The merged drift view of every worker and replica writing to the store."""
        if self._drift is None:
            raise NotFoundError("drift monitoring is disabled in this serving config (drift.enabled)")
        self.flush_drift()
        store = self.store()
        segments = _segments(store)
        d = self.config.drift
        now = time.time()  # closes a time window whose period has passed, even with no traffic
        windows = assemble_windows(segments, self.profile, d.window_rows, d.window_seconds, now=now)
        view = drift_view(segments, self.profile, d.window_rows, d.window_seconds,
                          d.consecutive_windows_for_retrain, self.thresholds, now=now, windows=windows)
        self._after_view(view, windows, now)
        view["model"] = self.config.name
        view["profile_hash"] = self.profile.content_hash
        return view

    def _after_view(self, view: dict[str, Any], windows: list[Window], now: float) -> None:
        """Gauges, change events, alerts and compaction after each evaluation."""
        if self.metrics is not None:
            self.metrics.set_drift(view)
        current = view["current"]
        statuses = {f["name"]: f["status"] for f in current.get("features") or []}
        statuses["__overall__"] = current["status"]
        if current.get("prediction"):
            statuses["prediction"] = current["prediction"]["status"]
        store = self.store()
        # The statuses last recorded by any process: each change is recorded, and alerted, once.
        last = store.last_event("drift_status")
        prev: dict[str, str] = last["body"].get("statuses", {}) if last else {}
        prev_retrain = bool(last["body"].get("retrain_recommended")) if last else False
        changes = [{"feature": k, "from": prev[k], "to": v} for k, v in statuses.items()
                   if k in prev and prev[k] != v]
        retrain = bool(view.get("retrain_recommended"))
        if last is None or changes or retrain != prev_retrain:
            body = {"statuses": statuses, "changes": changes, "retrain_recommended": retrain,
                    "window": current.get("window"), "model": self.config.name}
            recorded = store.add_event_after("drift_status", last["id"] if last else 0, body)
            if recorded is not None and (changes or retrain != prev_retrain):
                for c in changes:
                    log.warning("drift: feature %s changed from %s to %s (model %s)",
                                c["feature"], c["from"], c["to"], self.config.name)
                _span_event(changes, retrain, self.config.name)
                if self.config.drift.webhook_url and (
                        any(c["to"] == "drift" for c in changes) or (retrain and not prev_retrain)):
                    # Off the caller's thread: GET /drift must not wait for a slow receiver.
                    threading.Thread(target=self._send_webhook, args=(body,), daemon=True).start()
        # Closed windows need one segment each, not one per flush.
        for w in windows:
            if not w.closed or len(w.segment_ids) < 2:
                continue
            try:
                store.replace_segments([i for i in w.segment_ids if i is not None], compact([w])[0].as_row())
            except StoreError as e:  # another process may be compacting too
                log.debug("compaction skipped: %s", e)
        closed = sum(1 for w in view.get("windows") or [] if w["closed"])
        if closed >= MAX_LISTED_WINDOWS:  # maybe more than KEEP_WINDOWS closed: check
            self._archive(now)

    def _archive(self, now: float) -> None:
        """Fold windows older than the newest KEEP_WINDOWS into one segment (bounded reads)."""
        store = self.store()
        segments = _segments(store)
        d = self.config.drift
        windows = assemble_windows(segments, self.profile, d.window_rows, d.window_seconds, now=now)
        if sum(1 for w in windows if w.closed) <= KEEP_WINDOWS + ARCHIVE_SLACK:
            return
        folded = archive(segments, windows, KEEP_WINDOWS)
        if folded is not None:
            seg, ids = folded
            store.replace_segments(ids, seg.as_row())

    def _send_webhook(self, body: dict[str, Any]) -> None:
        import httpx  # adapter-only dependency

        payload = {"kind": "drift_alert", "ts": time.time(), **body}
        url = self.config.drift.webhook_url
        assert url
        try:
            httpx.post(url, json=payload, timeout=5.0).raise_for_status()
        except Exception as e:
            log.warning("drift webhook %s failed: %s", url, e)

    # -- feedback and performance --------------------------------------------------------------

    def feedback(self, items: list[tuple[str, int, Any]], overwrite: bool = False) -> dict[str, Any]:
        """Store true outcomes durably; see ``Store.add_outcomes`` for the rules."""
        problems = []
        for _rid, row, outcome in items:
            why = self._outcome_problem(outcome)
            if why:
                problems.append(Problem(problem=why, row=row, column="outcome",
                                        expected=self._outcome_type(), got=repr(outcome)[:80]))
        if problems:
            raise SchemaError(f"{len(problems)} outcome(s) of the wrong type", problems)
        self.drain()
        if self.writer is not None:
            self.writer.flush(timeout=FEEDBACK_WAIT_S)
        deadline = time.monotonic() + FEEDBACK_WAIT_S
        while True:
            try:
                return self.store().add_outcomes(items, overwrite=overwrite)
            except NotFoundError:
                # Another worker may not have written that request's log yet.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _outcome_type(self) -> str:
        return "a number" if self.profile.task == "regression" else "a class label (string, integer or boolean)"

    def _outcome_problem(self, v: Any) -> str | None:
        if self.profile.task == "regression":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return "outcome must be a finite number"
            return None
        if v is None or isinstance(v, (dict, list, float)):
            return "outcome must be a class label"
        return None

    def performance(self, since: float | None = None, window_rows: int | None = None) -> dict[str, Any]:
        df = self.store().outcome_rows(since=since)
        perf = live_performance(df, self.profile.task, self.profile.baseline,
                                window_rows=window_rows or self.config.drift.window_rows)
        if self.metrics is not None:
            self.metrics.set_performance(metric_gauges(perf))
        perf["model"] = self.config.name
        return perf

    # -- background work ---------------------------------------------------------------------

    def _ensure_background(self) -> None:
        # Started on first use in each worker: a thread started before BentoML forks would not survive.
        if self._background_pid == os.getpid():
            return
        with self._store_lock:
            if self._background_pid == os.getpid():
                return
            self._background_pid = os.getpid()
            threading.Thread(target=self._flush_loop, name="guarded-flush", daemon=True).start()
            threading.Thread(target=self._monitor_loop, name="guarded-monitor", daemon=True).start()

    def _monitor_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(MONITOR_INTERVAL_S)
            self._wake.clear()
            self.drain()

    def _flush_loop(self) -> None:
        interval = self.config.store.flush_seconds
        while not self._stop.wait(interval):
            try:
                if self._drift is not None and self.flush_drift():
                    self.drift()
                self._purge()
            except Exception as e:  # the loop must outlive a store outage
                log.warning("background drift evaluation failed: %s", e)

    def _purge(self) -> None:
        days = self.config.prediction_log.retention_days
        now = time.time()
        if not days or now - self._last_purge < 3600:
            return
        self._last_purge = now
        n = self.store().purge_predictions(now - days * 86400)
        if n:
            log.info("purged %d prediction-log rows older than %s days", n, days)

    def close(self) -> None:
        """Flush what is pending (drift counts, prediction log) and stop background work."""
        self._stop.set()
        self._wake.set()
        self.drain()
        if self.writer is not None:
            self.writer.close(timeout=5.0)
        try:
            self.flush_drift()
        except Exception as e:  # pragma: no cover
            log.warning("final drift flush failed: %s", e)
        self.guard.close()
        if self._store is not None:
            self._store.close()


def parse_feedback(body: Any) -> tuple[list[tuple[str, int, Any]], bool]:
    """Items and the overwrite flag from a /feedback body (either shape); PayloadError if malformed."""
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object with request_id and outcomes, or items")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise PayloadError("overwrite must be true or false")
    items: list[tuple[str, int, Any]] = []
    if "items" in body:
        raw = body["items"]
        if not isinstance(raw, list) or not raw:
            raise PayloadError("items must be a non-empty list of {request_id, row, outcome}")
        for i, it in enumerate(raw):
            if not isinstance(it, dict) or not {"request_id", "row", "outcome"} <= set(it):
                raise PayloadError(f"items[{i}] must be an object with request_id, row and outcome",
                                   [Problem(problem="malformed item", row=i)])
            rid, row = it["request_id"], it["row"]
            if not isinstance(rid, str) or not rid:
                raise PayloadError(f"items[{i}].request_id must be a non-empty string")
            if not isinstance(row, int) or isinstance(row, bool) or row < 0:
                raise PayloadError(f"items[{i}].row must be a row index (integer >= 0)")
            items.append((rid, row, it["outcome"]))
    elif "request_id" in body and "outcomes" in body:
        rid, outcomes = body["request_id"], body["outcomes"]
        if not isinstance(rid, str) or not rid:
            raise PayloadError("request_id must be a non-empty string")
        if not isinstance(outcomes, list) or not outcomes:
            raise PayloadError("outcomes must be a non-empty list, one per row of the request")
        items = [(rid, i, o) for i, o in enumerate(outcomes)]
    else:
        raise PayloadError('the body must have "request_id" and "outcomes", or "items"')
    return items, overwrite


def _segments(store: Store) -> list[Segment]:
    return [Segment.from_row(row) for row in store.segments()]


def _json_values(a: np.ndarray | None) -> list[str | None]:
    """Each value as JSON text (None for a missing one)."""
    if a is None:
        return []
    if a.dtype.kind == "f":
        return [repr(x) if math.isfinite(x) else None for x in a.tolist()]
    return [None if x is None else dumps(_py(x)) for x in a.tolist()]


def _concat(parts: list[Any]) -> np.ndarray:
    """One array from per-request arrays (object arrays for text, whatever came in)."""
    arrays = [p if isinstance(p, np.ndarray) else pd.array(p).to_numpy(dtype=object, na_value=None)
              for p in parts]
    return arrays[0].copy() if len(arrays) == 1 else np.concatenate(arrays)


def _n_rows(rows: Any) -> int:
    try:
        return len(rows)
    except TypeError:
        return 0


def _py(x: Any) -> Any:
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


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


__all__ = ["ServingRuntime", "new_request_id", "parse_feedback", "GuardedServingError"]
