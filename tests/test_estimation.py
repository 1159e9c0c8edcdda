"""Estimated performance without outcomes: calibration, error models, tallies, artefacts, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.adapters.sklearn import SklearnModel
from guarded_serving.cli import main
from guarded_serving.errors import ProfileError
from guarded_serving.estimation import (
    ClassificationTally,
    ErrorModel,
    Estimation,
    FeatureEncoder,
    RegressionTally,
    WindowEstimator,
    WindowTally,
    estimation_dir,
    fit_calibration,
    fit_estimation,
)
from guarded_serving.estimation.errormodel import export_error_model, fit_error_model
from guarded_serving.profile import Profile, build_profile
from guarded_serving.scoring import score

from ._classifier import make_classifier_project
from ._data import CONFIG, EXAMPLE, TARGET, holdout, serve

ROLES = ("primary", "fallback")


@pytest.fixture(scope="module")
def models():
    return {r: load_model(EXAMPLE / f"{r}.onnx") for r in ROLES}


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(EXAMPLE / "profile.json")


@pytest.fixture(scope="module")
def example_estimator(profile) -> WindowEstimator:
    return WindowEstimator.load(EXAMPLE / "profile.json", profile)


@pytest.fixture(scope="module")
def classifier_case():
    """A logistic model on synthetic data whose probabilities are squashed toward 0.5
    (underconfident), with a holdout and an in-distribution test split."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(n_samples=9000, n_features=6, n_informative=4, random_state=3)
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(6)]).assign(y=y)
    train, hold, test = df.iloc[:3000], df.iloc[3000:6000], df.iloc[6000:]

    class Squashed(LogisticRegression):
        def predict_proba(self, X):  # noqa: N803 - scikit-learn's name
            return 0.5 + 0.5 * (super().predict_proba(X) - 0.5)

    feats = list(df.columns[:-1])
    model = SklearnModel(Squashed(max_iter=500).fit(train[feats], train["y"]))
    return build_profile(train, "y", task="classification"), model, hold, test, feats


# -- calibration -----------------------------------------------------------------------------


def test_calibration_is_applied_only_where_it_lowers_the_error() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=5000)
    calibrated_already = (rng.uniform(size=5000) < p).astype(int)
    cal = fit_calibration(calibrated_already, np.column_stack([1 - p, p]), [0, 1])
    # Binned ECE still drops (isotonic fits the bins); the Brier score shows it does not help.
    assert not cal.applied and cal.brier_calibrated >= cal.brier_raw
    probs = np.column_stack([1 - p, p])
    assert np.array_equal(cal.apply(probs), probs)

    overconfident = (rng.uniform(size=5000) < 0.5 + 0.4 * (p - 0.5)).astype(int)
    cal = fit_calibration(overconfident, probs, [0, 1])
    assert cal.applied and cal.ece_calibrated < cal.ece_raw and cal.brier_calibrated < cal.brier_raw
    out = cal.apply(probs)
    assert np.allclose(out.sum(axis=1), 1.0) and out[p > 0.9, 1].mean() < 0.9


def test_multiclass_calibration_keeps_rows_summing_to_one() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3000, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    soft = np.exp(logits / 3) / np.exp(logits / 3).sum(axis=1, keepdims=True)
    y = np.array(["a", "b", "c"])[
        [rng.choice(3, p=row) for row in soft]
    ]  # the model is overconfident
    cal = fit_calibration(y, probs, ["a", "b", "c"])
    assert cal.applied
    assert np.allclose(cal.apply(probs).sum(axis=1), 1.0)


# -- classification estimates ----------------------------------------------------------------


def test_classification_estimates_are_close_to_realized_in_distribution(
    tmp_path, classifier_case
) -> None:
    prof, model, hold, test, feats = classifier_case
    est = fit_estimation(prof, hold, {"primary": model}, tmp_path / "est")
    assert est.roles["primary"].calibration.applied  # squashed probabilities need it
    estimator = WindowEstimator(Estimation.load(tmp_path / "est", prof))
    for start in range(0, 3000, 1000):
        window = test.iloc[start : start + 1000]
        pred = model.predict(window[feats])
        out = estimator.estimate(window[feats], {"primary": pred})
        real = score("classification", window["y"].to_numpy(), pred.labels, pred)
        for metric in ("accuracy", "f1", "roc_auc"):
            assert abs(out["primary"][metric] - real[metric]) < 0.03, metric
            lo, hi = out["bands"]["primary"][metric]
            assert lo <= out["primary"][metric] <= hi and hi - lo < 0.15


