import numpy as np
import pandas as pd
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.fallback import FallbackTrainer

from ._data import TARGET, features, holdout, train


@pytest.fixture(scope="module")
def trainer() -> FallbackTrainer:
    return FallbackTrainer(task="regression").fit(train(), TARGET)


def test_onnx_graph_computes_what_numpy_computes(trainer: FallbackTrainer, tmp_path) -> None:
    trainer.save_onnx(tmp_path / "fb.onnx")
    m = load_model(tmp_path / "fb.onnx")
    X = features(holdout()).iloc[:500]
    np.testing.assert_allclose(m.predict(X).labels, trainer.predict_frame(X), rtol=1e-9)
    assert m.metadata["task"] == "regression" and "carat" in m.metadata["coefficients"]


def test_inputs_are_clipped_so_it_extrapolates_gently(trainer: FallbackTrainer) -> None:
    X = features(holdout()).iloc[[0, 0, 0]].reset_index(drop=True)
    X["carat"] = [0.9, 50.0, 500.0]
    p = trainer.predict_frame(X)
    assert p[1] == p[2]  # both beyond the clip bound
    span = train().carat.max() - train().carat.min()
    assert trainer.hi_[trainer.numeric_.index("carat")] == pytest.approx(train().carat.max() + 0.5 * span)


def test_unseen_category_and_null_are_handled(trainer: FallbackTrainer, tmp_path) -> None:
    trainer.save_onnx(tmp_path / "fb.onnx")
    m = load_model(tmp_path / "fb.onnx")
    X = features(holdout()).iloc[:2].copy()
    X.loc[X.index[0], "cut"] = "Excellent"
    X.loc[X.index[1], "depth"] = np.nan
    np.testing.assert_allclose(m.predict(X).labels, trainer.predict_frame(X))


@pytest.mark.parametrize("labels", [["no", "yes"], [0, 1, 2]])
def test_classification_export(tmp_path, labels) -> None:
    rng = np.random.default_rng(2)
    n = 600
    df = pd.DataFrame({"a": rng.normal(size=n), "c": rng.choice(["u", "v"], n)})
    score = df.a + (df.c == "u")
    df["y"] = [labels[min(int(s > 0.5) + int(s > 1.5), len(labels) - 1)] for s in score]
    fb = FallbackTrainer(task="classification").fit(df, "y")
    fb.save_onnx(tmp_path / "c.onnx")
    m = load_model(tmp_path / "c.onnx")
    p = m.predict(df[["a", "c"]])
    assert m.task == "classification" and p.classes == labels
    np.testing.assert_allclose(p.probabilities.sum(axis=1), 1.0)
    assert [str(x) for x in p.labels] == [str(x) for x in fb.predict_frame(df)]


def test_calendar_parts_agree_with_pandas() -> None:
    from guarded_serving.fallback import calendar_parts
    from guarded_serving.profile import epoch_seconds

    rng = np.random.default_rng(4)
    t = pd.Series(pd.to_datetime(rng.integers(-2_000_000_000, 4_000_000_000, 5000), unit="s"))
    parts = calendar_parts(epoch_seconds(t)[0])
    np.testing.assert_array_equal(parts["month"], t.dt.month)
    np.testing.assert_array_equal(parts["weekday"], t.dt.weekday)
    np.testing.assert_array_equal(parts["hour"], t.dt.hour)


@pytest.mark.parametrize("tz", [None, "America/Chicago"])
def test_datetime_feature_trend_and_calendar_parts_in_onnx(tmp_path, tz) -> None:
    from plotnine.data import txhousing

    df = txhousing.drop(columns=["date"])
    df["date"] = pd.to_datetime({"year": df.year, "month": df.month, "day": 1})
    if tz:
        df["date"] = df["date"].dt.tz_localize(tz)
    df = df[df["median"].notna()]
    train_df = df[df.year.between(2000, 2009)][["city", "date", "median"]]
    fb = FallbackTrainer(task="regression").fit(train_df, "median")
    assert fb.datetime_ == ["date"] and fb.calendar_["date"] == ["month", "weekday"]
    assert "date.month=6" in fb.coefficients()
    fb.save_onnx(tmp_path / "fb.onnx")
    m = load_model(tmp_path / "fb.onnx")
    served = df[df.year.between(2012, 2015)][["city", "date"]].iloc[:300].reset_index(drop=True)
    served.loc[0, "date"] = pd.NaT
    from guarded_serving.profile import epoch_seconds

    # The guard hands datetime features to column models as epoch seconds.
    cols = {"city": served.city.to_numpy(dtype=object), "date": epoch_seconds(served.date)[0]}
    np.testing.assert_allclose(m.predict_columns(cols).labels, fb.predict_frame(served), rtol=1e-9)
    # The trend is clipped: later dates do not extrapolate without bound.
    assert np.isfinite(fb.predict_frame(served)).all()
