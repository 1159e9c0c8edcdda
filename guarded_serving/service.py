"""The BentoML service: HTTP shapes and status codes, nothing else.

Serve the guarded model named by ``GUARDED_SERVING_CONFIG`` (default: the example in
``models/diamonds``)::

    GUARDED_SERVING_CONFIG=models/diamonds/serving.yaml bentoml serve guarded_serving.service:GuardedService
    guarded-serving serve models/diamonds/serving.yaml --port 3000 --workers 2

Routes (a Starlette app mounted into BentoML, so BentoML keeps ``/livez``, ``/readyz`` and
``/metrics``, its tracing middleware and its access log):

=====================  ==========================================================================
``POST /predict``      ``{"rows": [{feature: value}, ...]}`` -> predictions, routes, reasons, timing
``POST /feedback``     true outcomes for logged rows, checked against the profile (feedback.py)
``GET /profile``       summary of the loaded training profile
``GET /drift``         drift statistics over windows of live traffic, merged across workers
``GET /performance``   live performance of primary, fallback and the guarded service on outcomes
``GET /docs.json``     the OpenAPI document of these routes (openapi.py)
``GET /schema.json``   the same routes as BentoML's clients read them (``client.predict(rows=...)``)
=====================  ==========================================================================

When ``$GUARDED_SERVING_TOKEN`` (``auth.token_env``) is set, every route needs it as a bearer
token except ``/predict``, ``/livez``, ``/readyz`` and ``/metrics`` (each protectable in ``auth``).
Bodies are read within ``limits`` (payload.py). Every failure of every route, BentoML's 404/405
included, is a JSON object ``{"error": code, "message": ..., "problems": [...], "request_id": ...}``
with the status from ``STATUS_BY_CODE``; 5xx bodies say only what failed, the details are logged.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import bentoml
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import interpreter, request_deadline, traffic_timeout
from .bento import bundled_config
from .breaker import CircuitBreaker
from .codec import dumps_bytes
from .config import ServingConfig, load_config
from .errors import (
    BatchTooLargeError,
    GuardedServingError,
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    Problem,
    TooManyRequestsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from .feedback import REQUEST_ID, parse_feedback
from .idempotency import RecentRequests, conflict, fingerprint
from .openapi import bentoml_schema, openapi_document
from .payload import BodyLimits, parse_body
from .runtime import ServingRuntime, new_request_id
from .telemetry import ServiceMetrics, install_tracing, shutdown_tracing

log = logging.getLogger(__name__)

CONFIG_ENV = "GUARDED_SERVING_CONFIG"
WORKERS_ENV = "GUARDED_SERVING_WORKERS"
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "models" / "diamonds" / "serving.yaml"

#: One table from error code to HTTP status.
STATUS_BY_CODE = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "batch_too_large": 413,
    "unsupported_media_type": 415,
    "schema_violation": 422,
    "too_many_requests": 429,
    "internal": 500,
    "fallback_failed": 503,
    "store_unavailable": 503,
}
#: What a 5xx answer says. Its own message may name a store URL, a file path or an exception:
#: that goes to the log, never to the client.
PUBLIC_MESSAGE = {
    "internal": "internal error; the server's log has the details",
    "fallback_failed": "the fallback model failed for rows that needed it, so no prediction can be "
                       "given for them; the server's log has the details",
    "store_unavailable": "the store is unavailable; monitoring is degraded, predictions are not "
                         "affected; the server's log has the details",
}
#: Status counted for a client that went away before its request was read (nginx's convention).
CLIENT_CLOSED = 499
#: Paths of the Starlette app below; every other path is BentoML's.
OWN_PATHS = frozenset({"/predict", "/feedback", "/profile", "/drift", "/performance",
                       "/admin/promote", "/admin/rollback"})
HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
#: Documents the service publishes in place of BentoML's (which know nothing of our routes).
OPENAPI_PATHS = frozenset({"/docs.json", "/openapi.json"})
SCHEMA_PATH = "/schema.json"
#: Clients whose token failures are remembered at once (oldest forgotten first).
MAX_TRACKED_CLIENTS = 10_000


def config_path() -> Path:
    """The serving config to load: ``$GUARDED_SERVING_CONFIG``, the bento's own, or the example."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else (bundled_config() or EXAMPLE_CONFIG)


