import time

import anyio
import numpy as np
import pandas as pd
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guarded_serving import guard as guard_module
from guarded_serving.adapters import load_model
from guarded_serving.adapters.callable import CallableModel
from guarded_serving.adapters.sklearn import SklearnModel
from guarded_serving.config import load_config
from guarded_serving.errors import FallbackFailedError, SchemaError
from guarded_serving.fallback import FallbackTrainer
from guarded_serving.guard import GuardedModel
from guarded_serving.profile import Profile, build_profile

from ._data import CONFIG, EXAMPLE, features, holdout, serve


@pytest.fixture(scope="module")
def guarded() -> GuardedModel:
    return GuardedModel.from_config(load_config(CONFIG))


def test_shift_scenario_fallback_beats_primary_on_flagged_rows(guarded: GuardedModel) -> None:
    df = serve()
    X, y = features(df), df["price"].to_numpy()
    result = guarded.predict(X)
    primary_alone = guarded.primary.predict(X).labels
    flagged = result.routes == "fallback"
    assert 0.3 < flagged.mean() < 0.7
    guarded_mae = np.abs(result.predictions[flagged] - y[flagged]).mean()
    primary_mae = np.abs(primary_alone[flagged] - y[flagged]).mean()
    assert guarded_mae < primary_mae
    # Unflagged rows: exactly the primary's predictions.
    np.testing.assert_array_equal(result.predictions[~flagged], primary_alone[~flagged])
    assert all(result.reasons[i] for i in np.flatnonzero(flagged))
    assert set(result.timing_ms) == {"validate", "primary", "fallback", "total"}
    assert result.timing_ms["total"] >= result.timing_ms["validate"]


def test_shadow_fallback_predicts_every_row(guarded: GuardedModel) -> None:
    result = guarded.predict(features(holdout()).iloc[:20])
    assert guarded.shadow_fallback
    assert not np.isnan(result.fallback_predictions).any()
    assert not np.isnan(result.primary_predictions).any()


def _with_primary(primary, budget=None) -> GuardedModel:
    gm = GuardedModel.from_config(load_config(CONFIG))
    return GuardedModel(primary, gm.fallback, gm.profile, gm.policy, budget, "test")


def test_primary_that_raises_gets_fallback_answers() -> None:
    def broken(df):
        raise RuntimeError("boom")

    gm = _with_primary(CallableModel(broken, task="regression"))
    r = gm.predict(features(holdout()).iloc[:5])
    assert r.routes.tolist() == ["fallback"] * 5
    assert all("primary_error" in rs for rs in r.reasons)
    assert r.primary_error == "RuntimeError: boom"
    assert not np.isnan(r.predictions).any()


def test_primary_past_its_budget_gets_fallback_answers() -> None:
    def slow(df):
        time.sleep(0.4)
        return np.ones(len(df))

    gm = _with_primary(CallableModel(slow, task="regression"), budget=50)
    t = time.perf_counter()
    r = gm.predict(features(holdout()).iloc[:3])
    elapsed = time.perf_counter() - t
    assert elapsed < 0.3, "the request waited for the late primary"
    assert r.routes.tolist() == ["fallback"] * 3
    assert all("latency_budget" in rs for rs in r.reasons)
    assert r.budget_missed


def test_primary_within_budget_is_used() -> None:
    gm = _with_primary(load_model(EXAMPLE / "primary.onnx"), budget=1000)
    r = gm.predict(features(holdout()).iloc[:3])
    assert r.routes.tolist() == ["primary"] * 3


def test_fallback_failure_is_one_clear_error() -> None:
    gm = GuardedModel.from_config(load_config(CONFIG))
    bad_fb = CallableModel(lambda df: 1 / 0, task="regression")
    gm2 = GuardedModel(gm.primary, bad_fb, gm.profile, gm.policy, None, "t")
    row = features(holdout()).iloc[[0]].assign(carat=4.0)
    with pytest.raises(FallbackFailedError, match="ZeroDivisionError"):
        gm2.predict(row)


def test_schema_violations_raise_or_are_marked(guarded: GuardedModel) -> None:
    rows = features(holdout()).iloc[:2].to_dict(orient="records")
    rows[1]["depth"] = "deep"
    with pytest.raises(SchemaError) as exc:
        guarded.predict(rows)
    assert [(p.row, p.column) for p in exc.value.problems] == [(1, "depth")]
    r = guarded.predict(rows, on_reject="mark")
    assert r.routes.tolist() == ["primary", "rejected"]
    assert np.isnan(r.predictions[1])


def test_spans_for_batch_and_stages(monkeypatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(guard_module, "_tracer", provider.get_tracer("test"))
    gm = GuardedModel.from_config(load_config(CONFIG))
    X = features(holdout()).iloc[:4].copy()
    X.loc[X.index[0], "carat"] = 3.0
    gm.predict(X)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"guarded_serving.predict", "guarded_serving.validate",
                          "guarded_serving.primary", "guarded_serving.fallback",
                          "guarded_serving.primary.shadow"}
    root = spans["guarded_serving.predict"]
    for name in ("guarded_serving.validate", "guarded_serving.primary", "guarded_serving.fallback",
                 "guarded_serving.primary.shadow"):
        assert spans[name].parent.span_id == root.context.span_id
    assert root.attributes["guarded_serving.rows"] == 4
    assert root.attributes["guarded_serving.rows.fallback"] == 1
    assert "out_of_range:carat" in root.attributes["guarded_serving.reasons"]
    assert spans["guarded_serving.primary"].attributes["guarded_serving.model.name"] == "diamonds-gbr"
    assert "guarded_serving.features" not in root.attributes  # values stay off spans by default


