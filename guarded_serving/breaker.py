"""A circuit breaker for the primary model: a few slow or failing calls are answered by the
fallback one by one; only a run of them stops calling the primary for a while.

Closed: every call goes to the primary, each with its own deadline. ``failures`` consecutive
calls that miss their deadline or raise open the breaker: for ``open_seconds`` the primary is
skipped (its rows go to the fallback, with the reason of the failures that opened it). Then it
is half-open: one probe call at a time goes through; a success closes the breaker, a failure
opens it again. An isolated slow call therefore costs its own rows and nothing else, unlike a
gate on calls in flight, where one slow call turns every request behind it away.

>>> b = CircuitBreaker(failures=2, open_seconds=10.0)
>>> b.allow(now=0.0), b.record(False, "slow", now=0.0), b.record(False, "slow", now=0.1)
(True, None, None)
>>> b.state, b.allow(now=1.0), b.allow(now=10.2), b.allow(now=10.3)
('open', False, True, False)
>>> b.record(True, now=10.4); b.state
'closed'
"""

from __future__ import annotations

import threading
import time
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failed calls; see the module docstring. Thread-safe."""

    def __init__(self, failures: int = 5, open_seconds: float = 5.0) -> None:
        self.failures = max(1, int(failures))
        self.open_seconds = float(open_seconds)
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        #: Why the breaker last opened ("slow" or "error"): the reason given to skipped rows.
        self.cause = "slow"
        self.opened = 0

    @property
    def state(self) -> str:
        return str(self._state)

    def allow(self, now: float | None = None) -> bool:
        """May this call go to the primary? In half-open state, True for one probe at a time."""
        if self._state is BreakerState.CLOSED:  # the common case: no lock
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._state is BreakerState.OPEN and now - self._opened_at >= self.open_seconds:
                self._state = BreakerState.HALF_OPEN
                self._probing = False
            if self._state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return self._state is BreakerState.CLOSED

    def record(self, ok: bool, cause: str = "slow", now: float | None = None) -> None:
        """The outcome of a call ``allow`` let through."""
        if ok and self._state is BreakerState.CLOSED and not self._consecutive:
            return
        with self._lock:
            if ok:
                self._consecutive = 0
                self._state = BreakerState.CLOSED
                self._probing = False
                return
            self._consecutive += 1
            if self._state is BreakerState.HALF_OPEN or self._consecutive >= self.failures:
                if self._state is not BreakerState.OPEN:
                    self.opened += 1
                self._state = BreakerState.OPEN
                self._opened_at = time.monotonic() if now is None else now
                self._probing = False
                self.cause = cause
