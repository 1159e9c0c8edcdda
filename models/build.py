"""Rebuild the example guarded model from the diamonds data set.

The data (53,940 diamonds: carat, cut, color, clarity, depth, table, x, y, z -> price) ships inside
the plotnine wheel, so nothing is downloaded at run time. The shift to demonstrate is a natural one:
the model is trained on stones under one carat, and production serves the whole market, where the
larger stones are outside anything the model has seen.

    python models/build.py            # writes models/diamonds/*

Outputs (checked in, small): data/train.parquet, data/holdout.parquet, data/serve.parquet,
primary.onnx (gradient boosting through skl2onnx), fallback.onnx (clipped ridge, by
guarded-serving's own trainer), profile.json, profile.estimation/ (error models for estimating
performance without labels, fitted on the holdout), serving.yaml.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
OUT = HERE / "diamonds"
NUMERIC = ["carat", "depth", "table", "x", "y", "z"]
CATEGORICAL = ["cut", "color", "clarity"]
TARGET = "price"
CARAT_LIMIT = 1.0
SEED = 7


def load_diamonds() -> pd.DataFrame:
    """The diamonds CSV from the installed plotnine distribution (without importing plotnine)."""
    path = importlib.metadata.distribution("plotnine").locate_file("plotnine/data/diamonds.csv")
    df = pd.read_csv(path)
    for c in CATEGORICAL:
        df[c] = df[c].astype(str)
    df[TARGET] = df[TARGET].astype(float)
    return df[NUMERIC + CATEGORICAL + [TARGET]]


def split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """train/holdout: stones under CARAT_LIMIT (80/20); serve: a production mix of unseen
    small stones and the larger stones the model never saw."""
    rng = np.random.default_rng(SEED)
    small = df[df.carat < CARAT_LIMIT].sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    large = df[df.carat >= CARAT_LIMIT].reset_index(drop=True)
    n_hold = len(small) // 5
    holdout, train = small.iloc[:n_hold], small.iloc[n_hold:]
    serve = pd.concat([holdout.sample(n=5000, random_state=SEED), large.sample(n=5000, random_state=SEED)])
    serve = serve.iloc[rng.permutation(len(serve))].reset_index(drop=True)
    return train.reset_index(drop=True), holdout.reset_index(drop=True), serve


def train_primary(train: pd.DataFrame):  # type: ignore[no-untyped-def]
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    pre = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)],
        remainder="passthrough",
    )
    model = Pipeline([
        ("pre", pre),
        ("gbr", GradientBoostingRegressor(n_estimators=150, max_depth=4, learning_rate=0.1,
                                          subsample=0.8, random_state=SEED)),
    ])
    return model.fit(train[NUMERIC + CATEGORICAL], train[TARGET])


def export_primary(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    inputs = [(c, FloatTensorType([None, 1])) for c in NUMERIC] + [
        (c, StringTensorType([None, 1])) for c in CATEGORICAL
    ]
    onx = convert_sklearn(model, initial_types=inputs, target_opset={"": 17, "ai.onnx.ml": 3})
    meta = {"name": "diamonds-gbr", "version": "1", "task": "regression",
            "columns": json.dumps(NUMERIC + CATEGORICAL)}
    onnx.helper.set_model_props(onx, meta)
    path.write_bytes(onx.SerializeToString())


SERVING_YAML = """\
# The example guarded model: diamond prices, trained on stones under 1 carat.
name: diamonds-price
task: regression
primary:
  path: primary.onnx
fallback:
  path: fallback.onnx
profile: profile.json
# Rows whose primary call takes longer than this get the fallback's answer.
latency_budget_ms: 250
max_rows: 1000
policy:
  range_margin: 0.0
  outlier_quantile: 0.999
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out: Path = args.out
    (out / "data").mkdir(parents=True, exist_ok=True)

    from guarded_serving.adapters import load_model
    from guarded_serving.estimation import estimation_dir, fit_estimation
    from guarded_serving.fallback import FallbackTrainer
    from guarded_serving.profile import build_profile

    df = load_diamonds()
    train, holdout, serve = split(df)
    for name, part in (("train", train), ("holdout", holdout), ("serve", serve)):
        part.to_parquet(out / "data" / f"{name}.parquet", index=False, compression="zstd")
    print(f"train {len(train)} rows, holdout {len(holdout)}, serve {len(serve)}")

    export_primary(train_primary(train), out / "primary.onnx")
    FallbackTrainer(task="regression", name="diamonds-ridge").fit(train, TARGET).save_onnx(out / "fallback.onnx")
    primary = load_model(out / "primary.onnx")
    fallback = load_model(out / "fallback.onnx")
    profile = build_profile(train, TARGET, task="regression", primary=primary, fallback=fallback,
                            holdout=holdout, source="models/diamonds/data/train.parquet")
    profile.save(out / "profile.json")
    fit_estimation(profile, holdout, {"primary": primary, "fallback": fallback}, estimation_dir(out / "profile.json"))
    (out / "serving.yaml").write_text(SERVING_YAML)
    print("baseline on holdout:", json.dumps(profile.baseline))


if __name__ == "__main__":
    main()