CONFIG: ServingConfig = load_config(config_path())
LIMITS = BodyLimits(max_string_length=CONFIG.limits.max_string_length, max_depth=CONFIG.limits.max_json_depth)
_runtime: ServingRuntime | None = None


def runtime() -> ServingRuntime:
    if _runtime is None:  # pragma: no cover - routes are served only after the service starts
        raise RuntimeError("the guarded service has not started")
    return _runtime


# -- HTTP -------------------------------------------------------------------------------------

def error_response(err: GuardedServingError, request_id: str | None = None) -> Response:
    """The JSON error body of ``err`` with its status. 5xx bodies carry a fixed message; the
    error's own (which may name a store URL or a path) is logged."""
    status = STATUS_BY_CODE.get(err.code, 500)
    if status >= 500:
        if err.code not in PUBLIC_MESSAGE:
            err = InternalError(err.message)
        log.warning("answering %d %s%s: %s", status, err.code,
                    f" to request {request_id}" if request_id else "", err.message)
        body: dict[str, Any] = {"error": err.code, "message": PUBLIC_MESSAGE[err.code]}
    else:
        body = err.to_dict()
    if request_id:
        body["request_id"] = request_id
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(err, TooManyRequestsError):
        headers["Retry-After"] = str(err.retry_after)
    return _json(body, status, request_id, headers)


def _json(body: Any, status: int = 200, request_id: str | None = None,
          headers: dict[str, str] | None = None) -> Response:
    data = dumps_bytes(body)
    headers = {**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})}
    return Response(data, status_code=status, media_type="application/json", headers=headers)


async def _read_json(request: Request, max_rows: int | None = None) -> Any:
    """The JSON body of ``request`` within the configured limits (see ``payload.parse_body``)."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(f"send the body as application/json, not {media or 'nothing'!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaTypeError(f"send the body uncompressed, not {encoding!r}")
    limit = CONFIG.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= limit:
        raw = await request.body()
    elif length is not None and length.isdigit():
        raise _too_large(f"{int(length)} bytes", limit)
    else:  # chunked: count as it comes
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(f"more than {limit} bytes", limit)
            parts.append(chunk)
        raw = b"".join(parts)
    return parse_body(raw, LIMITS, max_rows)


def _too_large(size: str, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the body has {size}; this service takes at most {limit} "
                                "(limits.max_body_bytes)")


def _client_request_id(request: Request) -> str | None:
    given = request.headers.get("x-request-id")
    return given if given and REQUEST_ID.match(given) else None


def _rows(body: Any, max_rows: int) -> tuple[list[dict[str, Any]], str]:
    if not isinstance(body, dict) or "rows" not in body:
        raise PayloadError('the body must be a JSON object {"rows": [{feature: value, ...}, ...]}')
    rows = body["rows"]
    if not isinstance(rows, list):
        raise PayloadError(f'"rows" must be a list of objects, got {type(rows).__name__}')
    if not rows:
        raise PayloadError('"rows" is empty; send at least one row')
    if len(rows) > max_rows:
        raise BatchTooLargeError(f"{len(rows)} rows is more than this service's maximum of {max_rows} "
                                 "(max_rows in the serving config); split the batch")
    bad = [Problem(problem="row is not a JSON object", row=i, got=type(r).__name__)
           for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise PayloadError(f"{len(bad)} row(s) are not JSON objects", bad)
    on_reject = body.get("on_reject", "raise")
    if on_reject not in ("raise", "mark"):
        raise PayloadError('"on_reject" must be "raise" (422 for the batch) or "mark" (answer the other rows)')
    return rows, on_reject


def _endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of a route as the JSON error body: ours with their status, a client that
    went away as 499 (nobody reads it; not a server error), anything else a logged 500."""

    @functools.wraps(fn)
    async def route(request: Request) -> Response:
        try:
            return await fn(request)
        except GuardedServingError as e:
            return error_response(e)
        except ClientDisconnect:
            return _client_gone(request)
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.url.path)
            return error_response(InternalError("unexpected error"))

    return route


