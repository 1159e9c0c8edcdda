"""A small guarded classifier that is not the example: iris (shipped with scikit-learn), a random
forest exported to ONNX as the primary, the clipped logistic fallback, and their profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
TARGET = "species"


def iris() -> pd.DataFrame:
    from sklearn.datasets import load_iris

    bunch = load_iris()
    df = pd.DataFrame(bunch.data, columns=FEATURES)
    df[TARGET] = [str(bunch.target_names[i]) for i in bunch.target]
    return df


def make_iris_project(directory: Path, **overrides: Any) -> Path:
    """Train, export and profile the iris model in ``directory``; return its serving config."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from guarded_serving.adapters import load_model
    from guarded_serving.fallback import FallbackTrainer
    from guarded_serving.profile import build_profile

    directory.mkdir(parents=True, exist_ok=True)
    data = iris()
    train, holdout = data.iloc[::2].reset_index(drop=True), data.iloc[1::2].reset_index(drop=True)
    forest = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0)
    forest.fit(train[FEATURES].to_numpy("float32"), train[TARGET])
    model = Pipeline([("id", FunctionTransformer()), ("forest", forest)])
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(FEATURES)]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    (directory / "forest.onnx").write_bytes(onx.SerializeToString())
    FallbackTrainer(task="classification", name="iris-fallback").fit(train, TARGET).save_onnx(
        directory / "logistic.onnx"
    )
    profile = build_profile(
        train,
        TARGET,
        task="classification",
        primary=load_model(directory / "forest.onnx", task="classification"),
        fallback=load_model(directory / "logistic.onnx", task="classification"),
        holdout=holdout,
        source="sklearn iris",
    )
    profile.save(directory / "iris-profile.json")
    cfg: dict[str, Any] = {
        "name": "iris-species",
        "task": "classification",
        "primary": {"path": "forest.onnx"},
        "fallback": {"path": "logistic.onnx"},
        "profile": "iris-profile.json",
        "latency_budget_ms": 500,
        **overrides,
    }
    path = directory / "serving.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def rows(n_in: int = 2, n_out: int = 1) -> list[dict[str, float]]:
    """``n_in`` rows like the training data, then ``n_out`` with petals far longer than any seen."""
    data = iris()
    inside = data[FEATURES].iloc[:n_in].to_dict("records")
    outside = [{**inside[0], "petal_length": 30.0 + i} for i in range(n_out)]
    return [*inside, *outside]
