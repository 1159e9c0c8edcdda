import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from guarded_serving.adapters import load_model
from guarded_serving.adapters.callable import CallableModel
from guarded_serving.adapters.onnx import OnnxModel
from guarded_serving.errors import ModelLoadError

from ._data import EXAMPLE, features, holdout


def test_onnx_one_input_per_column() -> None:
    m = load_model(EXAMPLE / "primary.onnx")
    assert isinstance(m, OnnxModel) and m.task == "regression" and m.name == "diamonds-gbr"
    X = features(holdout()).iloc[:10]
    p = m.predict(X)
    assert p.labels.shape == (10,) and p.labels.dtype == np.float64
    # Column order in the frame does not matter: inputs are matched by name.
    np.testing.assert_allclose(m.predict(X[X.columns[::-1]]).labels, p.labels)


def _stacked_onnx(tmp_path, model, n_features, classification=False):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    opts = {id(model): {"zipmap": False}} if classification else None
    onx = convert_sklearn(model, initial_types=[("X", FloatTensorType([None, n_features]))], options=opts)
    path = tmp_path / "stacked.onnx"
    path.write_bytes(onx.SerializeToString())
    return path


def test_onnx_one_stacked_tensor(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    y = X.a * 2 - X.c
    path = _stacked_onnx(tmp_path, LinearRegression().fit(X, y), 3)
    m = OnnxModel(path, task="regression", columns=["a", "b", "c"])
    np.testing.assert_allclose(m.predict(X).labels, y, atol=1e-4)


def test_onnx_classifier_labels_and_probabilities(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(300, 2)), columns=["a", "b"])
    y = np.where(X.a > 0, 2, np.where(X.b > 0, 1, 0))
    path = _stacked_onnx(tmp_path, LogisticRegression().fit(X, y), 2, classification=True)
    m = OnnxModel(path)
    assert m.task == "classification"
    p = m.predict(X)
    assert p.classes == [0, 1, 2] and p.probabilities.shape == (300, 3)
    assert (p.labels == y).mean() > 0.9


def test_pickles_need_trust(tmp_path) -> None:
    path = tmp_path / "m.joblib"
    joblib.dump(LinearRegression().fit(pd.DataFrame({"x0": [0.0, 1.0]}), [0.0, 1.0]), path)
    with pytest.raises(ModelLoadError, match="execute code"):
        load_model(path)
    m = load_model(path, trusted=True)
    assert m.predict(pd.DataFrame({"x0": [2.0]})).labels.round(6).tolist() == [2.0]


def test_callable_from_import_and_errors() -> None:
    m = load_model(callable_ref="tests.models_for_tests:slow_primary", task="regression")
    assert isinstance(m, CallableModel) and m.name == "slow_primary"
    with pytest.raises(ModelLoadError, match="module:function"):
        load_model(callable_ref="nocolon")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("nope.onnx")
    with pytest.raises(ModelLoadError, match="unknown model file type"):
        load_model(EXAMPLE / "serving.yaml")


# -- the model contract: what a callable receives and may return; classes as plain values -------

X2 = pd.DataFrame({"a": [0.1, 0.9, 0.4], "b": [1.0, 2.0, 3.0]})


def _clf(fn, **kw) -> CallableModel:
    return CallableModel(fn, task="classification", **kw)


def test_callable_regression_accepts_series_lists_and_columns() -> None:
    for out in (lambda df: df["a"] * 2, lambda df: (df["a"] * 2).tolist(), lambda df: (df[["a"]] * 2).to_numpy()):
        assert CallableModel(out).predict(X2).labels.tolist() == pytest.approx([0.2, 1.8, 0.8])
    with pytest.raises(ValueError, match="one number per row"):
        CallableModel(lambda df: df.to_numpy()).predict(X2)


def test_callable_classifier_labels_only_gets_probability_one() -> None:
    p = _clf(lambda df: np.where(df["a"] > 0.5, 1, 0)).predict(X2)
    assert p.classes == [0, 1] and type(p.classes[0]) is int
    assert p.probabilities.tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_callable_classifier_pair_keeps_its_probabilities() -> None:
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    p = _clf(lambda df: (np.array(["no", "yes", "no"]), probs)).predict(X2)
    assert p.classes == ["no", "yes"]
    np.testing.assert_allclose(p.probabilities, probs)


