"""The composition root of one serving process: a GuardedModel, its recorder, its drift
monitor, the store and the executors they run on, wired together with no HTTP in it (the service
module maps this to routes and statuses).

Isolation: the primary model runs on its own executor (``GuardedModel.executor``); the
monitoring endpoints (``adrift``, ``afeedback``, ``aperformance``) on a small bounded one of
their own, each call bounded by the store timeout (StoreError, 503, when it passes); the
recorder (shadows, drift counts, estimate tallies, the log) runs in a process of its own beside
this one (``recorder_process.py``; a thread of this one in process) and drift counts are flushed
by another thread. A slow or
silent store fills its own threads and answers 503 fast; it never holds a model thread, the
event loop or a lock while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .challenger import Challenger, challenger_drift, load_challenger
from .codec import dumps
from .config import ServingConfig
from .errors import (
    GuardedServingError,
    NotFoundError,
    SchemaError,
    StoreError,
)
from .estimates import LiveEstimates, with_tally
from .executors import BoundedExecutor, ExecutorBusyError
from .feedback import FeedbackRequest, OutcomeItem, OutcomeRule
from .guard import GuardedModel, GuardedResult
from .ledger import count_lost, open_ledger
from .monitor import DriftMonitor
from .performance import challenger_performance, live_performance, metric_gauges, realized_beside
from .promotion import POLL_S, Action, SwitchEvent, build_guard, current_switch, promote, switches
from .recorder import Recorder
from .recorder_process import START_TIMEOUT_S, RecorderProcess
from .store.sql import LazyStore
from .telemetry import ServiceMetrics

log = logging.getLogger(__name__)

#: How long /feedback waits for other workers' recorders before calling a request id unknown.
FEEDBACK_WAIT_S = 2.0
#: Batches up to this many rows are checked on the event loop (the primary still runs on its
#: executor); larger ones in a thread. Checking 1,000 rows holds the loop about as long as
#: parsing their body already does (a millisecond or two), and the hop to a thread, which then
#: shares the GIL with the loop parsing the next body, cost more: 9-15% of the throughput at
#: 1,000 rows a request (bench: 130 -> 142 requests/s, alternating rounds); at 100, within noise.
INLINE_ROWS = 2048
#: How long a request checked on a worker thread (batches over INLINE_ROWS, the sync API) may
#: wait for room in a full recorder queue before its rows are dropped and counted; the event
#: loop never waits.
RECORD_WAIT_S = 1.0
#: Threads and queued calls of the monitoring endpoints' executor.
MONITOR_THREADS, MONITOR_QUEUE = 2, 32
#: GET /drift and /performance answers per second per worker, and the longest a read may wait
#: for its turn (past that it is a 503 at once): dashboards polling in a tight loop get paced
#: answers instead of taking the event loop from /predict.
READS_PER_S, READ_WAIT_S = 10.0, 5.0
#: Switch events listed by /performance.
SWITCHES_SHOWN = 20
#: How long close() may take in all (BentoML's shutdown waits for it).
CLOSE_TIMEOUT_S = 5.0


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


@dataclass(frozen=True)
class _View:
    view: dict[str, Any]
    body: bytes


class ServingRuntime:
    """A guarded model plus its monitoring, for one process.

    >>> rt = ServingRuntime(load_config("models/diamonds/serving.yaml"))  # doctest: +SKIP
    >>> result = rt.predict([{"carat": 0.5, ...}], request_id="abc")  # doctest: +SKIP
    >>> rt.drift()["current"]["status"]  # doctest: +SKIP
    """

    def __init__(self, config: ServingConfig, *, metrics: ServiceMetrics | None = None,
                 worker_id: str | None = None, recorder_process: bool = False) -> None:
        self.config = config
        self.metrics = metrics
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        # Count what workers that died before us lost, then keep a ledger of our own.
        count_lost(config, metrics.lost if metrics is not None else None)
        ledger = open_ledger(config, self.worker_id)
        on_logged = metrics.logged if metrics is not None else None
        #: Shadows, drift counts, estimate tallies and the log: in a process of its own beside
        #: this one (the service's default, ``prediction_log.recorder_process``) or in a thread.
        self.recorder: Recorder | RecorderProcess
        if recorder_process:  # started first: it loads its models while this process loads its own
            self.recorder = RecorderProcess(config, self.worker_id, on_drop=self._on_drop,
                                            on_logged=on_logged, ledger=ledger)
            self.recorder.start()
        try:
            self.guard = GuardedModel.from_config(config)
        except BaseException:
            if recorder_process:
                self.recorder.close(1.0)
            raise
        self.profile = self.guard.profile
        classes = self.guard.primary.classes or self.guard.fallback.classes
        #: What a plausible outcome is for this model (checked before anything is stored).
        self.outcome_rule = OutcomeRule.from_profile(self.profile, classes, config.feedback.outcome_range_margin)
        self.timeout_s = config.store.timeout_seconds
        self.store = LazyStore(config.store.url, config.store.table_prefix, self.timeout_s)
        self.monitor = DriftMonitor(config, self.profile, self.store,
                                    on_view=metrics.set_drift if metrics is not None else None)
        #: Estimated performance per drift window (None without estimation artefacts).
        self.estimates = LiveEstimates.for_config(
            config, self.profile, webhook=self.monitor.alert,
            on_view=metrics.set_estimates if metrics is not None else None)
        self.monitor.estimates = self.estimates
        self.challenger = load_challenger(config)
        if recorder_process:
            assert isinstance(self.recorder, RecorderProcess)
            self.recorder.challenger = self.challenger
            # Until the recording process runs, nothing acknowledged could be stored: the loss
            # bound holds from the first request only if this worker is not ready before it.
            if not self.recorder.wait_ready(START_TIMEOUT_S):
                log.error("the recording process could not start (its error is above); recording "
                          "in a thread of this worker instead, at a cost to throughput")
                self.recorder.close(1.0)
                recorder_process = False
        if not recorder_process:
            self.recorder = Recorder(self.guard, config, self.store, on_drop=self._on_drop,
                                     on_logged=on_logged, estimates=self.estimates, ledger=ledger)
            self.recorder.challenger = self.challenger
        self.monitoring = BoundedExecutor("guarded-monitoring", MONITOR_THREADS, MONITOR_QUEUE)
        self._stop = threading.Event()
        self._flusher_pid = -1
        self._view: tuple[float, Future[_View]] | None = None
        self._view_lock = threading.Lock()  # guards _view only; never held across I/O
        self._last_purge = 0.0
        self._next_read = 0.0  # event-loop time of the next free read slot
        #: Told of every switch this process follows: (event, loaded); must not raise.
        self.on_switch: Any = None
        self.switch_failures = 0
        self._config_guard = self.guard
        self._switch_id = 0
        self._switch_pid = -1
        # One switch followed at a time (the watcher and /admin may both see one); never taken
        # on the request path.
        self._switch_lock = threading.Lock()
        self._follow_switches()  # a process starting after a promotion serves the promoted set
        self._ensure_switch_watcher()

    def _on_drop(self, n: int, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped(n, stage)

    # -- prediction --------------------------------------------------------------------------

    def predict(self, rows: Any, request_id: str, on_reject: str = "raise") -> GuardedResult:
        """Guarded prediction of a batch, handed to the recorder (drift counts, shadows, log).
        In durable mode it returns once the batch's rows are committed (StoreError if they
        cannot be)."""
        result = self._counted(lambda: self.guard.predict(rows, on_reject=on_reject, request_id=request_id), rows)
        done = self._record(result, request_id, wait_s=RECORD_WAIT_S)
        if done is not None:
            self._durable_wait(done)
        return result

    async def apredict(self, rows: Any, request_id: str, on_reject: str = "raise") -> GuardedResult:
        """``predict`` from an event loop: batches up to ``INLINE_ROWS`` are checked on the loop,
        the primary runs on its executor; bigger ones are checked in a thread. Durable mode awaits
        the batch's group commit."""
        if _n_rows(rows) > INLINE_ROWS:
            import anyio

            def checked_and_handed_over() -> tuple[GuardedResult, Future[int] | None]:
                res = self._counted(lambda: self.guard.predict(rows, on_reject=on_reject,
                                                               request_id=request_id), rows)
                # On a worker thread a full recorder queue may be waited for, briefly.
                return res, self._record(res, request_id, wait_s=RECORD_WAIT_S)

            result, done = await anyio.to_thread.run_sync(checked_and_handed_over)
        else:
            try:
                result = await self.guard.apredict(rows, on_reject=on_reject, request_id=request_id)
            except SchemaError:
                self._count_rejected(rows)
                raise
            # On the loop a full queue is never waited for: its rows are dropped and counted, so
            # a store that hangs (and the recorder behind it) never slows /predict.
            done = self._record(result, request_id)
        if done is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(done), self._durable_timeout())
            except TimeoutError:
                raise StoreError("the prediction log did not confirm the write in time; the "
                                 "request is not acknowledged") from None
        return result

    def _counted(self, call: Any, rows: Any) -> GuardedResult:
        try:
            return call()  # type: ignore[no-any-return]
        except SchemaError:
            self._count_rejected(rows)
            raise

    def _count_rejected(self, rows: Any) -> None:
        if self.metrics is not None:
            self.metrics.rejected(_n_rows(rows))

    def _record(self, result: GuardedResult, request_id: str, wait_s: float = 0.0) -> Future[int] | None:
        if self.metrics is not None:
            self.metrics.observe(result)
        self._ensure_flusher()
        return self.recorder.submit(request_id, result, wait_s)

    def _durable_timeout(self) -> float:
        return self.config.prediction_log.flush_seconds + 3 * self.timeout_s

    def _durable_wait(self, done: Future[int]) -> None:
        try:
            done.result(self._durable_timeout())
        except TimeoutError:
            raise StoreError("the prediction log did not confirm the write in time") from None

    # -- drift ---------------------------------------------------------------------------------

    def flush_drift(self) -> bool:
        """Store this worker's drift counts as one segment; on failure keep them for next time."""
        state, tally = self.recorder.take_monitoring()
        if state is None or state.is_empty:
            return True
        try:
            now = time.time()
            self.store().add_segment(self.worker_id, state.first_ts or now, state.last_ts or now,
                                     state.rows, with_tally(state.to_dict(), tally))
            return True
        except Exception as e:
            log.warning("could not flush drift counts to the store (kept for the next try): %s", e)
            self.recorder.give_back_drift(state, tally)
            return False

    def drift(self) -> dict[str, Any]:
        """The merged drift view of every worker and replica writing to the store. Concurrent
        callers share one evaluation, and a view is reused for ``drift.view_cache_seconds``."""
        return self._drift_view().view

    def drift_json(self) -> bytes:
        """``drift`` as JSON, encoded once per evaluation however many callers read it."""
        return self._drift_view().body

    def _drift_view(self) -> _View:
        if not self.config.drift.enabled:
            raise NotFoundError("drift monitoring is disabled in this serving config (drift.enabled)")
        now = time.monotonic()
        with self._view_lock:
            cached = self._view
            fresh = cached is not None and (not cached[1].done() or
                                            now - cached[0] < self.config.drift.view_cache_seconds)
            if not fresh:
                mine: Future[_View] = Future()
                self._view = (now, mine)
        if fresh:
            assert cached is not None
            return cached[1].result(self.timeout_s * 3)
        try:
            self.recorder.flush(self.timeout_s)
            self.flush_drift()
            view = self.monitor.view()
            challenger = self.recorder.challenger  # None once promoted
            if challenger is not None:
                view["challenger"] = self._challenger_drift(challenger, view)
            out = _View(view, dumps(view).encode())
            mine.set_result(out)
            return out
        except BaseException as e:
            mine.set_exception(e)
            with self._view_lock:
                if self._view is not None and self._view[1] is mine:
                    self._view = None  # an error is not cached
            raise

    def _challenger_drift(self, challenger: Challenger, view: dict[str, Any]) -> dict[str, Any]:
        """The challenger's prediction drift over the logged rows of the current drift window."""
        start = (view.get("current") or {}).get("window", {}).get("start")
        # Drift counts are stamped when the recorder takes a batch, log rows when it was served:
        # up to a flush interval earlier.
        since = None if start is None else start - self.config.prediction_log.flush_seconds - 1.0
        log_rows = self.store().joined(since=since, features=False) if since is not None else None
        preds = log_rows["challenger_prediction"] if log_rows is not None and \
            "challenger_prediction" in log_rows else []
        return challenger_drift(challenger, preds, self.config.drift.min_rows)

    def _cached_view(self) -> _View | None:
        """A fresh evaluated view, without waiting or a thread hop; None if there is none."""
        cached = self._view
        if cached is None or not cached[1].done() or cached[1].exception() is not None:
            return None
        if time.monotonic() - cached[0] >= self.config.drift.view_cache_seconds:
            return None
        return cached[1].result()

    async def _paced(self) -> None:
        """Wait for this read's slot (READS_PER_S); ExecutorBusyError when it is too far off.
        Runs on the event loop only, so the slot counter needs no lock."""
        now = time.monotonic()
        slot = max(now, self._next_read)
        if slot - now > READ_WAIT_S:
            raise ExecutorBusyError(f"more than {READS_PER_S:.0f} monitoring reads a second are "
                                    "waiting; try again shortly")
        self._next_read = slot + 1.0 / READS_PER_S
        if slot > now:
            await asyncio.sleep(slot - now)

    async def adrift(self) -> dict[str, Any]:
        """``drift`` on the monitoring executor, bounded by the store timeout."""
        await self._paced()
        cached = self._cached_view()
        return cached.view if cached is not None else await self._monitoring(self.drift)

    async def adrift_json(self) -> bytes:
        """``drift_json`` from an event loop: a fresh cached view is answered on the loop, with
        no thread hop; otherwise on the monitoring executor, bounded by the store timeout."""
        await self._paced()
        cached = self._cached_view()
        return cached.body if cached is not None else await self._monitoring(self.drift_json)

    # -- feedback and performance --------------------------------------------------------------

    def feedback(self, items: list[tuple[str, int, Any]], overwrite: bool = False) -> dict[str, Any]:
        """Store true outcomes durably; see ``Store.add_outcomes`` for the rules. Outcomes that
        ``outcome_rule`` refuses are a SchemaError (422), all or nothing."""
        self.outcome_rule.check(FeedbackRequest(tuple(OutcomeItem(*it) for it in items), overwrite))
        store = self.store()  # a store that is down fails here, fast, before any waiting
        self.recorder.flush(FEEDBACK_WAIT_S)
        deadline = time.monotonic() + FEEDBACK_WAIT_S
        while True:
            try:
                return store.add_outcomes(items, overwrite=overwrite)
            except NotFoundError:
                # Another worker may not have written that request's log yet.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    async def afeedback(self, items: list[tuple[str, int, Any]], overwrite: bool = False) -> dict[str, Any]:
        """``feedback`` on the monitoring executor, bounded by the store timeout."""
        return await self._monitoring(self.feedback, items, overwrite, extra=FEEDBACK_WAIT_S * 2)

    def performance(self, since: float | None = None, window_rows: int | None = None) -> dict[str, Any]:
        """Live performance of primary, fallback and the guarded service on rows with outcomes."""
        df = self.store().outcome_rows(since=since)
        perf = live_performance(df, self.profile.task, self.profile.baseline,
                                window_rows=window_rows or self.config.drift.window_rows)
        challenger = challenger_performance(df, self.profile.task, self.config.auto_promote.margin)
        if challenger is not None:
            perf["challenger"] = challenger
            self._maybe_auto_promote(challenger)
        if self.metrics is not None:
            self.metrics.set_performance(metric_gauges(perf))
        if self.estimates is not None:
            perf["estimated"] = self.estimated(df)
        perf["model"] = self.config.name
        # Which primary the figures are about, and when it changed (newest first).
        perf["primary_version"] = self.guard.version
        perf["switches"] = [{k: v for k, v in e.to_dict().items() if k != "to"}
                            for e in switches(self.store(), limit=SWITCHES_SHOWN)]
        return perf

    def estimated(self, outcomes: Any = None) -> dict[str, Any]:
        """The estimated view of the drift windows (``estimates.estimated_view``), each window
        with the realized metrics of its rows that have outcomes (``outcomes``: as
        ``Store.outcome_rows`` gives them) beside the estimate."""
        assert self.estimates is not None
        self.drift()  # flushes and evaluates (shared with concurrent readers, briefly cached)
        view = dict(self.estimates.view or {})
        if outcomes is not None and view:
            view["windows"] = realized_beside(view.get("windows") or [], outcomes, self.profile.task)
            cur = (view.get("current") or {}).get("window") or {}
            for w in view["windows"]:
                if w["index"] == cur.get("index"):
                    view["current"] = {**view["current"], "realized": w["realized"]}
        return view

    def _maybe_auto_promote(self, challenger: dict[str, Any]) -> None:
        ap, ch = self.config.auto_promote, self.challenger
        if not ap.enabled or ch is None or ch.version == self.guard.version:
            return
        if challenger.get("n", 0) >= ap.min_outcomes and challenger.get("verdict") == "better":
            try:
                self.switch(Action.PROMOTE, "auto_promote",
                            f"challenger better than the guarded service on {challenger['n']} outcomes")
            except GuardedServingError as e:  # another process promoted first: fine
                log.info("auto-promotion not recorded: %s", e.message)

    async def aperformance(self, since: float | None = None, window_rows: int | None = None) -> dict[str, Any]:
        """``performance`` on the monitoring executor, bounded by the store timeout."""
        await self._paced()
        return await self._monitoring(self.performance, since, window_rows)

    async def _monitoring(self, fn: Any, *args: Any, extra: float = 0.0) -> Any:
        # A few store round trips, each bounded by the store's own timeouts; past this the
        # caller gets a 503 and the call finishes (or fails) in its thread.
        try:
            return await self.monitoring.run(fn, *args, timeout=self.timeout_s + 1.0 + extra)
        except TimeoutError:
            raise StoreError(f"the store did not answer within {self.timeout_s + 1.0 + extra:.0f} s "
                             f"({self.store.url_display})") from None

    # -- background work ---------------------------------------------------------------------

    # -- promotion and rollback (promotion.py) -------------------------------------------------

    def _ensure_switch_watcher(self) -> None:
        if self._switch_pid == os.getpid():
            return
        self._switch_pid = os.getpid()
        threading.Thread(target=self._watch_switches, name="guarded-switches", daemon=True).start()

    def _watch_switches(self) -> None:
        while not self._stop.wait(POLL_S):
            self._follow_switches()

    def _follow_switches(self) -> None:
        """Serve the newest recorded switch's model set, if this process does not yet. The new
        set is loaded and warmed here, off the request path, then swapped in as one reference;
        requests in flight keep the set they started with. A set that cannot be loaded leaves
        the old one serving (counted; tried again at the next switch)."""
        with self._switch_lock:
            self._follow_newest()

    def _follow_newest(self) -> None:
        try:
            ev = current_switch(self.store())
        except Exception as e:  # the store is down: keep serving what we have
            log.debug("could not look for model switches: %s", e)
            return
        new_id = ev.id if ev is not None else 0
        if new_id == self._switch_id:
            return
        self._switch_id = new_id
        try:
            guard = self._config_guard if ev is None else build_guard(self.config, ev.to, self._config_guard)
        except Exception as e:
            self.switch_failures += 1
            log.error("model switch %s to %s could not be loaded; version %s keeps serving: %s",
                      new_id, ev.to_version if ev else "?", self.guard.version, e)
            self._switched(ev, False)
            return
        old = self.guard
        self.guard = guard  # the one reference the request path reads
        self.profile = guard.profile
        if self.estimates is not None:  # estimation artefacts belong to the primary's profile
            self.estimates.follow(ev.to.profile if ev is not None else self.config.profile, guard.profile)
        ch = self.challenger
        self.recorder.follow(guard.primary, ch if ch is not None and ch.version != guard.version else None, ev)
        if ev is not None:
            log.warning("model switch %d: %s from %s to %s by %s (%s)", ev.id, ev.action,
                        old.version, guard.version, ev.actor, ev.reason or "no reason given")
        self._switched(ev, True)

    def _switched(self, ev: SwitchEvent | None, loaded: bool) -> None:
        if self.on_switch is not None and ev is not None:
            try:
                self.on_switch(ev, loaded, self.guard.version)
            except Exception:  # noqa: BLE001
                log.exception("on_switch callback failed")

    def switch(self, action: Action, actor: str, reason: str = "") -> dict[str, Any]:
        """Record a promotion of the config's challenger, or a rollback; this process follows it
        at once, the others within ``POLL_S``."""
        from .promotion import rollback

        fn = promote if action == Action.PROMOTE else rollback
        ev = fn(self.store(), self.config, actor=actor, reason=reason)
        self._follow_switches()
        return {**ev.to_dict(), "serving_version": self.guard.version}

    async def aswitch(self, action: Action, actor: str, reason: str = "") -> dict[str, Any]:
        """``switch`` on the monitoring executor (loading a model may take a while)."""
        return await self._monitoring(self.switch, action, actor, reason, extra=30.0)

    def _ensure_flusher(self) -> None:
        # Started on first use in each worker: a thread started before BentoML forks would not survive.
        self._ensure_switch_watcher()
        if self._flusher_pid == os.getpid():
            return
        with self._view_lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_loop, name="guarded-flush", daemon=True).start()

    def _flush_loop(self) -> None:
        interval = self.config.store.flush_seconds
        while not self._stop.wait(interval):
            try:
                if self.config.drift.enabled and self.flush_drift():
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

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Flush what is pending (log rows, drift counts) and stop background work, within
        ``timeout`` seconds whatever the store does (BentoML's shutdown waits for this)."""
        self._stop.set()
        done = threading.Event()

        def final() -> None:
            try:
                self.recorder.close(timeout * 0.6)
                self.flush_drift()
            except Exception as e:  # pragma: no cover
                log.warning("final flush failed: %s", e)
            finally:
                done.set()

        threading.Thread(target=final, name="guarded-close", daemon=True).start()
        if not done.wait(timeout):
            log.warning("the store did not take the last log rows and drift counts within %.0f s", timeout)
        self.guard.close()
        self.store.close()


def _n_rows(rows: Any) -> int:
    try:
        return len(rows)
    except TypeError:
        return 0


__all__ = ["ServingRuntime", "new_request_id", "GuardedServingError"]
