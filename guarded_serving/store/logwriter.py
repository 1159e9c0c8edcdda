"""A background writer for the prediction log that never blocks the request path.

Requests hand their rows to ``submit``, which only appends to a bounded in-memory buffer; a
daemon thread writes them to the store in batches. When the buffer is full, or the store keeps
failing, rows are dropped and counted rather than held: the log is best effort, serving is not.

>>> writer = LogWriter(lambda: Store("sqlite:///log.sqlite3"))  # doctest: +SKIP
>>> writer.submit([{"request_id": "r1", "row": 0, "ts": 1.0, "prediction": 2.5}])  # doctest: +SKIP
True
>>> writer.flush(); writer.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .sql import Store

log = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0


class LogWriter:
    """Buffers prediction rows and writes them to a ``Store`` from a background thread.

    ``store_factory`` is a Store or a function returning one; a function is called in the
    writer thread, so a forked worker opens its own connections. ``queue_size`` bounds the rows
    held in memory; ``batch_size`` the rows per write; ``flush_interval`` how long (s) rows may
    wait for a batch to fill. A failed write is retried ``retries`` times with doubling backoff,
    then its rows are dropped. ``on_drop(n)`` and ``on_error(exc)`` are called from the thread
    (``on_drop`` also from ``submit``) and must not raise.

    >>> w = LogWriter(store, queue_size=10_000)  # doctest: +SKIP
    >>> w.submit(rows), w.pending, w.written, w.dropped  # doctest: +SKIP
    """

    def __init__(self, store_factory: Callable[[], Store] | Store, queue_size: int = 10000,
                 batch_size: int = 500, flush_interval: float = 0.2,
                 on_drop: Callable[[int], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 retries: int = 3, backoff: float = 0.1) -> None:
        self.store_factory = store_factory
        self.queue_size = int(queue_size)
        self.batch_size = max(1, int(batch_size))
        self.flush_interval = float(flush_interval)
        self.on_drop = on_drop
        self.on_error = on_error
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.written = 0
        self.dropped = 0
        # Anything with log_predictions is a store (tests use stand-ins); otherwise a factory.
        self._store: Store | None = (
            store_factory if hasattr(store_factory, "log_predictions") else None  # type: ignore[assignment]
        )
        self._reset()

    def _reset(self) -> None:
        """Fresh buffer, lock and thread (also in a forked child, whose copies are unusable)."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._buffer: deque[dict[str, Any]] = deque()
        self._in_flight = 0
        self._accepted = 0  # rows accepted since start
        self._done = 0  # rows written or dropped after acceptance
        self._flush_wanted = 0  # accepted-count a flush waits for
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0
        self._suppressed = 0

    # -- request path ----------------------------------------------------------------------------

    def submit(self, rows: list[Any]) -> bool:
        """Queue rows for writing; False (rows dropped and counted) when the buffer is full or
        the writer is closed. Never blocks on the store and never raises."""
        try:
            n = len(rows)
            if n == 0:
                return True
            if self._pid != os.getpid():
                self._reset()
            with self._cond:
                if self._closing or len(self._buffer) + self._in_flight + n > self.queue_size:
                    accepted = False
                else:
                    self._buffer.extend(rows)
                    self._accepted += n
                    accepted = True
                    if self._thread is None or not self._thread.is_alive():
                        self._start()
                    if len(self._buffer) >= self.batch_size:
                        self._cond.notify_all()
            if not accepted:
                self._count_dropped(n)
            return accepted
        except Exception:  # noqa: BLE001 - the request must be answered whatever the log does
            log.exception("prediction log: submit failed")
            return False

    def _start(self) -> None:
        # Started lazily: a thread started before the server forks its workers would not exist
        # in them.
        self._thread = threading.Thread(target=self._run, name="guarded-serving-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Rows accepted but not yet written or dropped."""
        with self._cond:
            return len(self._buffer) + self._in_flight

    # -- flush and close -------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row submitted before this call is written (or dropped after failed
        retries); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            self._flush_wanted = max(self._flush_wanted, target)
            self._cond.notify_all()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return self._done >= target
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop the thread; rows submitted afterwards are dropped. False when the
        flush timed out."""
        start = time.monotonic()
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout - (time.monotonic() - start)))
        return flushed

    # -- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            ok = self._write(batch)
            with self._cond:
                self._in_flight = 0
                self._done += len(batch)
                if ok:
                    self.written += len(batch)
                self._cond.notify_all()
            if not ok:
                self._count_dropped(len(batch))

    def _next_batch(self) -> list[dict[str, Any]] | None:
        with self._cond:
            waited_since = time.monotonic()
            while True:
                n = len(self._buffer)
                due = (n >= self.batch_size or self._closing or self._flush_wanted > self._done
                       or (n and time.monotonic() - waited_since >= self.flush_interval))
                if n and due:
                    break
                if not n and self._closing:
                    return None
                self._cond.wait(self.flush_interval if n else 1.0)
                if not n:
                    waited_since = time.monotonic()
            take = min(n, self.batch_size)
            batch = [self._buffer.popleft() for _ in range(take)]
            self._in_flight = take
            return batch

    def _write(self, batch: list[dict[str, Any]]) -> bool:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                if self._store is None:
                    self._store = self.store_factory()  # type: ignore[operator]
                self._store.log_predictions(batch)
                return True
            except Exception as e:  # noqa: BLE001 - any store failure: retry, then drop
                self._report(e, len(batch), attempt)
                if attempt < self.retries:
                    with self._cond:
                        # close() cuts the backoff short; the retry still happens.
                        self._cond.wait_for(lambda: self._closing, delay)
                    delay *= 2
        return False

    def _report(self, e: Exception, n: int, attempt: int) -> None:
        if self.on_error is not None:
            try:
                self.on_error(e)
            except Exception:  # noqa: BLE001
                log.exception("prediction log: on_error callback failed")
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            extra = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
            log.warning("prediction log: writing %d row(s) failed (attempt %d of %d): %s%s",
                        n, attempt + 1, self.retries + 1, e, extra)
            self._last_warning, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _count_dropped(self, n: int) -> None:
        with self._cond:
            self.dropped += n
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:  # noqa: BLE001
                log.exception("prediction log: on_drop callback failed")
