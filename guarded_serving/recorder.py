"""The recording pipeline of one serving process: a served batch -> drift counts, shadow
predictions and the prediction log, from one hand-off.

A request hands its ``GuardedResult`` over once (``submit``: a reference to its arrays, no
per-row objects, no copy) into a bounded queue. One consumer thread takes everything waiting,
concatenates it column by column, runs the shadow predictions for the whole lot (the one shadow
path: the fallback on rows the primary answered, the primary on rows sent to the fallback),
counts every row into the drift state (with the live estimates' tally of the same rows, see
estimates.py), and appends the sampled rows to the log as one ``LogBatch`` (one compressed Arrow
record batch in one transaction).

Durability. By default a request is acknowledged before its rows are stored: a crash loses at
most what was submitted in the last ``prediction_log.flush_seconds`` plus the write in progress
(the bound); drops the process can see (queue full, store failing after retries, a close that
times out) are counted in ``guarded_serving_prediction_log_dropped_rows_total``. With
``prediction_log.durable`` a request waits (``submit`` returns a future) until its rows are
committed; concurrent requests share one commit (group commit): the consumer writes all that
waits as soon as a durable request is among it.

>>> rec = Recorder(guard, config, store_handle)  # doctest: +SKIP
>>> rec.submit("r1", result); rec.flush(); rec.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .challenger import Challenger, shadow_challenger
from .config import ServingConfig
from .drift.state import DriftState
from .errors import ConfigError, StoreError
from .estimation import WindowTally
from .guard import (
    FALLBACK_ROUTE,
    PRIMARY,
    REJECTED,
    GuardedModel,
    GuardedResult,
    predict_on_columns,
)
from .ledger import Ledger
from .store.logbatch import LogBatch
from .store.sql import Store

if TYPE_CHECKING:
    from .estimates import LiveEstimates

log = logging.getLogger(__name__)

#: Attempts at writing one log batch before its rows are dropped (and counted), and the pause
#: between them (doubling).
WRITE_ATTEMPTS = 3
RETRY_PAUSE_S = 0.2
_WARN_EVERY_S = 30.0
#: Fingerprints of client-named requests kept until their request is submitted.
_MAX_EXPECTED = 10_000


@dataclass
class _Item:
    request_id: str
    ts: float
    result: GuardedResult
    logged: bool
    done: Future[int] | None = None
    fingerprint: int | None = None
    #: Set once its rows are counted as logged, sampled out or dropped.
    settled: bool = False
    #: Its number in the hand-off from a serving process (recorder_process.py); -1 in process.
    seq: int = -1


@dataclass
class RecorderCounts:
    """Rows seen by the recorder since it started (this process)."""

    submitted: int = 0
    logged: int = 0
    sampled_out: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"monitoring": 0, "log": 0})


class HandOff:
    """What both recorders (this one, and ``recorder_process.RecorderProcess``) do on the request
    path before queueing: fingerprints of client-named requests, and the log's sample."""

    def __init__(self, config: ServingConfig, on_drop: Callable[[int, str], None] | None,
                 on_logged: Callable[[int, int], None] | None, ledger: Ledger | None) -> None:
        pl = config.prediction_log
        self.config = config
        self.log_enabled = pl.enabled
        self.sample_rate = pl.sample_rate
        self.durable = pl.enabled and pl.durable
        self.queue_rows = max(pl.queue_size, config.max_rows)
        self.on_drop = on_drop
        self.on_logged = on_logged
        self.counts = RecorderCounts()
        #: Rows acknowledged before they are stored, counted where a killed process leaves them
        #: (ledger.py); None in durable mode, where nothing is acknowledged before it is stored.
        self.ledger = ledger
        self._fingerprints: dict[str, int] = {}

    def expect_fingerprint(self, request_id: str, fingerprint: int) -> None:
        """The fingerprint of a client-named request's rows (``idempotency``), to be stored with
        its log entry when the request is submitted; ``forget_fingerprint`` if it never is."""
        fps = self._fingerprints
        fps[request_id] = fingerprint
        while len(fps) > _MAX_EXPECTED:  # requests that failed without forgetting theirs
            fps.pop(next(iter(fps)), None)

    def forget_fingerprint(self, request_id: str) -> None:
        self._fingerprints.pop(request_id, None)

    def _terms(self, request_id: str) -> tuple[int | None, bool, Future[int] | None]:
        """(its fingerprint, whether its rows are logged, the future a durable request waits on)."""
        fingerprint = self._fingerprints.pop(request_id, None) if self._fingerprints else None
        logged = self.log_enabled and (self.sample_rate >= 1.0 or np.random.random() < self.sample_rate)
        return fingerprint, logged, Future() if self.durable and logged else None

    @staticmethod
    def _refused(done: Future[int] | None) -> None:
        """Tell a durable request whose batch found no room that it is not acknowledged."""
        if done is not None:
            done.set_exception(StoreError("the prediction log's queue is full; the request was "
                                          "not logged, so it is not acknowledged"))