def test_callable_classifier_pair_without_classes_fails_rather_than_guess() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    with pytest.raises(ValueError, match="declare its classes"):
        _clf(lambda df: (np.array([5, 7]), probs)).predict(X2.head(2))
    full = np.array([[0.7, 0.2, 0.1], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    assert _clf(lambda df: (np.array([5, 9, 7]), full)).predict(X2).classes == [5, 7, 9]


def test_callable_classifier_probability_matrix_alone() -> None:
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    assert _clf(lambda df: probs).predict(X2).labels.tolist() == [0, 1, 0]
    fn = lambda df: probs  # noqa: E731
    fn.classes = ["cat", "dog"]  # type: ignore[attr-defined]
    assert _clf(fn).predict(X2).labels.tolist() == ["cat", "dog", "cat"]
    frame = _clf(lambda df: pd.DataFrame(probs, columns=[False, True])).predict(X2)
    assert frame.classes == [False, True] and frame.labels.tolist() == [False, True, False]


def test_sklearn_classes_are_plain_python_values() -> None:
    from guarded_serving.adapters.sklearn import SklearnModel

    est = LogisticRegression().fit(X2, np.array([0, 1, 0]))
    p = SklearnModel(est).predict(X2)
    assert p.classes == [0, 1] and all(type(c) is int for c in p.classes)
    assert SklearnModel(est).classes == [0, 1]


@pytest.mark.parametrize("kind", ["stacked_onnx", "sklearn", "callable_labels", "callable_pair", "callable_matrix"])
def test_a_classifier_behind_the_guard_answers_one_class_type_on_every_route(tmp_path, kind) -> None:
    """The shuttle case: classification, one stacked ONNX input (or an sklearn primary), our fallback."""
    import json

    from guarded_serving.fallback import FallbackTrainer
    from guarded_serving.guard import GuardedModel
    from guarded_serving.profile import build_profile

    rng = np.random.default_rng(1)
    X = pd.DataFrame(rng.normal(size=(600, 3)), columns=["a", "b", "c"])
    y = np.where(X.a > 0.5, 3, np.where(X.b > 0, 1, 2))
    train = X.assign(label=y)
    from guarded_serving.adapters.sklearn import SklearnModel

    est = LogisticRegression().fit(X, y)
    primary = {
        "stacked_onnx": lambda: OnnxModel(_stacked_onnx(tmp_path, est, 3, classification=True),
                                          task="classification", columns=["a", "b", "c"]),
        "sklearn": lambda: SklearnModel(est),
        "callable_labels": lambda: _clf(lambda df: est.predict(df), classes=[1, 2, 3]),
        "callable_pair": lambda: _clf(lambda df: (est.predict(df), est.predict_proba(df)), classes=[1, 2, 3]),
        "callable_matrix": lambda: _clf(lambda df: est.predict_proba(df), classes=est.classes_),
    }[kind]()
    FallbackTrainer(task="classification").fit(train, "label").save_onnx(tmp_path / "fb.onnx")
    fallback = OnnxModel(tmp_path / "fb.onnx", task="classification")
    guard = GuardedModel(primary, fallback, build_profile(train, "label", task="classification"))
    rows = X.head(4).copy()
    rows.loc[rows.index[2:], "a"] = 50.0  # out of range: the fallback answers these
    result = guard.predict(rows)
    assert result.routes.tolist() == ["primary", "primary", "fallback", "fallback"]
    body = json.loads(json.dumps(result.to_dict(), default=str))
    assert body["classes"] == [1, 2, 3]
    assert all(isinstance(p, int) for p in body["predictions"])
    assert np.isfinite(result.probabilities).all() and np.allclose(result.probabilities.sum(axis=1), 1.0)
    assert result.probabilities[:2].max(axis=1).min() > 0.34  # the primary's own, not zeros
    only_fallback = json.loads(json.dumps(guard.predict(rows.iloc[2:]).to_dict(), default=str))
    assert only_fallback["classes"] == body["classes"]
