"""Small bounded executors with daemon threads, one per kind of work in a serving process.

The primary model, the monitoring endpoints and store I/O each get their own: a slow database
then fills the store's threads and queue, never the model's, and a full queue answers at once
(``ExecutorBusyError``) instead of growing. Threads are daemons: a call stuck on a silent
database cannot hold a worker at shutdown (``concurrent.futures`` joins its threads at exit).

>>> ex = BoundedExecutor("demo", threads=2, queue=4)
>>> ex.submit(sum, [1, 2]).result()
3
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio

from .errors import StoreError

T = TypeVar("T")

__all__ = ["BoundedExecutor", "ExecutorBusyError"]


class ExecutorBusyError(StoreError):
    """Every thread of an executor is busy and its queue is full."""


class BoundedExecutor:
    """``threads`` daemon threads taking work from a queue of at most ``queue`` waiting calls.

    Threads start on first use in each process (a thread started before a server forks its
    workers does not exist in them)."""

    def __init__(self, name: str, threads: int, queue: int) -> None:
        self.name = name
        self.threads = max(1, int(threads))
        self.queue_size = max(0, int(queue))
        self._pid = -1
        self._lock = threading.Lock()
        self._busy = 0
        self._waiting = 0
        self.rejected = 0

    def _start(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._busy = self._waiting = 0
        for i in range(self.threads):
            threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True).start()
        self._pid = os.getpid()

    @property
    def idle(self) -> int:
        """Threads free to start a call now."""
        return max(0, self.threads - self._busy - self._waiting)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)``; ExecutorBusyError when every thread is busy and the queue is full."""
        with self._lock:
            if self._pid != os.getpid():
                self._start()
            if self._busy + self._waiting >= self.threads + self.queue_size:
                self.rejected += 1
                raise ExecutorBusyError(f"the {self.name} executor is busy ({self.threads} threads, "
                                        f"{self.queue_size} queued calls); try again shortly")
            self._waiting += 1
        fut: Future[T] = Future()
        self._queue.put((fut, fn, args))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """``fn(*args)`` on this executor, awaited at most ``timeout`` seconds (TimeoutError);
        a call that times out keeps its thread until it returns, nobody waits for it. A call
        that finished in time but whose result a busy event loop saw late is not a timeout."""
        fut = self.submit(fn, *args)
        wrapped = asyncio.wrap_future(fut)
        # An abandoned call's error is nobody's to retrieve: mark it seen, not logged at GC.
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
        if timeout is None:
            return await wrapped
        try:
            with anyio.fail_after(timeout):
                return await asyncio.shield(wrapped)
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                return fut.result()
            raise

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            with self._lock:
                self._waiting -= 1
                self._busy += 1
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            finally:
                with self._lock:
                    self._busy -= 1