class Recorder(HandOff):
    """One per serving process; see the module docstring. ``store`` is a function returning the
    store (it may raise StoreError while the store is down); ``on_drop(n, stage)`` and
    ``on_logged(logged, sampled_out)`` report to metrics and must not raise."""

    def __init__(self, guard: GuardedModel, config: ServingConfig, store: Callable[[], Store],
                 on_drop: Callable[[int, str], None] | None = None,
                 on_logged: Callable[[int, int], None] | None = None,
                 estimates: LiveEstimates | None = None, ledger: Ledger | None = None) -> None:
        pl = config.prediction_log
        if not 0.0 <= pl.sample_rate <= 1.0:
            raise ConfigError(f"prediction_log.sample_rate: must be between 0 and 1, got {pl.sample_rate!r}")
        if pl.flush_seconds <= 0:
            raise ConfigError(f"prediction_log.flush_seconds: must be positive, got {pl.flush_seconds!r}")
        super().__init__(config, on_drop, on_logged, ledger)
        self.guard = guard
        self.store = store
        self.shadow_fallback = pl.enabled and pl.shadow_fallback
        self.shadow_primary = pl.enabled and pl.shadow_primary
        self.log_features = pl.log_features
        self.flush_seconds = pl.flush_seconds
        # The default lot never waits for more than half of what the queue holds: with a small
        # queue_size, waiting for a big lot would drop rows a write could have made room for.
        # A batch_size set in the config is taken as it is.
        self.batch_rows = max(1, pl.batch_size if "batch_size" in pl.model_fields_set
                              else min(pl.batch_size, self.queue_rows // 2))
        self._drift: DriftState | None = DriftState.empty(guard.profile) if config.drift.enabled else None
        self._drift_lock = threading.Lock()
        #: Live estimates: each batch's tally, taken with the drift counts it belongs to.
        self.estimates = estimates if self._drift is not None else None
        self._tally: WindowTally | None = None
        self._model_columns = {
            "model": config.name, "primary_model": guard.primary.name,
            "primary_version": str(guard.primary.version or ""), "fallback_model": guard.fallback.name,
            "fallback_version": str(guard.fallback.version or ""),
        }
        self._pid = -1
        self._last_warning = 0.0
        #: Scored in shadow on the answered rows of each recorded batch (set by the runtime; one
        #: reference, swapped whole on a promotion).
        self.challenger: Challenger | None = None
        #: The primary of the serving model set, for its shadow on fallback rows (swapped on a switch).
        self.primary_model = guard.primary
        #: Told of each processed lot, after its rows are counted (recorder_process.py).
        self.on_processed: Callable[[list[_Item]], None] | None = None

    @property
    def active(self) -> bool:
        """Whether there is anything to record (drift counting or the log)."""
        return self._drift is not None or self.log_enabled

    # -- request path ------------------------------------------------------------------------

    def submit(self, request_id: str, result: GuardedResult, wait_s: float = 0.0) -> Future[int] | None:
        """Hand a served batch over. Never blocks on the store; when the queue is full it waits
        at most ``wait_s`` for the consumer to take what waits (callers on a worker thread may;
        the event loop may not), then drops the batch and counts it. In durable mode, returns a
        future that completes when the batch's rows are committed (or fails with StoreError)."""
        if result.verdicts is None or not self.active:
            return None
        n = result.n_rows
        fingerprint, logged, done = self._terms(request_id)
        item = _Item(request_id, time.time(), result, logged, done, fingerprint)
        if not self._put(item, wait_s, count_accepted=True):
            self._dropped(n, "monitoring")
            self._refused(done)
        return done

    def take_over(self, item: _Item, wait_s: float) -> bool:
        """An item another process accepted (and entered in its ledger): queued here, waiting up
        to ``wait_s`` for room; False if it could not be (the caller counts the drop)."""
        return self._put(item, wait_s, count_accepted=False)

    def _put(self, item: _Item, wait_s: float, count_accepted: bool) -> bool:
        n = item.result.n_rows
        with self._lock_for_process():
            if wait_s > 0 and not self._closing and self._queued + n > self.queue_rows:
                self._room_wanted += 1  # the consumer takes everything waiting at once
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._closing or self._queued + n <= self.queue_rows, wait_s)
                self._room_wanted -= 1
            if self._closing or self._queued + n > self.queue_rows:
                return False
            self._queue.append(item)
            self._queued += n
            self.counts.submitted += n
            if count_accepted and item.logged and self.ledger is not None:
                self.ledger.accepted(n)
            if item.done is not None or self._queued >= self.batch_rows:
                self._cond.notify_all()
        return True

    def follow(self, primary_model: Any, challenger: Challenger | None, event: Any = None) -> None:
        """The serving model set changed (promotion.py): shadow its primary, score its challenger
        (``event``, the switch, matters to the recorder in a process of its own only)."""
        self.primary_model = primary_model
        self.challenger = challenger

    def _lock_for_process(self) -> threading.Condition:
        # The consumer starts on first use in each process: a thread started before the server
        # forks its workers would not exist in them.
        if self._pid != os.getpid():
            self._cond = threading.Condition()
            self._queue: deque[_Item] = deque()
            self._queued = 0
            self._taken = 0  # items taken by the consumer, in order
            self._finished = 0  # items fully processed
            self._flush_wanted = 0
            self._room_wanted = 0  # producers waiting for room in a full queue
            self._closing = False
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="guarded-recorder", daemon=True)
            self._thread.start()
        return self._cond

    # -- drift state -------------------------------------------------------------------------

    def take_drift(self) -> DriftState | None:
        """This process's drift counts since the last take (they start again from zero)."""
        return self.take_monitoring()[0]

    def take_monitoring(self) -> tuple[DriftState | None, WindowTally | None]:
        """The drift counts and the estimation tally of the same rows since the last take."""
        if self._drift is None:
            return None, None
        with self._drift_lock:
            state, self._drift = self._drift, DriftState.empty(self.guard.profile)
            tally, self._tally = self._tally, None
        return state, tally

    def give_back_drift(self, state: DriftState, tally: WindowTally | None = None) -> None:
        """Counts a failed flush could not store: merged back for the next try."""
        with self._drift_lock:
            assert self._drift is not None
            self._drift = state.merge(self._drift)
            self._tally = _merged(tally, self._tally)

    # -- flush and close ---------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before this call is processed; False on timeout."""
        cond = self._lock_for_process()
        deadline = time.monotonic() + timeout
        with cond:
            target = self._taken + len(self._queue)
            self._flush_wanted = max(self._flush_wanted, target)
            cond.notify_all()
            while self._finished < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush (at most ``timeout`` s), then stop; what is still queued is counted as dropped."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        lost = sum(it.result.n_rows for it in left)
        if lost:
            self._dropped(lost, "log")
        return flushed

    # -- the consumer ------------------------------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                since = time.monotonic()
                while not self._closing:
                    due = self._queue and (
                        self._queued >= self.batch_rows or self._flush_wanted > self._taken
                        or self._room_wanted
                        or any(it.done is not None for it in self._queue)
                        or time.monotonic() - since >= self.flush_seconds)
                    if due:
                        break
                    cond.wait(self.flush_seconds if self._queue else 1.0)
                    if not self._queue:
                        since = time.monotonic()
                if self._closing and not self._queue:
                    return
                items = list(self._queue)
                self._queue.clear()
                self._queued = 0
                self._taken += len(items)
                cond.notify_all()  # producers waiting for room
            try:
                self._process(items)
            except Exception as e:  # monitoring must never take serving down
                log.exception("could not record %d request(s) for monitoring", len(items))
                # Rows meant for the log that it never got are drops like any other (counted, and
                # balanced in the ledger), not losses a later process would find.
                lost = sum(it.result.n_rows for it in items if it.logged and not it.settled)
                if lost:
                    self._dropped(lost, "log")
                for it in items:
                    if it.done is not None and not it.done.done():
                        it.done.set_exception(StoreError(f"recording failed: {e}"))
            if self.on_processed is not None:
                try:
                    self.on_processed(items)
                except Exception:  # noqa: BLE001
                    log.exception("recorder: on_processed callback failed")
            with cond:
                self._finished += len(items)
                cond.notify_all()

    def _process(self, items: list[_Item]) -> None:
        results = [it.result for it in items]
        names = list(results[0].verdicts.columns)  # type: ignore[union-attr]
        cols = {k: _concat([r.verdicts.columns[k] for r in results]) for k in names}  # type: ignore[union-attr]
        routes = np.concatenate([r.routes for r in results])
        primary = _concat([r.primary_predictions for r in results])
        fallback = _concat([r.fallback_predictions for r in results])
        if self.shadow_fallback:
            shadow_into(self.guard.fallback, cols, (routes != REJECTED) & pd.isna(fallback), fallback)
        if self.shadow_primary:
            shadow_into(self.primary_model, cols, (routes == FALLBACK_ROUTE) & pd.isna(primary), primary)
        if self._drift is not None:
            keep = routes != REJECTED
            seen = cols if keep.all() else {k: v[keep] for k, v in cols.items()}
            tally = (None if self.estimates is None
                     else self.estimates.tally(cols, routes, primary, fallback, results))
            with self._drift_lock:
                self._drift.update(seen, primary[keep] if not keep.all() else primary)
                self._tally = _merged(self._tally, tally)
        if self.log_enabled:
            challenger = self.challenger
            scored = None if challenger is None else shadow_challenger(challenger, cols, routes)
            self._log(items, cols, routes, primary, fallback, (challenger, scored))

    def _log(self, items: list[_Item], cols: dict[str, np.ndarray], routes: np.ndarray,
             primary: np.ndarray, fallback: np.ndarray,
             challenger: tuple[Challenger | None, np.ndarray | None] = (None, None)) -> None:
        sizes = np.array([it.result.n_rows for it in items])
        chosen = np.array([it.logged for it in items])
        rows = np.repeat(chosen, sizes)
        sampled_out = int(sizes[~chosen].sum())
        durable = [it.done for it in items if it.done is not None]
        if not chosen.any():
            self._count_logged(0, sampled_out)
            _settle(items)
            return
        batch = self._batch([it for it in items if it.logged], rows, cols, routes, primary, fallback)
        if challenger[0] is not None and challenger[1] is not None:
            scored = challenger[1][rows]
            batch.columns["challenger_prediction"] = scored
            version = np.full(len(scored), challenger[0].version, dtype=object)
            version[pd.isna(scored)] = None
            batch.columns["challenger_version"] = version
        written, error = self._write(batch)
        if error is None:
            self._count_logged(len(batch), sampled_out)
            _settle(items)
            for f in durable:
                f.set_result(written)
        else:
            self._dropped(len(batch), "log")
            _settle(items)
            for f in durable:
                f.set_exception(StoreError(f"the prediction log could not be written: {error}"))

    def _batch(self, items: list[_Item], rows: np.ndarray, cols: dict[str, np.ndarray], routes: np.ndarray,
               primary: np.ndarray, fallback: np.ndarray) -> LogBatch:
        sizes = [it.result.n_rows for it in items]
        served = _concat([it.result.predictions for it in items])
        reasons = np.full(sum(sizes), "", dtype=object)  # most batches have no reasons at all
        at = 0
        for it, size in zip(items, sizes, strict=True):
            if any(it.result.reasons):
                reasons[at:at + size] = [";".join(r) if r else "" for r in it.result.reasons]
            at += size
        columns: dict[str, np.ndarray] = {
            "ts": np.repeat([it.ts for it in items], sizes).astype(np.float64),
            "route": _route_text(routes[rows]),
            "reasons": reasons,
            "prediction": served,
            "primary_prediction": primary[rows],
            "fallback_prediction": fallback[rows],
            "latency_ms": np.repeat([it.result.timing_ms.get("total", np.nan) for it in items], sizes),
        }
        constants = dict(self._model_columns)  # stored once in the batch's schema, not per row
        served_by = {it.result.primary_version for it in items} - {None}
        if served_by and served_by != {constants["primary_version"]}:  # the set that served it
            del constants["primary_version"]
            columns["primary_version"] = np.repeat(np.array(
                [it.result.primary_version or self._model_columns["primary_version"] for it in items],
                dtype=object), sizes)
        if any(it.result.probabilities is not None for it in items):
            probs: list[Any] = []
            for it in items:
                r = it.result
                if r.probabilities is None:
                    probs.extend([None] * r.n_rows)
                else:
                    classes = list(r.classes or [])
                    probs.extend({"classes": classes, "served": p}
                                 for p in np.round(r.probabilities, 6).tolist())
            columns["probabilities"] = np.array(probs + [None], dtype=object)[:-1]
        rid = np.repeat(np.array([it.request_id for it in items], dtype=object), sizes)
        row = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
        feats = {k: v[rows] for k, v in cols.items()} if self.log_features else {}
        fps = {it.request_id: it.fingerprint for it in items if it.fingerprint is not None}
        return LogBatch(rid, row, columns, feats, fps, constants)

    def _write(self, batch: LogBatch) -> tuple[int, Exception | None]:
        pause = RETRY_PAUSE_S
        error: Exception | None = None
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return self.store().append_log(batch), None
            except Exception as e:  # any store failure: retry, then drop and count
                error = e
                self._warn(f"writing {len(batch)} log row(s) failed (attempt {attempt + 1} of "
                           f"{WRITE_ATTEMPTS}): {e}")
                if attempt + 1 < WRITE_ATTEMPTS and not self._closing:
                    time.sleep(pause)
                    pause *= 2
        return 0, error

    def _count_logged(self, logged: int, sampled_out: int) -> None:
        self.counts.logged += logged
        if logged and self.ledger is not None:
            self.ledger.committed(logged)
        self.counts.sampled_out += sampled_out
        if self.on_logged is not None:
            try:
                self.on_logged(logged, sampled_out)
            except Exception:  # noqa: BLE001
                log.exception("recorder: on_logged callback failed")

    def _dropped(self, n: int, stage: str) -> None:
        self.counts.dropped[stage] = self.counts.dropped.get(stage, 0) + n
        if stage == "log" and self.ledger is not None:  # "monitoring": never accepted
            self.ledger.dropped(n)
        if self.on_drop is not None:
            try:
                self.on_drop(n, stage)
            except Exception:  # noqa: BLE001
                log.exception("recorder: on_drop callback failed")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            log.warning("prediction log: %s", message)
            self._last_warning = now