def _client_gone(request: Request, request_id: str | None = None) -> Response:
    log.info("client %s went away before sending all of %s %s%s", _client(request.scope),
             request.method, request.url.path, f" (request {request_id})" if request_id else "")
    return Response(status_code=CLIENT_CLOSED)


async def predict(request: Request) -> Response:
    rt = runtime()
    given = _client_request_id(request)
    rid = given or new_request_id()
    status = 200
    fp: int | None = None  # set once this request holds its (client-named) id
    try:
        rows, on_reject = _rows(await _read_json(request, rt.config.max_rows), rt.config.max_rows)
        trace.get_current_span().set_attribute("guarded_serving.request.id", rid)
        if given is not None:
            again = await _answer_again(rt, rid, fingerprint(rows, on_reject), rows, on_reject)
            if isinstance(again, Response):
                return again
            fp = again
            rt.recorder.expect_fingerprint(rid, fp)
        result = await rt.apredict(rows, request_id=rid, on_reject=on_reject)
        response = _json(_predict_body(rid, result, on_reject), request_id=rid)
        if fp is not None:
            RECENT.answered(rid, fp, bytes(response.body))
            fp = None
        return response
    except GuardedServingError as e:
        status = STATUS_BY_CODE.get(e.code, 500)
        return error_response(e, rid)
    except ClientDisconnect:
        status = CLIENT_CLOSED
        return _client_gone(request, rid)
    except Exception:
        status = 500
        log.exception("unexpected error serving request %s", rid)
        return error_response(InternalError("unexpected error"), rid)
    finally:
        if fp is not None:  # held the id but not answered: a retry may try again
            RECENT.forget(rid)
            rt.recorder.forget_fingerprint(rid)
        if rt.metrics is not None:
            rt.metrics.request(status)


def _predict_body(rid: str, result: Any, on_reject: str) -> dict[str, Any]:
    body = {"request_id": rid, **result.to_dict()}
    if on_reject == "mark" and result.verdicts is not None and result.verdicts.problems:
        body["problems"] = [p.to_dict() for p in result.verdicts.problems]
    return body


#: Client-named requests this worker answered lately (``idempotency``): retries and reuses of
#: their ids are recognised without a store call.
RECENT = RecentRequests()
#: How long a client-named request waits for the store to say whether another worker already
#: used its id. Past that, or while such lookups keep failing (a breaker skips them for a while),
#: the request is served as new: the store never slows /predict by more than this.
ID_LOOKUP_S = 0.25
_ID_LOOKUPS = CircuitBreaker(failures=3, open_seconds=10.0)
_last_lookup_warning = 0.0


async def _answer_again(rt: ServingRuntime, rid: str, fp: int, rows: list[dict[str, Any]],
                        on_reject: str) -> Response | int:
    """For a client-named request: the answer of a retry (the same rows under a known id), or
    ``fp`` when the request is new (this worker then holds its id). ConflictError (409) when
    the id was used for other rows, here or, as the store says, on another worker."""
    known = RECENT.check(rid, fp)
    if known is not None and known.body is not None:
        return Response(known.body, media_type="application/json", headers={"X-Request-ID": rid})
    if known is None:
        RECENT.begin(rid, fp)  # before any await: a concurrent reuse on this worker sees it
        try:
            logged, stored = await _stored_fingerprint(rt, rid)
        except BaseException:
            RECENT.forget(rid)
            raise
        if logged and stored is not None and stored != fp:
            RECENT.forget(rid)
            raise conflict(rid)
        if not logged:
            return fp
    # A retry of a request answered on another worker (or still being answered here): answered
    # again by the models, neither logged nor counted into drift a second time.
    result = await rt.guard.apredict(rows, on_reject=on_reject, request_id=rid)
    response = _json(_predict_body(rid, result, on_reject), request_id=rid)
    RECENT.answered(rid, fp, bytes(response.body))
    return response


