"""The BentoML service: HTTP shapes and status codes, nothing else.

Serve the guarded model named by ``GUARDED_SERVING_CONFIG`` (default: the example in
``models/diamonds``)::

    GUARDED_SERVING_CONFIG=models/diamonds/serving.yaml bentoml serve guarded_serving.service:GuardedService
    guarded-serving serve models/diamonds/serving.yaml --port 3000 --workers 2

Routes (a Starlette app mounted into BentoML, so BentoML keeps ``/livez``, ``/readyz`` and
``/metrics``, its tracing middleware and its access log):

=====================  ==========================================================================
``POST /predict``      ``{"rows": [{feature: value}, ...]}`` -> predictions, routes, reasons, timing
``POST /feedback``     true outcomes for logged rows (bearer token when GUARDED_SERVING_TOKEN is set)
``GET /profile``       summary of the loaded training profile
``GET /drift``         drift statistics over windows of live traffic, merged across workers
``GET /performance``   live performance of primary, fallback and the guarded service on outcomes
=====================  ==========================================================================

Errors are JSON objects ``{"error": code, "message": ..., "problems": [...], "request_id": ...}``
with the status from ``STATUS_BY_CODE``.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import bentoml
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .config import ServingConfig, load_config
from .errors import (
    BatchTooLargeError,
    GuardedServingError,
    PayloadError,
    Problem,
    UnauthorizedError,
)
from .runtime import ServingRuntime, new_request_id, parse_feedback
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
    "conflict": 409,
    "batch_too_large": 413,
    "schema_violation": 422,
    "fallback_failed": 503,
    "store_unavailable": 503,
}
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def config_path() -> Path:
    """The serving config to load: ``$GUARDED_SERVING_CONFIG`` or the example."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else EXAMPLE_CONFIG


CONFIG: ServingConfig = load_config(config_path())
_runtime: ServingRuntime | None = None


def runtime() -> ServingRuntime:
    if _runtime is None:  # pragma: no cover - routes are served only after the service starts
        raise RuntimeError("the guarded service has not started")
    return _runtime


# -- HTTP -------------------------------------------------------------------------------------

def error_response(err: GuardedServingError, request_id: str | None = None) -> Response:
    body = err.to_dict()
    if request_id:
        body["request_id"] = request_id
    status = STATUS_BY_CODE.get(err.code, 500)
    return _json(body, status, request_id, {"WWW-Authenticate": "Bearer"} if status == 401 else None)


def _json(body: Any, status: int = 200, request_id: str | None = None,
          headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, allow_nan=False, separators=(",", ":"), default=str).encode()
    headers = {**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})}
    return Response(data, status_code=status, media_type="application/json", headers=headers)