def fill_shadows(guard: GuardedModel, result: GuardedResult) -> None:
    """Shadow predictions for one result in place, as the recorder makes them for the log (for
    use outside a server): the fallback on every answered row, the primary on rows sent away."""
    assert result.verdicts is not None
    cols, fb, pr = result.verdicts.columns, result.fallback_predictions, result.primary_predictions
    assert fb is not None and pr is not None
    shadow_into(guard.fallback, cols, (result.routes != REJECTED) & pd.isna(fb), fb)
    shadow_into(guard.primary, cols, (result.routes == FALLBACK_ROUTE) & pd.isna(pr), pr)


def shadow_into(model: Any, cols: dict[str, Any], mask: np.ndarray, out: np.ndarray) -> None:
    """``model``'s answers for the rows in ``mask``, written into ``out``; never raises."""
    idx = np.flatnonzero(mask)
    if not idx.size:
        return
    try:
        pred = predict_on_columns(model, {k: v[idx] for k, v in cols.items()})
        if len(pred) == idx.size:
            out[idx] = pred.labels
    except Exception as e:  # flagged rows may well break the primary; that is the point
        log.debug("shadow %s call on %d row(s) failed: %s", getattr(model, "name", "model"), idx.size, e)


_ROUTE_TEXT = np.array([PRIMARY, FALLBACK_ROUTE, REJECTED], dtype=object)


def _route_text(routes: np.ndarray) -> np.ndarray:
    """Routes (fixed-width text) as an object array of the three route strings, which the log's
    encoder codes in a fraction of the time Arrow takes to convert fixed-width text."""
    fallback, rejected = routes == FALLBACK_ROUTE, routes == REJECTED
    if int(np.count_nonzero(routes == PRIMARY)) + int(fallback.sum()) + int(rejected.sum()) != len(routes):
        return routes  # not one of the three: as it is
    codes = fallback.astype(np.int8)
    codes[rejected] = 2
    return _ROUTE_TEXT[codes]  # type: ignore[no-any-return]


def _settle(items: list[_Item]) -> None:
    for it in items:
        it.settled = True


def _merged(a: WindowTally | None, b: WindowTally | None) -> WindowTally | None:
    return b if a is None else a if b is None else a.merge(b)


def _concat(parts: list[Any]) -> np.ndarray:
    """One array from per-request arrays (object arrays for text, whatever came in)."""
    arrays = [p if isinstance(p, np.ndarray) else pd.array(p).to_numpy(dtype=object, na_value=None)
              for p in parts]
    return arrays[0].copy() if len(arrays) == 1 else np.concatenate(arrays)