def test_classification_estimate_falls_where_the_model_is_unsure(tmp_path, classifier_case) -> None:
    prof, model, hold, test, feats = classifier_case
    estimator = WindowEstimator(fit_estimation(prof, hold, {"primary": model}, tmp_path / "est"))
    pred = model.predict(test[feats])
    margin = np.abs(pred.probabilities[:, 1] - 0.5)
    easy, hard = test[margin > np.quantile(margin, 0.7)], test[margin < np.quantile(margin, 0.3)]
    est = {
        name: estimator.estimate(w[feats], {"primary": model.predict(w[feats])})["primary"][
            "accuracy"
        ]
        for name, w in (("easy", easy), ("hard", hard))
    }
    assert est["hard"] < est["easy"] - 0.1


def test_classification_tallies_merge_to_the_whole(tmp_path, classifier_case) -> None:
    prof, model, hold, test, feats = classifier_case
    estimator = WindowEstimator(fit_estimation(prof, hold, {"primary": model}, tmp_path / "est"))
    a, b = test.iloc[:700], test.iloc[700:1500]
    ta = estimator.tally(a[feats], {"primary": model.predict(a[feats])})
    tb = estimator.tally(b[feats], {"primary": model.predict(b[feats])})
    whole = estimator.tally(
        test.iloc[:1500][feats], {"primary": model.predict(test.iloc[:1500][feats])}
    )
    merged = WindowTally.from_dict(json.loads(json.dumps(ta.to_dict()))).merge(tb)
    assert merged.metrics()["primary"] == pytest.approx(whole.metrics()["primary"])


def test_roc_auc_from_score_bins_matches_the_ranked_auc() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(size=2000)
    probs = np.column_stack([1 - p, p])
    t = ClassificationTally.empty(2)
    t.update(probs, (p > 0.5).astype(int), probs)
    values, _ = t.metrics()
    # Expected AUC of a calibrated score: sum over pairs i != j of p_i (1 - p_j) [s_i > s_j].
    order = np.argsort(p)
    ps = p[order]
    below_neg = np.cumsum(1 - ps) - (1 - ps)
    exact = (ps * below_neg).sum() / (p.sum() * (1 - p).sum() - (p * (1 - p)).sum())
    assert values["roc_auc"] == pytest.approx(exact, abs=2e-3)


# -- regression estimates (the example) ------------------------------------------------------


