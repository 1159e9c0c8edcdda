"""GuardedModel: check a batch, route rows to the primary or the fallback, time every stage.

Spans go through the OpenTelemetry API only: they cost next to nothing until an application
installs a tracer provider (the service does).

>>> gm = GuardedModel.from_config(load_config("models/diamonds/serving.yaml"))  # doctest: +SKIP
>>> result = gm.predict(rows)  # doctest: +SKIP
>>> result.routes, result.reasons, result.timing_ms  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from .adapters import Model, Prediction, load_model
from .checks import LATENCY_BUDGET, OK, PRIMARY_ERROR, Verdicts, check_batch
from .config import ModelSpec, ServingConfig
from .errors import ConfigError, FallbackFailedError, SchemaError
from .policy import Policy
from .profile import Profile

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("guarded_serving")

PRIMARY, FALLBACK_ROUTE, REJECTED = "primary", "fallback", "rejected"


@dataclass
class GuardedResult:
    """Per-row predictions, routes and reasons of one batch, with per-stage timings (ms)."""

    n_rows: int
    predictions: np.ndarray
    routes: np.ndarray
    reasons: list[list[str]]
    timing_ms: dict[str, float]
    probabilities: np.ndarray | None = None
    classes: list[Any] | None = None
    primary_predictions: np.ndarray | None = None
    fallback_predictions: np.ndarray | None = None
    budget_missed: bool = False
    primary_error: str | None = None
    extra_columns: list[str] = field(default_factory=list)
    verdicts: Verdicts | None = None
    reason_counts: dict[str, int] = field(default_factory=dict)

    @property
    def features(self) -> pd.DataFrame | None:
        """The batch coerced to the profile's types, in profile column order."""
        return None if self.verdicts is None else self.verdicts.features

    def route_counts(self) -> dict[str, int]:
        return {r: int(np.count_nonzero(self.routes == r)) for r in (PRIMARY, FALLBACK_ROUTE, REJECTED)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready body (NaN becomes null)."""
        out: dict[str, Any] = {
            "predictions": _jsonable(self.predictions),
            "routes": self.routes.tolist(),
            "reasons": self.reasons,
            "timing_ms": {k: round(v, 4) for k, v in self.timing_ms.items()},
        }
        if self.probabilities is not None:
            out["probabilities"] = np.round(self.probabilities, 6).tolist()
            out["classes"] = list(self.classes or [])
        if self.extra_columns:
            out["extra_columns"] = self.extra_columns
        return out


def _jsonable(a: np.ndarray | None) -> list[Any]:
    if a is None:
        return []
    if a.dtype.kind == "f":
        return [None if np.isnan(x) else x for x in a.tolist()]
    return [x.item() if hasattr(x, "item") else x for x in a.tolist()]


class GuardedModel:
    """Primary + fallback + profile + policy.

    ``latency_budget_ms``: the primary runs in a worker thread and the request waits at most this
    long for it; rows of a late (or raising) primary call get the fallback's answer. A late call
    keeps running in the background, and at most ``max_primary_inflight`` may do so before the
    primary is skipped outright. ``shadow_fallback``: also run the fallback on rows the primary
    answered, so the two can be compared on the same rows. ``shadow_primary``: also run the
    primary on rows the checks sent to the fallback (its answers are recorded, never served), so
    live outcomes can show whether routing them away helped. Shadow calls never fail a request.
    """

    def __init__(self, primary: Model, fallback: Model, profile: Profile,
                 policy: Policy | None = None, latency_budget_ms: float | None = None,
                 name: str = "model", shadow_fallback: bool = False,
                 max_primary_inflight: int = 4, shadow_primary: bool = False) -> None:
        for role, m in (("primary", primary), ("fallback", fallback)):
            if m.task != profile.task:
                raise ConfigError(f"the {role} model's task is {m.task!r} but the profile's is {profile.task!r}")
        self.primary = primary
        self.fallback = fallback
        self.profile = profile
        self.policy = policy or Policy()
        self.latency_budget_ms = latency_budget_ms
        self.name = name
        self.shadow_fallback = shadow_fallback
        self.shadow_primary = shadow_primary
        self.max_primary_inflight = max_primary_inflight
        self._inflight = 0
        self._lock = threading.Lock()
        self._executor = (
            ThreadPoolExecutor(max_workers=max_primary_inflight + 1, thread_name_prefix="guarded-primary")
            if latency_budget_ms is not None
            else None
        )

    @classmethod
    def from_config(cls, config: ServingConfig, *, shadow_fallback: bool | None = None,
                    shadow_primary: bool | None = None) -> GuardedModel:
        """Load models and profile named by a serving config."""
        profile = Profile.load(config.profile)
        if profile.task != config.task:
            raise ConfigError(f"task: the config says {config.task!r} but the profile says {profile.task!r}")
        primary = _load(config.primary, config.task, "primary")
        fallback = _load(config.fallback, config.task, "fallback")
        if shadow_fallback is None:
            shadow_fallback = config.prediction_log.enabled and config.prediction_log.shadow_fallback
        if shadow_primary is None:
            shadow_primary = config.prediction_log.enabled and config.prediction_log.shadow_primary
        return cls(primary, fallback, profile, config.policy, config.latency_budget_ms,
                   config.name, shadow_fallback, shadow_primary=shadow_primary)

    # -- prediction --------------------------------------------------------------------------

    def predict(self, data: Any, *, on_reject: str = "raise", request_id: str | None = None) -> GuardedResult:
        """Check, route and predict a batch: a DataFrame, a list of row mappings or columns.

        Raises SchemaError when a row violates the schema (``on_reject="mark"`` instead routes
        such rows to "rejected" with no prediction), FallbackFailedError when the fallback fails
        for rows that needed it.
        """
        steps = self._steps(data, on_reject, request_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(self._run_primary(*call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def apredict(self, data: Any, *, on_reject: str = "raise", request_id: str | None = None) -> GuardedResult:
        """``predict`` for an event loop: checks and the fallback run inline (they are fast and
        bounded), the primary runs in a worker thread, awaited at most ``latency_budget_ms``.
        One thread hop per batch, like a plain synchronous BentoML API."""
        steps = self._steps(data, on_reject, request_id)
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._arun_primary(*call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _steps(self, data: Any, on_reject: str, request_id: str | None) -> Generator[
            tuple[Verdicts, np.ndarray], tuple[Prediction | None, str | None, bool], GuardedResult]:
        """The guarded prediction as a generator: it yields once to have the primary called (by
        the sync or the async driver) and returns the result."""
        t0 = time.perf_counter()
        with _child_span("guarded_serving.predict") as span:
            span.set_attribute("guarded_serving.model.name", self.name)
            if request_id:
                span.set_attribute("guarded_serving.request.id", request_id)
            with _child_span("guarded_serving.validate") as vspan:
                verdicts = check_batch(data, self.profile, self.policy)
                n = verdicts.n_rows
                vspan.set_attribute("guarded_serving.rows", n)
                reason_counts = verdicts.reason_counts()
                if reason_counts:
                    vspan.set_attribute("guarded_serving.reasons", sorted(reason_counts))
            t_validate = time.perf_counter()
            span.set_attribute("guarded_serving.rows", n)
            status = verdicts.status
            if verdicts.problems and on_reject == "raise":
                rejected = int(verdicts.rejected.sum())
                span.set_attribute("guarded_serving.rows.rejected", rejected)
                span.set_status(Status(StatusCode.ERROR, "schema_violation"))
                span.set_attribute("error.type", "schema_violation")
                raise SchemaError(
                    f"{rejected} of {n} row(s) violate the schema" if rejected < n
                    else "the batch violates the schema",
                    verdicts.problems,
                )
            reasons = verdicts.reasons()
            routes = np.full(n, FALLBACK_ROUTE, dtype=object)
            routes[status == OK] = PRIMARY
            routes[verdicts.rejected] = REJECTED

            # Primary on the rows that passed.
            primary_idx = np.flatnonzero(status == OK)
            primary_pred, err, missed = None, None, False
            t_primary_start = time.perf_counter()
            if primary_idx.size:
                primary_pred, err, missed = yield verdicts, primary_idx
                if primary_pred is None:
                    code = LATENCY_BUDGET if missed else PRIMARY_ERROR
                    routes[primary_idx] = FALLBACK_ROUTE
                    for i in primary_idx.tolist():
                        reasons[i].append(code)
                    reason_counts[code] = int(primary_idx.size)
            t_primary = time.perf_counter()

            # Fallback on flagged rows and rows the primary could not answer (or all, in shadow).
            need = np.flatnonzero(routes == FALLBACK_ROUTE)
            fb_idx = np.flatnonzero(routes != REJECTED) if self.shadow_fallback else need
            fallback_pred = None
            if fb_idx.size:
                with _child_span("guarded_serving.fallback") as fspan:
                    fspan.set_attribute("guarded_serving.model.name", self.fallback.name)
                    fspan.set_attribute("guarded_serving.model.version", str(self.fallback.version))
                    fspan.set_attribute("guarded_serving.rows", int(need.size))
                    fspan.set_attribute("guarded_serving.rows.shadow", int(fb_idx.size - need.size))
                    try:
                        fallback_pred = _predict(self.fallback, verdicts, fb_idx)
                        _check_length(fallback_pred, fb_idx.size, "fallback")
                    except Exception as e:
                        fspan.record_exception(e)
                        fspan.set_status(Status(StatusCode.ERROR, type(e).__name__))
                        fspan.set_attribute("error.type", type(e).__name__)
                        if need.size:
                            span.set_status(Status(StatusCode.ERROR, "fallback_failed"))
                            span.set_attribute("error.type", "fallback_failed")
                            raise FallbackFailedError(
                                f"the fallback model failed for {need.size} row(s) that needed it: "
                                f"{type(e).__name__}: {e}"
                            ) from e
                        log.warning("shadow fallback failed: %s", e)
                        fallback_pred = None
            t_fallback = time.perf_counter()

            shadow_idx = np.flatnonzero((routes == FALLBACK_ROUTE) & (status != OK))
            shadow_pred = self._shadow_primary(verdicts, shadow_idx) if self.shadow_primary and shadow_idx.size else None

            result = self._assemble(n, routes, reasons, primary_idx, primary_pred, fb_idx, fallback_pred)
            if shadow_pred is not None and result.primary_predictions is not None:
                result.primary_predictions[shadow_idx] = shadow_pred.labels
            result.timing_ms = {
                "validate": (t_validate - t0) * 1e3,
                "primary": (t_primary - t_primary_start) * 1e3,
                "fallback": (t_fallback - t_primary) * 1e3,
                "total": (time.perf_counter() - t0) * 1e3,
            }
            result.budget_missed = missed
            result.primary_error = err
            result.extra_columns = verdicts.extra_columns
            result.verdicts = verdicts
            result.reason_counts = reason_counts
            counts = result.route_counts()
            span.set_attribute("guarded_serving.rows.primary", counts.get(PRIMARY, 0))
            span.set_attribute("guarded_serving.rows.fallback", counts.get(FALLBACK_ROUTE, 0))
            span.set_attribute("guarded_serving.rows.rejected", counts.get(REJECTED, 0))
            if reason_counts:
                span.set_attribute("guarded_serving.reasons", sorted(reason_counts))
            if missed:
                span.set_attribute("guarded_serving.latency_budget_missed", True)
            if self.policy.record_feature_values and n <= 100:
                span.set_attribute("guarded_serving.features", verdicts.features.to_json(orient="records"))
            return result

    def _run_primary(self, verdicts: Verdicts, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        """(prediction or None, error text, budget missed)."""
        with self._primary_span(idx) as pspan:
            try:
                if self._executor is None:
                    return self._checked(_predict(self.primary, verdicts, idx), idx)
                pred = self._predict_within_budget(verdicts, idx)
                return self._missed(pspan) if pred is None else self._checked(pred, idx)
            except Exception as e:
                return self._failed(pspan, e, idx)

    async def _arun_primary(self, verdicts: Verdicts, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        with self._primary_span(idx) as pspan:
            try:
                if self.latency_budget_ms is None:
                    pred = await anyio.to_thread.run_sync(_predict, self.primary, verdicts, idx)
                else:
                    with self._lock:
                        if self._inflight >= self.max_primary_inflight:
                            return self._missed(pspan)
                        self._inflight += 1
                    with anyio.move_on_after(self.latency_budget_ms / 1e3):
                        # Abandoned on timeout: the call finishes in its thread, nobody waits.
                        return self._checked(await anyio.to_thread.run_sync(
                            self._predict_and_release, verdicts, idx, abandon_on_cancel=True), idx)
                    return self._missed(pspan)
                return self._checked(pred, idx)
            except Exception as e:
                return self._failed(pspan, e, idx)

    @contextmanager
    def _primary_span(self, idx: np.ndarray) -> Iterator[Any]:
        with _child_span("guarded_serving.primary") as pspan:
            pspan.set_attribute("guarded_serving.model.name", self.primary.name)
            pspan.set_attribute("guarded_serving.model.version", str(self.primary.version))
            pspan.set_attribute("guarded_serving.rows", int(idx.size))
            yield pspan

    def _predict_and_release(self, verdicts: Verdicts, idx: np.ndarray) -> Prediction:
        try:
            return _predict(self.primary, verdicts, idx)
        finally:
            self._release(None)

    def _checked(self, pred: Prediction, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        _check_length(pred, idx.size, "primary")
        return pred, None, False

    def _missed(self, pspan: Any) -> tuple[Prediction | None, str | None, bool]:
        pspan.set_attribute("guarded_serving.latency_budget_missed", True)
        pspan.set_status(Status(StatusCode.ERROR, "latency_budget"))
        pspan.set_attribute("error.type", "latency_budget")
        return None, f"primary exceeded its {self.latency_budget_ms} ms budget", True

    def _failed(self, pspan: Any, e: Exception, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        log.warning("primary model %s failed on %d row(s): %s", self.primary.name, idx.size, e)
        pspan.record_exception(e)
        pspan.set_status(Status(StatusCode.ERROR, type(e).__name__))
        pspan.set_attribute("error.type", type(e).__name__)
        return None, f"{type(e).__name__}: {e}", False

    def _shadow_primary(self, verdicts: Verdicts, idx: np.ndarray) -> Prediction | None:
        """The primary's answers for flagged rows, for the record only; failures are expected
        (the rows are out of range) and swallowed."""
        with _child_span("guarded_serving.primary.shadow") as span:
            span.set_attribute("guarded_serving.model.name", self.primary.name)
            span.set_attribute("guarded_serving.rows", int(idx.size))
            try:
                pred = _predict(self.primary, verdicts, idx)
                _check_length(pred, idx.size, "primary")
                return pred
            except Exception as e:
                span.set_attribute("error.type", type(e).__name__)
                log.debug("shadow primary call failed: %s", e)
                return None

    def _predict_within_budget(self, verdicts: Verdicts, idx: np.ndarray) -> Prediction | None:
        assert self._executor is not None and self.latency_budget_ms is not None
        with self._lock:
            if self._inflight >= self.max_primary_inflight:
                return None  # earlier late calls still running: do not pile up more
            self._inflight += 1
        fut = self._executor.submit(_predict, self.primary, verdicts, idx)
        fut.add_done_callback(self._release)
        try:
            return fut.result(timeout=self.latency_budget_ms / 1e3)
        except FutureTimeout:
            return None

    def _release(self, _: Any) -> None:
        with self._lock:
            self._inflight -= 1

    def _assemble(self, n: int, routes: np.ndarray, reasons: list[list[str]],
                  primary_idx: np.ndarray, primary_pred: Prediction | None,
                  fb_idx: np.ndarray, fallback_pred: Prediction | None) -> GuardedResult:
        classification = self.profile.task == "classification"
        empty: Any = None if classification else np.nan
        dtype = object if classification else np.float64
        primary_full = np.full(n, empty, dtype=dtype)
        fallback_full = np.full(n, empty, dtype=dtype)
        if primary_pred is not None:
            primary_full[primary_idx] = primary_pred.labels
        if fallback_pred is not None:
            fallback_full[fb_idx] = fallback_pred.labels
        served = np.where(routes == PRIMARY, primary_full, fallback_full)
        if not classification:
            served = served.astype(np.float64)
        probs, classes = None, None
        if classification:
            classes = self._classes(primary_pred, fallback_pred)
            probs = np.full((n, len(classes)), np.nan)
            if primary_pred is not None and primary_pred.probabilities is not None:
                probs[primary_idx] = _align(primary_pred, classes)
            if fallback_pred is not None and fallback_pred.probabilities is not None:
                fb_rows = routes[fb_idx] == FALLBACK_ROUTE
                probs[fb_idx[fb_rows]] = _align(fallback_pred, classes)[fb_rows]
        return GuardedResult(
            n_rows=n,
            predictions=served,
            routes=routes.astype(str),
            reasons=reasons,
            timing_ms={},
            probabilities=probs,
            classes=classes,
            primary_predictions=primary_full,
            fallback_predictions=fallback_full,
        )

    def _classes(self, *preds: Prediction | None) -> list[Any]:
        for p in preds:
            if p is not None and p.classes is not None:
                return list(p.classes)
        for m in (self.primary, self.fallback):
            if getattr(m, "classes", None):
                return list(m.classes)  # type: ignore[attr-defined]
        return sorted(self.profile.target_profile.categories) if self.profile.target_profile else []

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _child_span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one; in a trace that was sampled out, a no-op span instead.

    The test is the parent's sampled flag, not ``is_recording()``: BentoML's sampler records
    every span it does not sample (``RECORD_ONLY``, for trace ids in its logs), so an unsampled
    request would otherwise build, fill and end three or four spans that are never exported,
    which cost more than the guard's checks at one row per request."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid and not ctx.trace_flags.sampled:
        return nullcontext(trace.INVALID_SPAN)
    return _tracer.start_as_current_span(name)


def _predict(model: Model, verdicts: Verdicts, idx: np.ndarray) -> Prediction:
    """Run ``model`` on the rows at ``idx``; models that take columns skip the DataFrame."""
    whole = idx.size == verdicts.n_rows  # most batches go to one model whole: no slicing
    if getattr(model, "predict_columns", None) is not None:
        cols = verdicts.columns
        return predict_on_columns(model, cols if whole else {k: v[idx] for k, v in cols.items()})
    frame = verdicts.features
    return model.predict(frame if whole else frame.iloc[idx])


def predict_on_columns(model: Model, columns: dict[str, Any]) -> Prediction:
    """Run ``model`` on checked columns (as ``Verdicts.columns`` holds them): straight to
    ``predict_columns`` where the model has it, else through a DataFrame."""
    predict_columns = getattr(model, "predict_columns", None)
    if predict_columns is not None:
        return predict_columns(columns)  # type: ignore[no-any-return]
    return model.predict(pd.DataFrame(columns))


def _check_length(pred: Prediction, n: int, role: str) -> None:
    if len(pred) != n:
        raise ValueError(f"the {role} model returned {len(pred)} predictions for {n} rows")


def _align(pred: Prediction, classes: list[Any]) -> np.ndarray:
    """Probabilities reordered to ``classes`` (matched as text; absent classes get 0)."""
    assert pred.probabilities is not None
    own = [str(c) for c in (pred.classes or [])]
    if own == [str(c) for c in classes]:
        return pred.probabilities
    out = np.zeros((pred.probabilities.shape[0], len(classes)))
    for j, c in enumerate(classes):
        if str(c) in own:
            out[:, j] = pred.probabilities[:, own.index(str(c))]
    return out


def _load(spec: ModelSpec, task: str, role: str) -> Model:
    kw: dict[str, Any] = {}
    if spec.name:
        kw["name"] = spec.name
    if spec.version:
        kw["version"] = spec.version
    if spec.callable:
        return load_model(callable_ref=spec.callable, task=task, **kw)
    path: Path | str | None = spec.path
    if spec.bentoml_tag:
        import bentoml  # only when the config names the model store

        try:
            bm = bentoml.models.get(spec.bentoml_tag)
        except Exception as e:
            raise ConfigError(f"{role}.bentoml_tag: no model {spec.bentoml_tag!r} in the BentoML model store ({e})") from e
        path = bm.path
        kw.setdefault("name", bm.tag.name)
        kw.setdefault("version", bm.tag.version)
    return load_model(path, task=task, trusted=spec.trusted, **kw)
