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