def test_error_model_in_onnx_matches_scikit_learn(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    pred = x[:, 0] * 3
    loss = np.abs(x[:, 1]) + 0.1 * rng.normal(size=600)
    model = fit_error_model(x, pred, loss)
    export_error_model(model, 5, tmp_path / "e.onnx")
    onnx_out = ErrorModel(tmp_path / "e.onnx").predict(x, pred)
    sk_out = np.maximum(model.predict(np.column_stack([x, pred]).astype(np.float32)), 0.0)
    assert np.allclose(onnx_out, sk_out, rtol=1e-4, atol=1e-4)


def test_regression_estimates_are_close_to_realized_on_holdout_splits(
    tmp_path, profile, models
) -> None:
    h = holdout().sample(frac=1.0, random_state=0).reset_index(drop=True)
    ref, rest = h.iloc[:3500], h.iloc[3500:]
    estimator = WindowEstimator(fit_estimation(profile, ref, models, tmp_path / "est"))
    for start in range(0, 3000, 1000):
        w = rest.iloc[start : start + 1000]
        preds = {r: m.predict(w[profile.feature_names]) for r, m in models.items()}
        out = estimator.estimate(w[profile.feature_names], preds)
        for role in ROLES:
            real = score("regression", w[TARGET], preds[role].labels)
            assert out[role]["mae"] == pytest.approx(real["mae"], rel=0.1), role
            assert out[role]["rmse"] == pytest.approx(real["rmse"], rel=0.2), role


def test_estimate_rises_on_a_shifted_window_and_flagged_rows_get_their_own(
    example_estimator, profile, models
) -> None:
    s = serve()
    small, large = s[s.carat < 1.0].head(1000), s[s.carat >= 1.0].head(1000)
    out = {}
    for name, w in (("small", small), ("large", large)):
        f = w[profile.feature_names]
        flagged = (w.carat >= 1.0).to_numpy()
        preds = {r: m.predict(f) for r, m in models.items()}
        out[name] = example_estimator.estimate(
            f, preds, np.where(flagged, "fallback", "primary"), flagged
        )
    assert out["large"]["primary"]["mae"] > 2 * out["small"]["primary"]["mae"]
    assert out["small"]["flagged"]["n"] == 0 and out["large"]["flagged"]["n"] == 1000
    # The guarded service serves the fallback's answer on flagged rows.
    assert out["large"]["guarded"] == pytest.approx(out["large"]["fallback"])
    assert out["small"]["guarded"] == pytest.approx(out["small"]["primary"])


def test_regression_tally_merges_and_round_trips() -> None:
    a, b = RegressionTally(), RegressionTally()
    a.update(np.array([1.0, 2.0]), np.array([1.5, 5.0]))
    b.update(np.array([4.0]), np.array([20.0]))
    whole = RegressionTally()
    whole.update(np.array([1.0, 2.0, 4.0]), np.array([1.5, 5.0, 20.0]))
    assert RegressionTally.from_dict(a.merge(b).to_dict()).metrics() == pytest.approx(
        whole.metrics()
    )


def test_encoder_codes_unseen_categories_and_fills_missing_numbers(profile) -> None:
    enc = FeatureEncoder.from_profile(profile)
    rows = holdout().head(2)
    rows.loc[0, "cut"] = "Unheard-of"
    rows.loc[1, "carat"] = np.nan
    m = enc.matrix(rows)
    names = [c.name for c in enc.columns]
    assert m[0, names.index("cut")] == -1.0
    assert m[1, names.index("carat")] == enc.columns[names.index("carat")].fill
    assert FeatureEncoder.from_dict(enc.to_dict()) == enc


def test_encoder_codes_large_batches_as_it_codes_rows(profile) -> None:
    # Above a few rows, categories are found through pandas' hash table; row by row they are
    # looked up one at a time. Both code alike, values of other types and nulls included.
    enc = FeatureEncoder.from_profile(profile)
    rows = pd.concat([holdout().head(100)] * 2, ignore_index=True)
    cut = rows["cut"].astype(object).to_numpy().copy()
    cut[::7], cut[1::9], cut[2::11], cut[3::13] = None, "Unheard-of", 3, pd.NaT
    cols = {c.name: (cut if c.name == "cut" else rows[c.name].to_numpy()) for c in enc.columns}
    whole = enc.matrix(cols)
    one_by_one = np.vstack([enc.matrix({k: v[i:i + 1] for k, v in cols.items()}) for i in range(len(cut))])
    np.testing.assert_array_equal(whole, one_by_one)
    text = rows["cut"].astype(object).to_numpy().copy()
    text[::5] = None  # text and missing values: the hash table's path
    text_only = {**cols, "cut": text}
    np.testing.assert_array_equal(enc.matrix(text_only)[:9], enc.matrix({k: v[:9] for k, v in text_only.items()}))
    assert enc.matrix(text_only)[0, [c.name for c in enc.columns].index("cut")] == -1.0


# -- artefacts -------------------------------------------------------------------------------


def test_artefacts_are_checked_against_the_profile_and_their_files(tmp_path, profile) -> None:
    shutil.copytree(estimation_dir(EXAMPLE / "profile.json"), tmp_path / "est")
    other = build_profile(holdout().head(200), TARGET)
    with pytest.raises(ProfileError, match="fitted for profile"):
        Estimation.load(tmp_path / "est", other)
    Estimation.load(tmp_path / "est", profile)
    with open(tmp_path / "est" / "primary.abs.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ProfileError, match="sha256"):
        Estimation.load(tmp_path / "est", profile)
    body = json.loads((tmp_path / "est" / "estimation.json").read_text())
    body["holdout_rows"] += 1
    (tmp_path / "est" / "estimation.json").write_text(json.dumps(body))
    with pytest.raises(ProfileError, match="content hash"):
        Estimation.load(tmp_path / "est", profile)


def test_a_profile_without_estimation_still_loads(tmp_path) -> None:
    shutil.copy(EXAMPLE / "profile.json", tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json").content_hash
    assert not WindowEstimator.available(tmp_path / "profile.json")
    assert WindowEstimator.available(EXAMPLE / "profile.json")


# -- command line ----------------------------------------------------------------------------


def test_profile_with_a_holdout_writes_the_estimation(tmp_path, capsys) -> None:
    holdout().head(600).to_parquet(tmp_path / "h.parquet")
    data = EXAMPLE / "data" / "train.parquet"
    assert (
        main(
            [
                "profile",
                str(data),
                "--target",
                TARGET,
                "--out",
                str(tmp_path / "p.json"),
                "--primary",
                str(EXAMPLE / "primary.onnx"),
                "--fallback",
                str(EXAMPLE / "fallback.onnx"),
                "--holdout",
                str(tmp_path / "h.parquet"),
            ]
        )
        == 0
    )
    assert "estimation primary: error models" in capsys.readouterr().out
    est = Estimation.load(tmp_path / "p.estimation", Profile.load(tmp_path / "p.json"))
    assert sorted(est.roles) == ["fallback", "primary"] and est.holdout_rows == 600


def test_estimate_json_has_the_performance_metric_names(tmp_path, capsys) -> None:
    s = serve().head(400)
    s.drop(columns=[TARGET]).to_parquet(tmp_path / "rows.parquet")
    assert main(["estimate", str(CONFIG), str(tmp_path / "rows.parquet"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 400
    for role in ("primary", "fallback", "guarded"):
        assert set(out[role]) == {"n", "mae", "rmse"}
        assert set(out["bands"][role]) == {"mae", "rmse"}
        lo, hi = out["bands"][role]["mae"]
        assert lo <= out[role]["mae"] <= hi
    # Every stone of a carat or more is outside the training range (a few small ones are outliers).
    assert out["flagged"]["n"] >= int((s.carat >= 1.0).sum())
    assert main(["estimate", str(CONFIG), str(tmp_path / "rows.parquet")]) == 0
    assert "flagged rows" in capsys.readouterr().out


def test_estimate_without_artefacts_says_how_to_make_them(tmp_path, capsys) -> None:
    for name in ("serving.yaml", "profile.json", "primary.onnx", "fallback.onnx"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    assert (
        main(["estimate", str(tmp_path / "serving.yaml"), str(EXAMPLE / "data" / "serve.parquet")])
        == 2
    )
    assert "--holdout" in capsys.readouterr().err


def test_estimate_json_for_a_classifier_has_accuracy_f1_and_auc(tmp_path, capsys) -> None:
    df = make_classifier_project(tmp_path)
    df.iloc[2500:].drop(columns="label").to_parquet(tmp_path / "rows.parquet")
    assert "estimation primary: calibration" in capsys.readouterr().out
    (tmp_path / "serving.yaml").write_text(
        "name: synthetic\ntask: classification\nprimary:\n  path: primary.onnx\n"
        "fallback:\n  path: fallback.onnx\nprofile: profile.json\n"
    )
    assert (
        main(["estimate", str(tmp_path / "serving.yaml"), str(tmp_path / "rows.parquet"), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 500
    for role in ("primary", "fallback", "guarded"):
        assert set(out[role]) == {"n", "accuracy", "f1", "roc_auc"}
        assert set(out["bands"][role]) == {"accuracy", "f1", "roc_auc"}
        assert 0.5 < out[role]["accuracy"] <= 1.0