def test_no_stage_spans_in_a_trace_that_was_sampled_out(monkeypatch) -> None:
    # BentoML's sampler records the spans it does not sample (RECORD_ONLY): is_recording() is
    # true, yet nothing is exported. The guard must not build stage spans under such a parent.
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, StaticSampler

    started: list[str] = []

    class Starts(SimpleSpanProcessor):
        def on_start(self, span, parent_context=None) -> None:  # type: ignore[no-untyped-def]
            started.append(span.name)

    exporter = InMemorySpanExporter()
    record_only = StaticSampler(Decision.RECORD_ONLY)  # as BentoML's ParentBasedTraceIdRatio at rate 0
    provider = TracerProvider(sampler=ParentBased(root=record_only, local_parent_not_sampled=record_only))
    provider.add_span_processor(Starts(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(guard_module, "_tracer", tracer)
    gm = GuardedModel.from_config(load_config(CONFIG))
    X = features(holdout()).iloc[:4].copy()
    X.loc[X.index[0], "carat"] = 3.0
    with tracer.start_as_current_span("POST /predict") as server_span:
        assert server_span.is_recording() and not server_span.get_span_context().trace_flags.sampled
        r = gm.predict(X)
    assert r.routes.tolist().count("fallback") == 1
    assert started == ["POST /predict"]
    assert exporter.get_finished_spans() == ()


def test_classification_returns_aligned_probabilities() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.choice(["u", "v"], n)})
    df["label"] = np.where(df.a + (df.c == "u") > 0.5, "yes", np.where(df.b > 0, "maybe", "no"))
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    pipe = make_pipeline(
        make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["c"]), remainder="passthrough"),
        RandomForestClassifier(n_estimators=20, random_state=0),
    ).fit(df[["a", "b", "c"]], df.label)
    primary = SklearnModel(pipe)
    fb = FallbackTrainer(task="classification").fit(df, "label")
    fallback = CallableModel(lambda d: (fb.predict_frame(d), fb_probs(fb, d)), task="classification",
                             classes=fb.classes_)
    profile = build_profile(df, "label")
    gm = GuardedModel(primary, fallback, profile)
    X = df[["a", "b", "c"]].iloc[:6].copy()
    X.loc[X.index[0], "c"] = "w"
    r = gm.predict(X)
    assert r.routes[0] == "fallback" and (r.routes[1:] == "primary").all()
    assert r.classes == ["maybe", "no", "yes"]
    np.testing.assert_allclose(r.probabilities.sum(axis=1), 1.0)
    assert set(r.predictions) <= {"maybe", "no", "yes"}


def fb_probs(fb: FallbackTrainer, d: pd.DataFrame) -> np.ndarray:
    z = fb._design(d) @ fb.coef_ + fb.intercept_
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_task_mismatch_is_refused() -> None:
    gm = GuardedModel.from_config(load_config(CONFIG))
    with pytest.raises(Exception, match="task"):
        GuardedModel(CallableModel(lambda d: d, task="classification"), gm.fallback, gm.profile)


def test_profile_on_disk_matches_example() -> None:
    assert Profile.load(EXAMPLE / "profile.json").task == "regression"


def test_shadow_primary_records_but_never_serves_its_answers_on_flagged_rows() -> None:
    gm = GuardedModel.from_config(load_config(CONFIG))
    assert gm.shadow_primary and gm.shadow_fallback
    X = features(serve())
    X = X[X["carat"] > 2.0].head(5)
    r = gm.predict(X)
    assert r.routes.tolist() == ["fallback"] * 5
    assert not np.isnan(r.primary_predictions).any()
    np.testing.assert_array_equal(r.predictions, r.fallback_predictions)
    assert not np.allclose(r.primary_predictions, r.fallback_predictions)
    quiet = GuardedModel.from_config(load_config(CONFIG), shadow_primary=False).predict(X)
    assert np.isnan(quiet.primary_predictions).all()


def test_async_predict_agrees_with_predict(guarded: GuardedModel) -> None:
    X = features(serve()).sample(200, random_state=0)
    sync = guarded.predict(X, request_id="r1")
    asy = anyio.run(lambda: guarded.apredict(X, request_id="r1"))
    assert asy.routes.tolist() == sync.routes.tolist()
    assert asy.reasons == sync.reasons
    np.testing.assert_allclose(asy.predictions, sync.predictions)
    np.testing.assert_allclose(asy.primary_predictions, sync.primary_predictions)


def test_async_predict_falls_back_on_a_raising_or_late_primary() -> None:
    def broken(df):
        raise RuntimeError("boom")

    def slow(df):
        time.sleep(0.4)
        return np.ones(len(df))

    X = features(holdout()).iloc[:3]
    r = anyio.run(lambda: _with_primary(CallableModel(broken, task="regression")).apredict(X))
    assert r.routes.tolist() == ["fallback"] * 3 and r.primary_error == "RuntimeError: boom"
    gm = _with_primary(CallableModel(slow, task="regression"), budget=50)
    t = time.perf_counter()
    r = anyio.run(lambda: gm.apredict(X))
    assert time.perf_counter() - t < 0.3, "the event loop waited for the late primary"
    assert r.budget_missed and all("latency_budget" in rs for rs in r.reasons)
    time.sleep(0.5)
    assert gm._inflight == 0  # the abandoned call released its slot when it finished
