"""BentoML's traffic.timeout middleware, as installed in the worker (traffic_timeout.py): the same
504 as BentoML's, without holding each request until its timer fires."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from typing import Any

import httpx
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from guarded_serving import traffic_timeout

SEEN: list[weakref.ref[Any]] = []
#: What BentoML's outer middlewares put in a request's context before the timeout middleware runs
#: (its request context, the OpenTelemetry span): here, a holder the endpoint gives the body.
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("current")


class Held:
    body = b""


def with_context(app: Any) -> Any:
    async def outer(scope: Any, receive: Any, send: Any) -> None:
        held = Held()
        SEEN.append(weakref.ref(held))
        token = CURRENT.set(held)
        try:
            await app(scope, receive, send)
        finally:
            CURRENT.reset(token)

    return outer


async def fast(request: Request) -> JSONResponse:
    CURRENT.get().body = await request.body()
    return JSONResponse({"bytes": len(CURRENT.get().body)})


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(5)
    return JSONResponse({})


def _app(timeout: float) -> Any:
    return with_context(TimeoutMiddleware(Starlette(routes=[Route("/fast", fast, methods=["POST"]),
                                                            Route("/slow", slow)]), timeout=timeout))


def _pending_timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for h in loop._scheduled  # type: ignore[attr-defined]
               if not h.cancelled() and getattr(h._callback, "__name__", "") == "_set_timer_out")


def test_requests_are_not_kept_until_their_timer_fires() -> None:
    assert traffic_timeout.install() and traffic_timeout.installed()

    async def run() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=_app(timeout=60))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(50):
                r = await client.post("/fast", content=b"x" * 100_000)
                assert r.status_code == 200 and r.json() == {"bytes": 100_000}
        gc.collect()
        alive = sum(1 for ref in SEEN if ref() is not None)
        return len(SEEN), alive, _pending_timers(asyncio.get_running_loop())

    SEEN.clear()
    served, alive, pending = asyncio.run(run())
    assert served == 50
    assert alive == 0, "BentoML's own middleware keeps every request's context (and body) for 60 s"
    assert pending == 0


def test_a_request_over_the_timeout_still_gets_bentomls_504() -> None:
    traffic_timeout.install()

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(timeout=0.2))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/slow")

    r = asyncio.run(run())
    assert r.status_code == 504
    assert r.json() == {"error": "Not able to process the request in 0.2 seconds"}


def test_the_service_installs_it_in_every_worker() -> None:
    from guarded_serving import service  # noqa: F401 - importing the service module installs it

    assert traffic_timeout.installed()
    assert TimeoutMiddleware.__call__ is traffic_timeout._call