async def _stored_fingerprint(rt: ServingRuntime, rid: str) -> tuple[bool, int | None]:
    """(logged, fingerprint) of ``rid`` from the store, or (False, None) when the store does not
    answer within ``ID_LOOKUP_S`` (logged): the request is then served as a new one."""
    global _last_lookup_warning
    if not _ID_LOOKUPS.allow():
        return False, None
    try:
        found = await rt.monitoring.run(lambda: rt.store().request_fingerprint(rid), timeout=ID_LOOKUP_S)
    except Exception as e:  # slow, busy or failing: accept, never slow /predict down further
        _ID_LOOKUPS.record(False, "slow")
        if time.monotonic() - _last_lookup_warning > 30.0:
            _last_lookup_warning = time.monotonic()
            log.warning("could not check whether request id %r was used before (%s); serving it as "
                        "new (a reuse on another worker is then not detected)", rid, type(e).__name__)
        return False, None
    _ID_LOOKUPS.record(True)
    return found


@_endpoint
async def feedback(request: Request) -> Response:
    rt = runtime()
    parsed = parse_feedback(await _read_json(request), max_rows=rt.config.max_rows)
    summary = await rt.afeedback(parsed.as_tuples(), parsed.overwrite)
    return _json({"received": len(parsed.items), **summary})


@_endpoint
async def profile(request: Request) -> Response:
    rt = runtime()
    p = rt.profile
    body = {
        "model": rt.config.name,
        "task": p.task,
        "target": p.target,
        "n_rows": p.n_rows,
        "created_at": p.created_at,
        "content_hash": p.content_hash,
        "primary": {"name": rt.guard.primary.name, "version": rt.guard.primary.version},
        "fallback": {"name": rt.guard.fallback.name, "version": rt.guard.fallback.version},
        "latency_budget_ms": rt.config.latency_budget_ms,
        "max_rows": rt.config.max_rows,
        "policy": rt.config.policy.to_dict(),
        "baseline": p.baseline,
        "features": [
            {k: v for k, v in f.to_dict().items() if k not in ("bin_edges", "bin_counts")}
            for f in p.features
        ],
    }
    return _json(body)


@_endpoint
async def drift(request: Request) -> Response:
    return Response(await runtime().adrift_json(), media_type="application/json")


@_endpoint
async def performance(request: Request) -> Response:
    since = _number_param(request, "since")
    window = _number_param(request, "window_rows")
    if window is not None and (window < 1 or window != int(window) or window > 10**9):
        raise PayloadError(f"query parameter window_rows must be a whole number from 1 to 10^9, got {window:g}")
    rows = int(window) if window is not None else None
    return _json(await runtime().aperformance(since, rows))


async def _switch(request: Request, action: str) -> Response:
    """Record a promotion or rollback (promotion.py). Only with a token configured: a service
    without one would let anyone replace its model."""
    from .promotion import Action

    rt = runtime()
    if not os.environ.get(rt.config.auth.token_env):
        raise UnauthorizedError(f"/admin routes need a token: set ${rt.config.auth.token_env} on the server")
    raw = await request.body()
    body = await _read_json(request) if raw.strip() else {}
    if not isinstance(body, dict) or not all(isinstance(body.get(k, ""), str) for k in ("actor", "reason")):
        raise PayloadError('expected an object such as {"reason": "replay better", "actor": "ci"}')
    actor = body.get("actor") or f"http:{_client(request.scope)}"
    return _json(await rt.aswitch(Action(action), actor, body.get("reason", "")))


@_endpoint
async def admin_promote(request: Request) -> Response:
    return await _switch(request, "promote")


@_endpoint
async def admin_rollback(request: Request) -> Response:
    return await _switch(request, "rollback")


def _switch_metrics(model: str) -> Callable[[Any, bool, str], None]:
    """guarded_serving_model_switches_total{action, outcome} and guarded_serving_primary_info
    {version} (1 in each worker for the version it serves; summed over live workers)."""
    from prometheus_client import Counter, Gauge

    switches = Counter("guarded_serving_model_switches", "Model switches this worker followed, by "
                       "action (promote, rollback) and outcome (loaded, failed).", ["model", "action", "outcome"])
    info = Gauge("guarded_serving_primary_info", "1 for the primary version a worker serves.",
                 ["model", "version"], multiprocess_mode="livesum")
    serving = {"version": runtime().guard.version}
    info.labels(model, serving["version"]).set(1)
    for action in ("promote", "rollback"):  # at zero from the start, so rate() has a series
        for outcome in ("loaded", "failed"):
            switches.labels(model, action, outcome)

    def on_switch(ev: Any, loaded: bool, version: str) -> None:
        switches.labels(model, str(ev.action), "loaded" if loaded else "failed").inc()
        if loaded and version != serving["version"]:
            info.labels(model, serving["version"]).set(0)
            info.labels(model, version).set(1)
            serving["version"] = version

    return on_switch


