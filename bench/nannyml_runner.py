"""Runs NannyML's DLE / CBPE on the windows bench_estimation.py wrote; prints one JSON line.

Runs inside .bench-venvs/nannyml (NannyML 0.13.1 with statsmodels beside it, which its
requirements omit), never in the project's env:

    .bench-venvs/nannyml/bin/python bench/nannyml_runner.py DATA_DIR

DATA_DIR holds one folder per scenario with spec.json (task, features, roles, window size,
metrics) and, per role, reference_ROLE.parquet (features, y_pred, y_pred_proba for classifiers,
y_true) and windows_ROLE.parquet (the same without y_true, plus a ``window`` column). Each role's
estimator is fitted once on its reference (chunk_size = the window size) and then asked for one
window at a time, as a stream would ask it.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd


def main() -> None:
    warnings.filterwarnings("ignore")
    data = Path(sys.argv[1])
    import nannyml as nml

    out: dict = {"nannyml": nml.__version__, "scenarios": {}}
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        spec = json.loads((folder / "spec.json").read_text())
        scenario: dict = {}
        for role in spec["roles"]:
            ref = pd.read_parquet(folder / f"reference_{role}.parquet")
            windows = pd.read_parquet(folder / f"windows_{role}.parquet")
            if spec["task"] == "regression":
                est = nml.DLE(
                    feature_column_names=spec["features"],
                    y_pred="y_pred",
                    y_true="y_true",
                    metrics=spec["metrics"],
                    chunk_size=spec["window_rows"],
                )
            else:
                est = nml.CBPE(
                    y_pred_proba="y_pred_proba",
                    y_pred="y_pred",
                    y_true="y_true",
                    problem_type="classification_binary",
                    metrics=spec["metrics"],
                    chunk_size=spec["window_rows"],
                )
            t = time.perf_counter()
            est.fit(ref)
            fit_s = time.perf_counter() - t
            values, times = [], []
            for _, part in windows.groupby("window", sort=True):
                part = part.drop(columns="window").reset_index(drop=True)
                t = time.perf_counter()
                res = est.estimate(part).filter(period="analysis").to_df()
                times.append(time.perf_counter() - t)
                values.append({m: float(res[(m, "value")].iloc[0]) for m in spec["metrics"]})
            scenario[role] = {
                "fit_s": fit_s,
                "estimates": values,
                "window_ms": [x * 1e3 for x in times],
            }
        out["scenarios"][folder.name] = scenario
    print(json.dumps(out))


if __name__ == "__main__":
    main()
