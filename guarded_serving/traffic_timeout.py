"""BentoML's per-request timeout (``traffic.timeout``) without keeping every request alive.

BentoML 1.4's ``TimeoutMiddleware`` arms ``loop.call_later(timeout, ...)`` for each request and
never cancels it. An asyncio timer holds a copy of the context it was armed in, and a request's
context holds its Starlette ``Request`` (with the body it read), its tracing span and the closures
of every middleware: so each request stays in memory until its timer fires, ``traffic.timeout``
seconds later (60 by default). Measured in a worker at 130 requests/s of 1,000 rows: 1,911 pending
timers after 18 s, about 220,000 objects that every full garbage collection walked (46 ms each,
44 of them in that run, about a tenth of the worker's time with the GIL held), and at steady
state ``rate x timeout`` requests' bodies held (about 7,800 at that rate, 100 kB each).

``install`` gives the middleware a ``__call__`` with the same behaviour (a 504 JSON body when the
app has not started its response within the timeout) whose timer carries an empty context and is
cancelled when the request ends. It changes nothing if BentoML's class is not where this version
of BentoML keeps it (a newer BentoML may have fixed it); ``installed()`` says whether it applied.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

log = logging.getLogger(__name__)

_EMPTY = contextvars.Context()
_installed = False


def install() -> bool:
    """Patch BentoML's ``TimeoutMiddleware`` in this process; True if it applied."""
    global _installed
    if _installed:
        return True
    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:  # pragma: no cover - BentoML moved it
        log.info("BentoML's TimeoutMiddleware is not where it was; its timers are left as they are")
        return False
    if not callable(getattr(TimeoutMiddleware, "_set_timer_out", None)):  # pragma: no cover
        log.info("BentoML's TimeoutMiddleware changed; its timers are left as they are")
        return False
    TimeoutMiddleware.__call__ = _call  # type: ignore[method-assign]
    _installed = True
    return True


def installed() -> bool:
    return _installed


async def _call(self: Any, scope: Any, receive: Any, send: Any) -> None:
    """BentoML's ``TimeoutMiddleware.__call__`` (1.4), its timer cancelled at the end and armed
    in an empty context (its callback needs none)."""
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=_EMPTY)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            from starlette.responses import JSONResponse

            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()