def _number_param(request: Request, name: str) -> float | None:
    v = request.query_params.get(name)
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if x != x or x in (float("inf"), float("-inf")):
        shown = v.encode("utf-8", "backslashreplace").decode()[:40]
        raise PayloadError(f"query parameter {name} must be a finite number, got {shown!r}")
    return x


async def _http_error(request: Request, exc: Exception) -> Response:
    code = exc.status_code if isinstance(exc, HTTPException) else 500
    return _status_error(code, request.method, request.url.path)


def _status_error(status: int, method: str, path: str) -> Response:
    shown = path.encode("utf-8", "backslashreplace").decode()[:200]
    if status == 404:
        return error_response(NotFoundError(f"no route {shown}; see /docs.json for this service's routes"))
    if status == 405:
        return error_response(MethodNotAllowedError(f"{method} is not allowed on {shown}"))
    if status >= 500:
        return error_response(InternalError(f"{method} {shown} answered {status}"))
    return error_response(PayloadError(f"the request cannot be served ({status})"))


app = Starlette(
    routes=[
        Route("/predict", predict, methods=["POST"]),
        Route("/feedback", feedback, methods=["POST"]),
        Route("/profile", profile, methods=["GET"]),
        Route("/drift", drift, methods=["GET"]),
        Route("/performance", performance, methods=["GET"]),
        Route("/admin/promote", admin_promote, methods=["POST"]),
        Route("/admin/rollback", admin_rollback, methods=["POST"]),
    ],
    exception_handlers={404: _http_error, 405: _http_error},
)


# -- the edge of the whole server (BentoML's routes too) --------------------------------------

