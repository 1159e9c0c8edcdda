"""Live performance on true outcomes: the diamonds example (regression) and a small classifier."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pandas as pd
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.config import load_config
from guarded_serving.guard import GuardedModel
from guarded_serving.performance import live_performance, metric_gauges
from guarded_serving.scoring import macro_f1

from ._data import CONFIG, EXAMPLE, TARGET, features, serve


@cache
def _diamonds_log() -> pd.DataFrame:
    """The serve set as the store returns it: one row per prediction, with its outcome.

    Small stones come first in time, then the large ones (the shift arrives). Every row has
    both models' predictions, as with the fallback in shadow and the primary also run on the
    rows the guard took away from it.
    """
    df = serve()
    df = df.iloc[np.argsort(df["carat"].to_numpy() >= 1.0, kind="mergesort")].reset_index(drop=True)
    X = features(df)
    result = GuardedModel.from_config(load_config(CONFIG)).predict(X)
    primary = load_model(EXAMPLE / "primary.onnx", task="regression").predict(X).labels
    fallback = load_model(EXAMPLE / "fallback.onnx", task="regression").predict(X).labels
    return pd.DataFrame({
        "request_id": [f"r{i // 100}" for i in range(len(df))],
        "row": np.arange(len(df)) % 100,
        "ts": 1000.0 + np.arange(len(df)),
        "route": result.routes,
        "prediction": result.predictions.tolist(),
        "primary_prediction": primary.tolist(),
        "fallback_prediction": fallback.tolist(),
        "probabilities": None,
        "outcome": df[TARGET].astype(float).tolist(),
    })


def test_regression_guard_beats_primary_on_rows_it_rerouted() -> None:
    log = _diamonds_log()
    perf = live_performance(log, "regression", baseline={"primary": {"mae": 1.0}})
    json.dumps(perf, allow_nan=False)
    assert perf["rows_with_outcomes"] == len(log) == 10_000
    assert perf["baseline"] == {"primary": {"mae": 1.0}}

    fb = perf["by_route"]["fallback"]
    assert 3000 < fb["rows"] < 7000
    assert fb["fallback"]["mae"] < fb["primary"]["mae"]
    assert fb["guarded"] == fb["fallback"], "on fallback rows the guard served the fallback"
    pr = perf["by_route"]["primary"]
    assert pr["guarded"] == pr["primary"]
    assert fb["rows"] + pr["rows"] == 10_000

    impact = perf["decision_impact"]
    assert impact["metric"] == "mae" and impact["guarded_better"] is True
    assert impact["fallback_rows"] == impact["paired_rows"] == fb["rows"]
    assert impact["improvement"] == pytest.approx(impact["primary_on_fallback_rows"] - impact["fallback_on_fallback_rows"])
    assert impact["improvement"] > 0
    overall = perf["overall"]
    assert overall["guarded"]["mae"] < overall["primary"]["mae"]
    assert overall["guarded"]["n"] == 10_000


def test_regression_windows_follow_time_and_show_the_shift() -> None:
    perf = live_performance(_diamonds_log(), "regression", window_rows=2500)
    windows = perf["windows"]
    assert [w["rows"] for w in windows] == [2500] * 4
    assert windows[0]["start"] == 1000.0 and windows[0]["end"] == 3499.0 and windows[1]["start"] == 3500.0
    # The large stones arrive late: the primary's error grows, the guard's much less.
    first, last = windows[0], windows[-1]
    assert last["primary"]["mae"] > 3 * first["primary"]["mae"]
    assert last["guarded"]["mae"] < last["primary"]["mae"]
    assert live_performance(_diamonds_log(), "regression")["windows"] == []


def test_primary_not_run_on_rerouted_rows_leaves_the_impact_unknown() -> None:
    log = _diamonds_log().copy()
    # As logged without a primary shadow: no primary prediction where the guard took over.
    log.loc[log.route == "fallback", "primary_prediction"] = None
    perf = live_performance(log, "regression")
    impact = perf["decision_impact"]
    assert impact["paired_rows"] == 0 and impact["fallback_rows"] > 0
    assert impact["guarded_better"] is None and impact["improvement"] is None
    assert perf["overall"]["primary"]["n"] == perf["by_route"]["primary"]["rows"]
    assert perf["by_route"]["fallback"]["primary"] == {"n": 0.0}


def test_rows_without_outcomes_are_left_out() -> None:
    log = _diamonds_log().copy()
    log.loc[log.index % 2 == 1, "outcome"] = None
    perf = live_performance(log, "regression")
    assert perf["rows_with_outcomes"] == 5000
    assert perf["overall"]["guarded"]["n"] == 5000
    empty = live_performance(log.iloc[0:0], "regression", window_rows=10)
    assert empty["rows_with_outcomes"] == 0 and empty["windows"] == []
    assert empty["decision_impact"]["guarded_better"] is None


def _classification_log() -> pd.DataFrame:
    classes = ["no", "yes"]
    # served / primary / fallback probability of "yes" per row; None = that model did not predict.
    rows = [
        # route,      outcome, primary, fallback, p_primary, p_fallback
        ("primary", "yes", "yes", "yes", 0.9, 0.7),
        ("primary", "no", "no", "no", 0.2, 0.4),
        ("primary", "yes", "no", "yes", 0.4, 0.6),
        ("primary", "no", "no", "yes", 0.3, 0.55),
        ("fallback", "yes", None, "yes", None, 0.8),
        ("fallback", "no", "yes", "no", 0.7, 0.1),
        ("fallback", "yes", "no", "yes", 0.45, 0.9),
        ("fallback", "no", None, "no", None, 0.2),
        ("fallback", None, "yes", "yes", 0.6, 0.6),  # no outcome yet
    ]
    out = []
    for i, (route, y, p, f, pp, pf) in enumerate(rows):
        served, ps = (p, pp) if route == "primary" else (f, pf)
        out.append({
            "ts": float(i), "route": route, "outcome": y, "prediction": served,
            "primary_prediction": p, "fallback_prediction": f,
            "probabilities": {
                "classes": classes,
                "primary": None if pp is None else [1 - pp, pp],
                "fallback": [1 - pf, pf],
                "served": [1 - ps, ps],
            },
        })
    return pd.DataFrame(out)


def test_classification_metrics_and_null_exclusion() -> None:
    from sklearn.metrics import roc_auc_score

    log = _classification_log()
    perf = live_performance(log, "classification", window_rows=4)
    json.dumps(perf, allow_nan=False)
    assert perf["rows_with_outcomes"] == 8
    scored = log[log.outcome.notna()]
    y = scored.outcome.tolist()

    guarded = perf["overall"]["guarded"]
    served = scored.prediction.tolist()
    assert guarded["n"] == 8
    assert guarded["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(served)))
    assert guarded["f1"] == pytest.approx(macro_f1(np.array(y), np.array(served)))
    p_served = [c["served"][1] for c in scored.probabilities]
    assert guarded["roc_auc"] == pytest.approx(roc_auc_score([v == "yes" for v in y], p_served))

    primary = perf["overall"]["primary"]
    assert primary["n"] == 6, "rows the primary did not predict are left out"
    has = scored.primary_prediction.notna()
    assert primary["accuracy"] == pytest.approx(np.mean(scored.outcome[has] == scored.primary_prediction[has]))
    p_primary = [c["primary"][1] for c in scored.probabilities[has]]
    assert primary["roc_auc"] == pytest.approx(
        roc_auc_score([v == "yes" for v in scored.outcome[has]], p_primary))

    impact = perf["decision_impact"]
    assert impact["metric"] == "accuracy" and impact["fallback_rows"] == 4 and impact["paired_rows"] == 2
    assert impact["primary_on_fallback_rows"] == 0.0 and impact["fallback_on_fallback_rows"] == 1.0
    assert impact["improvement"] == 1.0 and impact["guarded_better"] is True

    assert [w["rows"] for w in perf["windows"]] == [4, 4]
    assert perf["windows"][1]["primary"]["n"] == 2


def test_classification_without_probabilities_has_no_auc() -> None:
    log = _classification_log()
    log["probabilities"] = None
    perf = live_performance(log, "classification")
    assert "roc_auc" not in perf["overall"]["guarded"]
    assert "accuracy" in perf["overall"]["guarded"]


def test_metric_gauges_are_flat_and_finite() -> None:
    perf = live_performance(_classification_log(), "classification")
    gauges = metric_gauges(perf)
    names = {g[0] for g in gauges}
    assert names == {"guarded_serving_live_metric"}
    by_labels = {(g[1]["model"], g[1]["route"], g[1]["metric"]): g[2] for g in gauges}
    assert by_labels[("guarded", "all", "accuracy")] == perf["overall"]["guarded"]["accuracy"]
    assert by_labels[("fallback", "fallback", "n")] == 4.0
    assert ("primary", "fallback", "roc_auc") in by_labels
    assert all(np.isfinite(v) for v in by_labels.values())
    assert metric_gauges({}) == []
