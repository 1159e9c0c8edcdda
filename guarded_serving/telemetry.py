"""Tracing and metrics for the service: OTLP export and Prometheus metrics.

This is the one module that touches the OpenTelemetry SDK and ``prometheus_client``; the guard
core only speaks the OTel API. Spans are exported by a ``BatchSpanProcessor`` (a bounded queue and
a background thread), so a slow or absent trace backend costs a request nothing: spans that do
not fit the queue are dropped, never waited for.

Metric names follow Prometheus conventions (base units, ``_total`` for counters)::

    guarded_serving_stage_duration_seconds{model,stage}        histogram (validate|primary|fallback|total)
    guarded_serving_requests_total{model,status}               counter (HTTP status code)
    guarded_serving_rows_total{model,route}                    counter (primary|fallback|rejected)
    guarded_serving_flags_total{model,reason,feature}          counter (a row flagged for a reason)
    guarded_serving_latency_budget_misses_total{model}         counter
    guarded_serving_primary_errors_total{model}                counter
    guarded_serving_prediction_log_dropped_rows_total{model,stage}  counter (stage: log | monitoring)
    guarded_serving_prediction_log_lost_rows_total{model}      counter (rows a dead worker had acknowledged, never stored)
    guarded_serving_drift_status{model,feature}                gauge (0 ok, 1 warn, 2 drift, -1 no verdict)
    guarded_serving_drift_psi{model,feature}                   gauge
    guarded_serving_drift_window_rows{model}                   gauge
    guarded_serving_retrain_recommended{model}                 gauge (0 or 1)
    guarded_serving_live_metric{model,role,route,metric}       gauge (live performance on outcomes)
    guarded_serving_estimated_metric{model,role,scope,metric}  gauge (estimate of the current drift window)
    guarded_serving_estimated_metric_band{model,role,scope,metric,bound}  gauge (bound: low|high)
    guarded_serving_estimated_rows{model,scope}                gauge (rows behind the estimate)

Metrics are created on first use inside the worker process, after BentoML has pointed
``PROMETHEUS_MULTIPROC_DIR`` at its shared directory, so ``/metrics`` adds up all workers.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .config import TracingConfig

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DRIFT_STATUS_VALUE = {"ok": 0.0, "warn": 1.0, "drift": 2.0, "insufficient_data": -1.0}

#: How long an export may take before the exporter gives up (seconds); it runs off the request path.
EXPORT_TIMEOUT_S = 5.0


def otlp_exporter(cfg: TracingConfig) -> Any:
    """An OTLP span exporter for ``cfg.endpoint`` over HTTP/protobuf or gRPC."""
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        endpoint = cfg.endpoint or ""
        insecure = endpoint.startswith("http://") or "://" not in endpoint
        return GrpcExporter(endpoint=endpoint, insecure=insecure, headers=cfg.headers or None,
                            timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=cfg.endpoint, headers=cfg.headers or None, timeout=EXPORT_TIMEOUT_S)


def install_tracing(cfg: TracingConfig, provider: TracerProvider | None, service_name: str) -> TracerProvider:
    """Make ``provider`` (BentoML's, so HTTP server spans and ours share one trace) the global
    tracer provider, adding an OTLP exporter when the serving config names an endpoint.

    Without a provider (the guard used outside BentoML), a new one is built.
    """
    if provider is None:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: cfg.service_name or service_name}))
    if cfg.endpoint:
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter(cfg), export_timeout_millis=EXPORT_TIMEOUT_S * 1e3))
        log.info("exporting spans over OTLP (%s) to %s", cfg.protocol, cfg.endpoint)
    # set_tracer_provider refuses to replace a provider; the service sets it once per process.
    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: Any, timeout_s: float = 5.0) -> None:
    """Flush the last spans; never raises (a dead backend must not hang a shutdown for long)."""
    try:
        provider.force_flush(int(timeout_s * 1e3))
    except Exception as e:  # pragma: no cover - best effort at exit
        log.warning("could not flush spans at shutdown: %s", e)


class ServiceMetrics:
    """Prometheus metrics of one guarded model, created in the worker that uses them."""

    def __init__(self, model: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.model = model
        self._children: dict[tuple[int, str], Any] = {}
        self.stage = Histogram("guarded_serving_stage_duration_seconds",
                               "Time spent per stage of a guarded prediction.",
                               ["model", "stage"], buckets=STAGE_BUCKETS)
        self.requests = Counter("guarded_serving_requests", "Prediction requests by HTTP status.",
                                ["model", "status"])
        self.rows = Counter("guarded_serving_rows", "Rows served, by route.", ["model", "route"])
        self.flags = Counter("guarded_serving_flags", "Rows flagged by the checks, by reason and feature.",
                             ["model", "reason", "feature"])
        self.budget_misses = Counter("guarded_serving_latency_budget_misses",
                                     "Primary calls that missed the latency budget.", ["model"])
        self.primary_errors = Counter("guarded_serving_primary_errors",
                                      "Primary calls that raised.", ["model"])
        self.log_dropped = Counter("guarded_serving_prediction_log_dropped_rows",
                                   "Rows not logged: stage=log when the store still failed after retries "
                                   "or a batch was still queued at shutdown; stage=monitoring when the "
                                   "recorder's queue was full, so drift counts missed them too.", ["model", "stage"])
        self.log_lost = Counter("guarded_serving_prediction_log_lost_rows",
                                "Rows a worker acknowledged and never stored nor counted as dropped, "
                                "because it died (SIGKILL, OOM kill); counted from its ledger by the "
                                "worker that starts next (ledger.py).", ["model"])
        self.log_rows = Counter("guarded_serving_prediction_log_rows",
                                "Rows the recorder handled: outcome=logged (committed to the log) or "
                                "outcome=sampled_out (left out by prediction_log.sample_rate).",
                                ["model", "outcome"])
        gauge_kw: dict[str, Any] = {"multiprocess_mode": "mostrecent"}
        self.drift_status = Gauge("guarded_serving_drift_status",
                                  "Drift status per feature: 0 ok, 1 warn, 2 drift, -1 no verdict.",
                                  ["model", "feature"], **gauge_kw)
        self.drift_psi = Gauge("guarded_serving_drift_psi", "Population stability index per feature.",
                               ["model", "feature"], **gauge_kw)
        self.drift_rows = Gauge("guarded_serving_drift_window_rows", "Rows in the current drift window.",
                                ["model"], **gauge_kw)
        self.retrain = Gauge("guarded_serving_retrain_recommended",
                             "1 when drift persisted over consecutive windows.", ["model"], **gauge_kw)
        self.live_metric = Gauge("guarded_serving_live_metric",
                                 "Live performance on rows with true outcomes.",
                                 ["model", "role", "route", "metric"], **gauge_kw)
        self.estimated = Gauge("guarded_serving_estimated_metric",
                               "Estimated performance (no outcomes needed) in the current drift "
                               "window; scope=all or flagged (rows outside the training support).",
                               ["model", "role", "scope", "metric"], **gauge_kw)
        self.estimated_band = Gauge("guarded_serving_estimated_metric_band",
                                    "Bounds of the 95% band of the estimate (bound=low|high).",
                                    ["model", "role", "scope", "metric", "bound"], **gauge_kw)
        self.estimated_rows = Gauge("guarded_serving_estimated_rows",
                                    "Rows behind the current window's estimate.", ["model", "scope"],
                                    **gauge_kw)

    def observe(self, result: Any) -> None:
        """Record one guarded prediction (a ``GuardedResult``)."""
        m = self.model
        for stage, ms in result.timing_ms.items():
            self._child(self.stage, stage).observe(ms / 1e3)
        for route, n in result.route_counts().items():
            if n:
                self._child(self.rows, route).inc(n)
        for reason, n in result.reason_counts.items():
            kind, _, feature = reason.partition(":")
            self.flags.labels(m, kind, feature).inc(n)
        if result.budget_missed:
            self.budget_misses.labels(m).inc()
        elif result.primary_error:
            self.primary_errors.labels(m).inc()

    def rejected(self, n: int) -> None:
        """Rows of a batch refused for schema violations (no GuardedResult to observe)."""
        self._child(self.rows, "rejected").inc(n)

    def request(self, status: int) -> None:
        self._child(self.requests, str(status)).inc()

    def _child(self, metric: Any, label: str) -> Any:
        # labels() costs a lock and a tuple per call; these few children are asked for on every request.
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.model, label)
        return child

    def logged(self, logged: int, sampled_out: int) -> None:
        """Rows the recorder stored in the prediction log, and rows it left out by sampling."""
        if logged:
            self._child(self.log_rows, "logged").inc(logged)
        if sampled_out:
            self._child(self.log_rows, "sampled_out").inc(sampled_out)

    def dropped(self, n: int, stage: str = "log") -> None:
        self._child(self.log_dropped, stage).inc(n)

    def lost(self, n: int) -> None:
        """Rows dead workers lost, as their ledgers tell (counted at startup)."""
        self.log_lost.labels(self.model).inc(n)

    def set_drift(self, view: dict[str, Any]) -> None:
        """Publish the drift gauges from a drift view (``drift.windows.drift_view``)."""
        cur = view.get("current") or {}
        self.drift_rows.labels(self.model).set(float((cur.get("window") or {}).get("rows") or 0))
        self.retrain.labels(self.model).set(1.0 if view.get("retrain_recommended") else 0.0)
        entries = list(cur.get("features") or [])
        if cur.get("prediction"):
            entries.append(cur["prediction"])
        for f in entries:
            status = f.get("status") or "insufficient_data"
            self.drift_status.labels(self.model, f["name"]).set(DRIFT_STATUS_VALUE.get(status, -1.0))
            if f.get("psi") is not None:
                self.drift_psi.labels(self.model, f["name"]).set(float(f["psi"]))

    def set_performance(self, gauges: list[tuple[str, dict[str, str], float]]) -> None:
        for _, labels, value in gauges:
            self.live_metric.labels(self.model, labels.get("model", ""), labels.get("route", ""),
                                    labels.get("metric", "")).set(value)

    def set_estimates(self, view: dict[str, Any]) -> None:
        """Publish the estimate gauges from an estimated view (``estimates.estimated_view``)."""
        from .estimates import estimate_gauges

        cur = view.get("current") or {}
        self.estimated_rows.labels(self.model, "all").set(float(cur.get("n") or 0))
        self.estimated_rows.labels(self.model, "flagged").set(float((cur.get("flagged") or {}).get("n") or 0))
        for labels, value, lo, hi in estimate_gauges(view):
            key = (self.model, labels["role"], labels["scope"], labels["metric"])
            self.estimated.labels(*key).set(value)
            for bound, v in (("low", lo), ("high", hi)):
                if v is not None:
                    self.estimated_band.labels(*key, bound).set(float(v))