def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class TokenGate:
    """The bearer token check (constant time), with a memory of each client's recent wrong
    tokens: past ``max_failures`` in ``window_s`` a client (by address) gets 429 with Retry-After
    on every protected route until the oldest ages out. Per worker process.

    >>> gate = TokenGate("t0k", max_failures=2, window_s=60)
    >>> [type(gate.check("10.0.0.1", h)).__name__ for h in ("Bearer x", "Bearer y", "Bearer t0k")]
    ['UnauthorizedError', 'UnauthorizedError', 'TooManyRequestsError']
    >>> gate.check("10.0.0.2", "Bearer t0k") is None
    True
    """

    def __init__(self, token: str, max_failures: int, window_s: float,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self._token = token.encode()
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._on_failure = on_failure

    def check(self, client: str, authorization: str | None) -> GuardedServingError | None:
        now = time.monotonic()
        with self._lock:
            seen = self._failures.get(client)
            if seen is not None:
                while seen and seen[0] <= now - self.window_s:
                    seen.popleft()
                if len(seen) >= self.max_failures:
                    self._count("rate_limited")
                    wait = max(1, int(seen[0] + self.window_s - now + 0.999))
                    return TooManyRequestsError(f"too many failed token checks from this client; "
                                                f"retry in {wait} s", retry_after=wait)
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            # Not a guess: counted, but it does not bring a client closer to the limit.
            self._count("missing")
            return UnauthorizedError("this route needs an 'Authorization: Bearer <token>' header")
        if hmac.compare_digest(value.strip().encode(), self._token):
            return None
        with self._lock:
            seen = self._failures.pop(client, None) or deque()
            seen.append(now)
            self._failures[client] = seen  # most recent last
            while len(self._failures) > MAX_TRACKED_CLIENTS:
                self._failures.popitem(last=False)
        self._count("invalid")
        return UnauthorizedError("the bearer token is not valid")

    def _count(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)


def public_paths(config: ServingConfig) -> frozenset[str]:
    """Paths served without the token when one is set."""
    auth = config.auth
    paths = set()
    if not auth.protect_predict:
        paths.add("/predict")
    if not auth.protect_health:
        paths |= HEALTH_PATHS
    if not auth.protect_metrics:
        paths.add("/metrics")
    return frozenset(paths)


class EdgeMiddleware:
    """In front of every route, BentoML's included: the token check, our OpenAPI document and
    BentoML client schema in place of BentoML's, and JSON errors for BentoML's own 404/405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        token = os.environ.get(CONFIG.auth.token_env)
        self.gate = (TokenGate(token, CONFIG.auth.max_failures, CONFIG.auth.failure_window_seconds,
                               _count_auth_failure) if token else None)
        self.public = public_paths(CONFIG)
        self._docs: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.gate is not None and path not in self.public:
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            err = self.gate.check(_client(scope), auth)
            if err is not None:
                await error_response(err)(scope, receive, send)
                return
        if path in OWN_PATHS:
            await self.app(scope, receive, send)
        elif path == SCHEMA_PATH or path in OPENAPI_PATHS:
            if scope["method"] not in ("GET", "HEAD"):
                await _status_error(405, scope["method"], path)(scope, receive, send)
            else:
                try:
                    doc = Response(self._document(path), media_type="application/json")
                except Exception:
                    log.exception("could not build %s", path)
                    doc = error_response(InternalError("document failed"))
                await doc(scope, receive, send)
        else:
            await self.app(scope, receive, _json_errors(scope, send))

    def _document(self, path: str) -> bytes:
        key = "schema" if path == SCHEMA_PATH else "openapi"
        if key not in self._docs:
            rt = runtime()
            features = [(f.name, f.kind) for f in rt.profile.features]
            doc = (bentoml_schema(CONFIG.name, rt.profile.task, features, CONFIG.max_rows) if key == "schema"
                   else openapi_document(CONFIG.name, rt.profile.task, features, CONFIG.max_rows,
                                         version=rt.profile.content_hash[:19]))
            self._docs[key] = json.dumps(doc).encode()
        return self._docs[key]


def _json_errors(scope: Scope, send: Send) -> Send:
    """``send`` that turns BentoML's plain-text errors (404, 405, 500 ...) into our JSON error body."""
    replaced = False

    async def wrapped(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] >= 400:
            ctype = next((v for k, v in message.get("headers", []) if k == b"content-type"), b"")
            if not ctype.startswith(b"application/json"):
                replaced = True
                resp = _status_error(message["status"], scope["method"], scope["path"])
                await send({"type": "http.response.start", "status": resp.status_code,
                            "headers": resp.raw_headers})
                await send({"type": "http.response.body", "body": resp.body})
                return
        if replaced:
            return
        await send(message)

    return wrapped


_auth_failures: Any = None


def _count_auth_failure(reason: str) -> None:
    if _auth_failures is not None:
        _auth_failures.labels(CONFIG.name, reason).inc()


def _bentoml_tracing() -> dict[str, Any]:
    # Only when the serving config asks for traces; otherwise BentoML's own settings apply.
    return {"sample_rate": CONFIG.tracing.sample_rate} if CONFIG.tracing.endpoint else {}


def _model_ref(role: str) -> Any:
    spec = getattr(CONFIG, role)
    # A BentoModel attribute makes `bentoml build` pack the model from the model store.
    return bentoml.models.BentoModel(spec.bentoml_tag) if spec.bentoml_tag else None


@bentoml.service(
    workers=int(os.environ.get(WORKERS_ENV, "1")),
    traffic={"timeout": 60},
    tracing=_bentoml_tracing(),
)
@bentoml.asgi_app(app, path="/")
class GuardedService:
    """The guarded model of ``$GUARDED_SERVING_CONFIG`` over HTTP, one runtime per worker."""

    primary_model = _model_ref("primary")
    fallback_model = _model_ref("fallback")

    def __init__(self) -> None:
        global _runtime, _auth_failures
        _watch_supervisor()
        provider = None
        try:
            from bentoml._internal.configuration.containers import BentoMLContainer

            provider = BentoMLContainer.tracer_provider.get()
        except Exception as e:  # pragma: no cover - BentoML internals moved
            log.warning("could not reuse BentoML's tracer provider, building one: %s", e)
        self._provider = install_tracing(CONFIG.tracing, provider, CONFIG.name)
        try:
            _runtime = ServingRuntime(CONFIG, metrics=ServiceMetrics(CONFIG.name),
                                      recorder_process=CONFIG.prediction_log.recorder_process)
        except GuardedServingError as e:  # a model, profile or config that cannot load
            _stop_supervisor(e)
            raise
        from prometheus_client import Counter

        _auth_failures = Counter("guarded_serving_auth_failures", "Requests refused by the token "
                                 "check, by reason: missing, invalid, rate_limited.", ["model", "reason"])
        _runtime.on_switch = _switch_metrics(CONFIG.name)
        log.info("serving %s (primary %s, fallback %s)", CONFIG.name, _runtime.guard.primary.name,
                 _runtime.guard.fallback.name)
        interpreter.tune()  # freeze the startup heap; GC thresholds, GIL switch interval

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if _runtime is not None:
            _runtime.close()
        shutdown_tracing(self._provider)


GuardedService.add_asgi_middleware(EdgeMiddleware)  # type: ignore[attr-defined]  # a bentoml.Service now
# BentoML configures its workers' uvicorn itself; this bounds how long a request head may take.
request_deadline.install(CONFIG.limits.header_timeout_seconds)
# BentoML's traffic.timeout keeps each request alive until its timer fires; this cancels it.
traffic_timeout.install()

#: How often a worker checks that its supervisor (``bentoml serve``) is still alive.
SUPERVISOR_POLL_S = 0.5
#: How long a worker orphaned by its supervisor may take to shut down cleanly before it exits.
ORPHAN_GRACE_S = 10.0


def _watch_supervisor() -> None:
    """End this worker when its supervisor dies. BentoML starts each worker in its own session,
    so a SIGKILL of ``bentoml serve`` (or of its process group) would leave the workers running,
    reparented, holding the port. The worker first gets SIGTERM (a clean shutdown flushes the
    prediction log), then is made to exit."""
    import signal

    parent = os.getppid()

    # A server killed while this worker was still starting: already reparented (to init).
    orphan = not _is_server(parent)

    def watch() -> None:
        while not orphan and os.getppid() == parent:
            time.sleep(SUPERVISOR_POLL_S)
        log.warning("the server process %d is gone; stopping this worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="guarded-supervisor-watch", daemon=True).start()


def _is_server(pid: int) -> bool:
    """Whether ``pid`` is a ``bentoml serve`` process (PID 1 in a container; init or a
    subreaper when this worker's server is gone). True when that cannot be told."""
    import psutil

    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return True
    return "bentoml" in cmd or "guarded_serving" in cmd or "guarded-serving" in cmd


def _stop_supervisor(err: GuardedServingError) -> None:
    """Stop ``bentoml serve`` when a worker cannot start for a reason that a restart cannot cure
    (BentoML would restart the worker forever). Only a BentoML server parent is stopped."""
    import signal

    import psutil

    log.error("cannot serve %s: %s; stopping the server", CONFIG.name, err.message)
    try:
        parent = psutil.Process(os.getppid())
        cmd = " ".join(parent.cmdline())
    except psutil.Error:
        return
    if "bentoml" in cmd and " serve" in cmd:
        os.kill(parent.pid, signal.SIGTERM)


def serve(config: str | Path | None, host: str = "127.0.0.1", port: int = 3000, workers: int = 1) -> NoReturn:
    """Run the service through BentoML's own server (``bentoml serve``) for ``config``.

    The process becomes ``bentoml serve`` (exec, not a child): SIGTERM from a container runtime or
    a process manager reaches BentoML itself, which drains and stops its workers, and no server
    is left behind holding the port."""
    from .guard import GuardedModel

    path = Path(config).resolve() if config else EXAMPLE_CONFIG
    # Fail here, with the reason, rather than in every worker: BentoML restarts a worker that
    # fails to start, forever.
    GuardedModel.from_config(load_config(path)).close()
    env = {**os.environ, CONFIG_ENV: str(path), WORKERS_ENV: str(workers)}
    cmd = [sys.executable, "-m", "bentoml", "serve", "guarded_serving.service:GuardedService",
           "--host", host, "--port", str(port)]
    log.info("serving %s on http://%s:%s with %d worker(s)", path, host, port, workers)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, cmd, env)
