"""A small synthetic binary classifier project for the estimation tests: data, two ONNX models
(a sharp primary, a smooth fallback) and a profile fitted with its holdout's estimation artefacts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def make_classifier_project(tmp_path: Path) -> pd.DataFrame:
    """Write ``train.parquet``, ``holdout.parquet``, ``primary.onnx``, ``fallback.onnx`` and
    ``profile.json`` (built by ``guarded-serving profile ... --holdout``) into ``tmp_path``; return
    all 3,000 rows (train 0-1499, holdout 1500-2499, the rest unseen)."""
    from sklearn.datasets import make_classification

    from guarded_serving.cli import main
    from guarded_serving.fallback import FallbackTrainer

    x, y = make_classification(n_samples=3000, n_features=5, n_informative=3, random_state=4)
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(5)]).assign(label=y)
    df.iloc[:1500].to_parquet(tmp_path / "train.parquet")
    df.iloc[1500:2500].to_parquet(tmp_path / "holdout.parquet")
    for name, c in (("primary", 10.0), ("fallback", 0.01)):
        FallbackTrainer(task="classification", C=c, name=name).fit(
            df.iloc[:1500], "label"
        ).save_onnx(tmp_path / f"{name}.onnx")
    args = ["profile", str(tmp_path / "train.parquet"), "--target", "label", "--task", "classification",
            "--out", str(tmp_path / "profile.json"), "--primary", str(tmp_path / "primary.onnx"),
            "--fallback", str(tmp_path / "fallback.onnx"), "--holdout", str(tmp_path / "holdout.parquet")]
    assert main(args) == 0
    return df