async def _read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise PayloadError("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"the request body is not valid JSON: {e}") from None


def _authorize(request: Request, rt: ServingRuntime) -> None:
    token = os.environ.get(rt.config.auth.token_env)
    if not token:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise UnauthorizedError("this endpoint needs an 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise UnauthorizedError("the bearer token is not valid")


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID_OK.match(given) else new_request_id()


def _rows(body: Any, max_rows: int) -> tuple[list[dict[str, Any]], str]:
    if not isinstance(body, dict) or "rows" not in body:
        raise PayloadError('the body must be a JSON object {"rows": [{feature: value, ...}, ...]}')
    rows = body["rows"]
    if not isinstance(rows, list):
        raise PayloadError(f'"rows" must be a list of objects, got {type(rows).__name__}')
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


async def predict(request: Request) -> Response:
    rt = runtime()
    rid = _request_id(request)
    status = 200
    try:
        if rt.config.auth.protect_predict:
            _authorize(request, rt)
        rows, on_reject = _rows(await _read_json(request), rt.config.max_rows)
        trace.get_current_span().set_attribute("guarded_serving.request.id", rid)
        result = await rt.apredict(rows, request_id=rid, on_reject=on_reject)
        body = {"request_id": rid, **result.to_dict()}
        if on_reject == "mark" and result.verdicts is not None and result.verdicts.problems:
            body["problems"] = [p.to_dict() for p in result.verdicts.problems]
        return _json(body, request_id=rid)
    except GuardedServingError as e:
        status = STATUS_BY_CODE.get(e.code, 500)
        return error_response(e, rid)
    except Exception as e:
        status = 500
        log.exception("unexpected error serving request %s", rid)
        return _json({"error": "internal", "message": f"{type(e).__name__}: {e}", "request_id": rid},
                     500, rid)
    finally:
        if rt.metrics is not None:
            rt.metrics.request(status)


async def feedback(request: Request) -> Response:
    rt = runtime()
    try:
        _authorize(request, rt)
        items, overwrite = parse_feedback(await _read_json(request))
        summary = await rt.afeedback(items, overwrite)
        return _json({"received": len(items), **summary})
    except GuardedServingError as e:
        return error_response(e)


async def profile(request: Request) -> Response:
    rt = runtime()
    p = rt.profile
    body = {
        "model": rt.config.name,
        "task": p.task,
        "target": p.target,
        "n_rows": p.n_rows,
        "created_at": p.created_at,
        "source": p.source,
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


async def drift(request: Request) -> Response:
    rt = runtime()
    try:
        return Response(await rt.adrift_json(), media_type="application/json")
    except GuardedServingError as e:
        return error_response(e)


async def performance(request: Request) -> Response:
    rt = runtime()
    try:
        since = _float_param(request, "since")
        window = _float_param(request, "window_rows")
        perf = await rt.aperformance(since, int(window) if window else None)
        return _json(perf)
    except GuardedServingError as e:
        return error_response(e)


def _float_param(request: Request, name: str) -> float | None:
    v = request.query_params.get(name)
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        raise PayloadError(f"query parameter {name} must be a number, got {v!r}") from None


app = Starlette(routes=[
    Route("/predict", predict, methods=["POST"]),
    Route("/feedback", feedback, methods=["POST"]),
    Route("/profile", profile, methods=["GET"]),
    Route("/drift", drift, methods=["GET"]),
    Route("/performance", performance, methods=["GET"]),
])


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
        global _runtime
        provider = None
        try:
            from bentoml._internal.configuration.containers import BentoMLContainer

            provider = BentoMLContainer.tracer_provider.get()
        except Exception as e:  # pragma: no cover - BentoML internals moved
            log.warning("could not reuse BentoML's tracer provider, building one: %s", e)
        self._provider = install_tracing(CONFIG.tracing, provider, CONFIG.name)
        _runtime = ServingRuntime(CONFIG, metrics=ServiceMetrics(CONFIG.name))
        log.info("serving %s (primary %s, fallback %s)", CONFIG.name, _runtime.guard.primary.name,
                 _runtime.guard.fallback.name)
        # Everything alive now (BentoML, pandas, the models: ~150k objects) lives as long as the
        # worker. Without this, each full garbage collection walks all of it, a pause of tens
        # of milliseconds that lands on whichever requests are in flight: the p99.
        gc.freeze()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if _runtime is not None:
            _runtime.close()
        shutdown_tracing(self._provider)


def serve(config: str | Path | None, host: str = "127.0.0.1", port: int = 3000, workers: int = 1) -> NoReturn:
    """Run the service through BentoML's own server (``bentoml serve``) for ``config``.

    The process becomes ``bentoml serve`` (exec, not a child): SIGTERM from a container runtime or
    a process manager reaches BentoML itself, which drains and stops its workers, and no server
    is left behind holding the port."""
    path = Path(config).resolve() if config else EXAMPLE_CONFIG
    load_config(path)  # fail here, with the key named, rather than in every worker
    env = {**os.environ, CONFIG_ENV: str(path), WORKERS_ENV: str(workers)}
    cmd = [sys.executable, "-m", "bentoml", "serve", "guarded_serving.service:GuardedService",
           "--host", host, "--port", str(port)]
    log.info("serving %s on http://%s:%s with %d worker(s)", path, host, port, workers)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, cmd, env)
