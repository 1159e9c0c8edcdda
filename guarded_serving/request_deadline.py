"""A deadline for each request's head (request line and headers) in BentoML's uvicorn workers.

uvicorn has no such timeout: its keep-alive timer restarts on every byte received, so a client
that trickles a header a byte at a time holds a connection (and a file descriptor) for as long as
it likes. ASGI middleware cannot help, it runs only once the head is complete. BentoML builds the
worker's ``uvicorn.Config`` itself, with the default ``http="auto"``; ``install`` points "auto" at
uvicorn's own protocol class with a timer added: armed when a connection opens and after each
response, disarmed when a request's head has been parsed, closing the connection when it fires.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

_timeout_s = 10.0


def install(timeout_s: float) -> None:
    """Make uvicorn servers configured from now on in this process use ``HeadDeadlineProtocol``."""
    global _timeout_s
    import uvicorn.config

    _timeout_s = timeout_s
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeadDeadlineProtocol"


def _base() -> type[Any]:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


class HeadDeadlineProtocol(_base()):  # type: ignore[misc]
    """uvicorn's HTTP protocol (httptools or h11) with a deadline for each request head."""

    _head_timer: asyncio.TimerHandle | None = None
    _seen_cycle: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not None and self.cycle is not self._seen_cycle:
            self._disarm()  # a new request's head is complete
            self._seen_cycle = self.cycle

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.cycle is self._seen_cycle and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request head within %.3g s",
                     self.client, _timeout_s)
            self.transport.close()
