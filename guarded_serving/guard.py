"""GuardedModel: check a batch, route rows to the primary or the fallback, time every stage.

Spans go through the OpenTelemetry API only: they cost next to nothing until an application
installs a tracer provider (the service does).

>>> gm = GuardedModel.from_config(load_config("models/diamonds/serving.yaml"))  # doctest: +SKIP
>>> result = gm.predict(rows)  # doctest: +SKIP
>>> result.routes, result.reasons, result.timing_ms  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from .adapters import Model, Prediction, load_model
from .breaker import CircuitBreaker
from .checks import LATENCY_BUDGET, OK, PRIMARY_ERROR, Verdicts, check_batch
from .codec import column_values
from .config import ModelSpec, ServingConfig
from .errors import ConfigError, FallbackFailedError, SchemaError
from .executors import BoundedExecutor, ExecutorBusyError
from .policy import Policy
from .profile import Profile, is_missing

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("guarded_serving")



class Route(StrEnum):
    """Where a row's answer came from."""

    PRIMARY = "primary"
    FALLBACK = "fallback"
    REJECTED = "rejected"


PRIMARY, FALLBACK_ROUTE, REJECTED = Route.PRIMARY.value, Route.FALLBACK.value, Route.REJECTED.value
#: Routes as fixed-width text: numpy compares and copies them in C (an object array would call
#: ``str.__eq__`` once per row).
ROUTE_DTYPE = f"<U{max(len(r.value) for r in Route)}"
#: Threads of the primary model's executor (per worker process), and calls that may wait for
#: one (each within its own deadline); past that a call is answered by the fallback at once.
PRIMARY_THREADS = 8
PRIMARY_QUEUE = 64
#: Consecutive late or failed primary calls that open the circuit breaker, and for how long (s).
BREAKER_FAILURES = 5
BREAKER_OPEN_S = 5.0
#: Calls in a row well inside the deadline after which the sync ``predict`` calls inline.
INLINE_STREAK = 20
#: DataFrames up to this many rows are checked as plain rows (as JSON rows are).
SMALL_FRAME_ROWS = 16


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
    #: The version of the primary of the model set that served the batch (see promotion.py).
    primary_version: str | None = None

    @property
    def features(self) -> pd.DataFrame | None:
        """The batch coerced to the profile's types, in profile column order."""
        return None if self.verdicts is None else self.verdicts.features

    def route_counts(self) -> dict[str, int]:
        return {r: int(np.count_nonzero(self.routes == r)) for r in (PRIMARY, FALLBACK_ROUTE, REJECTED)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready body (NaN becomes null)."""
        out: dict[str, Any] = {
            "predictions": column_values(self.predictions),
            "routes": self.routes.tolist(),
            "reasons": self.reasons,
            "timing_ms": {k: round(v, 4) for k, v in self.timing_ms.items()},
        }
        if self.probabilities is not None:
            out["probabilities"] = np.round(self.probabilities, 6).tolist()
            out["classes"] = list(self.classes or [])
        if self.extra_columns:
            out["extra_columns"] = self.extra_columns
        if self.primary_version is not None:
            out["primary_version"] = self.primary_version
        return out


class GuardedModel:
    """Primary + fallback + profile + policy.

    ``latency_budget_ms`` is a per-call deadline: the primary runs on its own bounded executor
    and a request waits at most this long for it; rows of a late (or raising) call get the
    fallback's answer, the late call finishes in the background. A circuit breaker
    (``breaker.CircuitBreaker``) skips the primary only after ``BREAKER_FAILURES`` consecutive
    late or failed calls, for ``BREAKER_OPEN_S``, then probes it one call at a time: a few slow
    calls cost their own rows, never hundreds of requests behind them.

    The synchronous ``predict`` calls a model that has stayed well inside its deadline
    (``INLINE_STREAK`` calls in a row under a quarter of it) on the caller's thread, saving the
    thread hop; a call that then runs late is served (it is done) but counted by the breaker,
    and the next calls go through the executor again. ``apredict`` always uses the executor.

    Shadow predictions (the other model on the same rows, for the record) are not made here:
    the recorder makes them in the background, batched over many requests.
    """

    def __init__(self, primary: Model, fallback: Model, profile: Profile,
                 policy: Policy | None = None, latency_budget_ms: float | None = None,
                 name: str = "model", primary_threads: int = PRIMARY_THREADS) -> None:
        for role, m in (("primary", primary), ("fallback", fallback)):
            if m.task != profile.task:
                raise ConfigError(f"the {role} model's task is {m.task!r} but the profile's is {profile.task!r}")
        self.primary = primary
        self.fallback = fallback
        self.profile = profile
        self.policy = policy or Policy()
        self.latency_budget_ms = latency_budget_ms
        self.name = name
        self.executor = BoundedExecutor("guarded-primary", threads=primary_threads, queue=PRIMARY_QUEUE)
        self.breaker = CircuitBreaker(BREAKER_FAILURES, BREAKER_OPEN_S)
        self._inline_streak = 0
        #: Named in every answer and span, so a client sees which primary served it.
        self.version = str(primary.version or "")

    @classmethod
    def from_config(cls, config: ServingConfig) -> GuardedModel:
        """Load models and profile named by a serving config."""
        profile = Profile.load(config.profile)
        if profile.task != config.task:
            raise ConfigError(f"task: the config says {config.task!r} but the profile says {profile.task!r}")
        primary = load_model_spec(config.primary, config.task, "primary")
        fallback = load_model_spec(config.fallback, config.task, "fallback")
        return cls(primary, fallback, profile, config.policy, config.latency_budget_ms, config.name)

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
        bounded), the primary runs on its executor, awaited at most ``latency_budget_ms``.
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
            span.set_attribute("guarded_serving.primary.version", self.version)
            if request_id:
                span.set_attribute("guarded_serving.request.id", request_id)
            with _child_span("guarded_serving.validate") as vspan:
                if isinstance(data, pd.DataFrame) and len(data) <= SMALL_FRAME_ROWS:
                    # pandas' per-column machinery costs more than the checks on a few rows.
                    data = _frame_rows(data)
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
            routes = np.full(n, FALLBACK_ROUTE, dtype=ROUTE_DTYPE)
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

            # Fallback on flagged rows and rows the primary could not answer.
            need = np.flatnonzero(routes == FALLBACK_ROUTE)
            fb_idx = need
            fallback_pred = None
            if fb_idx.size:
                with _child_span("guarded_serving.fallback") as fspan:
                    fspan.set_attribute("guarded_serving.model.name", self.fallback.name)
                    fspan.set_attribute("guarded_serving.model.version", str(self.fallback.version))
                    fspan.set_attribute("guarded_serving.rows", int(need.size))
                    try:
                        fallback_pred = _predict(self.fallback, verdicts, fb_idx)
                        _check_length(fallback_pred, fb_idx.size, "fallback")
                    except Exception as e:
                        fspan.record_exception(e)
                        fspan.set_status(Status(StatusCode.ERROR, type(e).__name__))
                        fspan.set_attribute("error.type", type(e).__name__)
                        span.set_status(Status(StatusCode.ERROR, "fallback_failed"))
                        span.set_attribute("error.type", "fallback_failed")
                        raise FallbackFailedError(
                            f"the fallback model failed for {need.size} row(s) that needed it: "
                            f"{type(e).__name__}: {e}"
                        ) from e
            t_fallback = time.perf_counter()

            result = self._assemble(n, routes, reasons, primary_idx, primary_pred, fb_idx, fallback_pred)
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
            result.primary_version = self.version
            if span.is_recording():  # attributes cost more than the checks of one row
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
        """(prediction or None, error text, deadline missed)."""
        with self._primary_span(idx) as pspan:
            if self.latency_budget_ms is None:
                try:
                    return self._checked(_predict(self.primary, verdicts, idx), idx)
                except Exception as e:
                    return self._failed(pspan, e, idx)
            if not self.breaker.allow():
                return self._skipped(pspan)
            deadline = self.latency_budget_ms / 1e3
            t0 = time.perf_counter()
            try:
                if self._inline_streak >= INLINE_STREAK:
                    pred = _predict(self.primary, verdicts, idx)
                else:
                    pred = self.executor.submit(_predict, self.primary, verdicts, idx).result(deadline)
                out = self._checked(pred, idx)
            except FutureTimeout:
                self._after_call(False, "slow", deadline)
                return self._missed(pspan)
            except ExecutorBusyError:  # saturated, not slow: the breaker is not told
                return self._missed(pspan)
            except Exception as e:
                self._after_call(False, "error", deadline)
                return self._failed(pspan, e, idx)
            self._after_call(True, "", deadline, time.perf_counter() - t0)
            return out

    async def _arun_primary(self, verdicts: Verdicts, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        with self._primary_span(idx) as pspan:
            deadline = None if self.latency_budget_ms is None else self.latency_budget_ms / 1e3
            if deadline is not None and not self.breaker.allow():
                return self._skipped(pspan)
            try:
                pred = await self.executor.run(_predict, self.primary, verdicts, idx, timeout=deadline)
                out = self._checked(pred, idx)
            except TimeoutError:
                self.breaker.record(False, "slow")
                return self._missed(pspan)
            except ExecutorBusyError:  # saturated, not slow: the breaker is not told
                return self._missed(pspan)
            except Exception as e:
                self.breaker.record(False, "error")
                return self._failed(pspan, e, idx)
            self.breaker.record(True)
            return out

    def _after_call(self, ok: bool, cause: str, deadline: float, elapsed: float = 0.0) -> None:
        if ok and elapsed > deadline:  # an inline call that ran late: served, but counted
            ok, cause = False, "slow"
        self.breaker.record(ok, cause)
        self._inline_streak = self._inline_streak + 1 if ok and elapsed < deadline / 4 else 0

    @contextmanager
    def _primary_span(self, idx: np.ndarray) -> Iterator[Any]:
        with _child_span("guarded_serving.primary") as pspan:
            pspan.set_attribute("guarded_serving.model.name", self.primary.name)
            pspan.set_attribute("guarded_serving.model.version", str(self.primary.version))
            pspan.set_attribute("guarded_serving.rows", int(idx.size))
            yield pspan

    def _checked(self, pred: Prediction, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        _check_length(pred, idx.size, "primary")
        return pred, None, False

    def _missed(self, pspan: Any) -> tuple[Prediction | None, str | None, bool]:
        pspan.set_attribute("guarded_serving.latency_budget_missed", True)
        pspan.set_status(Status(StatusCode.ERROR, "latency_budget"))
        pspan.set_attribute("error.type", "latency_budget")
        return None, f"primary exceeded its {self.latency_budget_ms} ms budget", True

    def _skipped(self, pspan: Any) -> tuple[Prediction | None, str | None, bool]:
        """The breaker is open: the primary is not called, for the reason that opened it."""
        pspan.set_attribute("guarded_serving.primary.breaker", self.breaker.state)
        if self.breaker.cause == "slow":
            return self._missed(pspan)
        pspan.set_status(Status(StatusCode.ERROR, "primary_error"))
        pspan.set_attribute("error.type", "primary_error")
        return None, "the primary failed repeatedly; skipped while its circuit breaker is open", False

    def _failed(self, pspan: Any, e: Exception, idx: np.ndarray) -> tuple[Prediction | None, str | None, bool]:
        log.warning("primary model %s failed on %d row(s): %s", self.primary.name, idx.size, e)
        pspan.record_exception(e)
        pspan.set_status(Status(StatusCode.ERROR, type(e).__name__))
        pspan.set_attribute("error.type", type(e).__name__)
        return None, f"{type(e).__name__}: {e}", False

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
            routes=routes,
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
            classes = getattr(m, "classes", None)
            if classes:
                return list(classes)
        return sorted(self.profile.target_profile.categories) if self.profile.target_profile else []

    def close(self) -> None:
        """Nothing to release: the executor's threads are daemons (kept for the API)."""


_NO_SPAN = nullcontext(trace.INVALID_SPAN)


def _child_span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one; in a trace that was sampled out, a no-op span instead.

    The test is the parent's sampled flag, not ``is_recording()``: BentoML's sampler records
    every span it does not sample (``RECORD_ONLY``, for trace ids in its logs), so an unsampled
    request would otherwise build, fill and end three or four spans that are never exported,
    which cost more than the guard's checks at one row per request."""
    if isinstance(_tracer, trace.ProxyTracer) and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return _NO_SPAN  # no SDK provider installed: the API's spans would be no-ops anyway
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


def _frame_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A small DataFrame as row dicts, missing values as None (as they come in JSON). One
    conversion of the whole frame: reading it column by column costs ~10 us a column."""
    names = [str(c) for c in frame.columns]
    rows = []
    for values in frame.to_numpy(dtype=object).tolist():
        if any(is_missing(v) for v in values):
            values = [None if is_missing(v) else v for v in values]
        rows.append(dict(zip(names, values, strict=True)))
    return rows


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


def load_model_spec(spec: ModelSpec, task: str, role: str) -> Model:
    """The model a config's spec names (a file, a BentoML model-store tag or a callable)."""
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
