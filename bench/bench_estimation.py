"""Benchmark: performance estimated without outcomes, beside NannyML's DLE and CBPE.

    python bench/bench_estimation.py                  # 20 windows of 500 rows per scenario
    python bench/bench_estimation.py --windows 8      # shorter
    python bench/bench_estimation.py --no-nannyml     # ours only

Two scenarios, each with a natural shift; windows move from in-distribution rows to shifted ones
(window i of W draws a share i/(W-1) of its rows from the shifted pool, the rest from the
in-distribution pool, without replacement within a window, fixed seed):

  diamonds  regression (DLE: MAE, RMSE). The example: primary.onnx (gradient boosting) and
            fallback.onnx (ridge), trained on stones under one carat. Reference: the first half of
            the example's holdout; in-distribution pool: its second half; shifted pool: the
            stones of one carat or more in serve.parquet, which the model never saw.
  fair      binary classification (CBPE: accuracy, F1, ROC AUC). The affairs survey of Fair
            (1978) that statsmodels ships (6,366 rows; target: any affair). Primary: gradient
            boosting, fallback: guarded-serving's logistic fallback, both trained on marriages of
            up to 9 years. Reference and in-distribution pool: other such rows; shifted pool: the
            marriages of 13 years or more (outside the training range of yrs_married, and older).

Both tools estimate the same three roles on the same windows: the primary, the fallback and the
guarded service (per row the answer of the route the checks choose: flagged rows to the
fallback). Both are fitted on the same reference rows (ours as ``fit_estimation`` does it at
profile time). Per window: |estimated - realized| per role and metric, for ours and for NannyML,
and the median over windows (all of them, and those with at most 25% shifted rows); the time to
estimate one window (all three roles, for ours with the flagged rows' own estimate too; for
NannyML the sum of its three estimators' ``estimate`` calls on that window, each fitted once with
chunk_size = the window size), medians over windows, in rounds that alternate ours and NannyML
(``--rounds``, 3); the speed-up is the median of the per-round ratios. The models' own predictions
are made beforehand for both.

NannyML 0.13.1 runs from its own virtualenv (.bench-venvs/nannyml, created on first use, with
statsmodels beside it, which its import needs but its requirements omit) through
bench/nannyml_runner.py on windows written to Parquet files. Results go to stdout and
bench/results/estimation.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from peer_venv import ensure_venv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "models" / "diamonds"
RUNNER = ROOT / "bench" / "nannyml_runner.py"
RESULTS = ROOT / "bench" / "results" / "estimation.json"
# pandas<3: NannyML 0.13.1 reshapes string columns, which pandas 3 (Arrow-backed strings) refuses.
NANNYML_REQUIREMENTS = ["nannyml==0.13.1", "statsmodels", "pandas<3"]
ROLES = ("primary", "fallback", "guarded")
SEED = 20240614
REPEATS = 3
#: Windows with at most this share of shifted rows are summarised apart (mostly in-distribution).
LOW_SHIFT = 0.25


def ensure_nannyml_venv() -> Path:
    return ensure_venv("nannyml", NANNYML_REQUIREMENTS)


@dataclass
class Scenario:
    name: str
    task: str
    target: str
    profile: Any
    policy: Any
    models: dict[str, Any]
    reference: pd.DataFrame
    windows: list[pd.DataFrame]
    shift: list[float]
    metrics: list[str]
    served: dict[int, dict[str, Any]] = field(default_factory=dict)


def mixed_windows(
    pool_in: pd.DataFrame,
    pool_shift: pd.DataFrame,
    n_windows: int,
    rows: int,
    rng: np.random.Generator,
) -> tuple[list[pd.DataFrame], list[float]]:
    windows, shares = [], []
    for i in range(n_windows):
        share = i / max(n_windows - 1, 1)
        k = round(share * rows)
        part = pd.concat(
            [
                pool_shift.iloc[rng.choice(len(pool_shift), k, replace=False)],
                pool_in.iloc[rng.choice(len(pool_in), rows - k, replace=False)],
            ]
        )
        windows.append(part.iloc[rng.permutation(len(part))].reset_index(drop=True))
        shares.append(share)
    return windows, shares


def diamonds(n_windows: int, rows: int, rng: np.random.Generator) -> Scenario:
    from guarded_serving.adapters import load_model
    from guarded_serving.config import load_config
    from guarded_serving.profile import Profile

    config = load_config(EXAMPLE / "serving.yaml")
    holdout = pd.read_parquet(EXAMPLE / "data" / "holdout.parquet")
    serve = pd.read_parquet(EXAMPLE / "data" / "serve.parquet")
    half = len(holdout) // 2
    reference, pool_in = holdout.iloc[:half], holdout.iloc[half:]
    windows, shares = mixed_windows(pool_in, serve[serve.carat >= 1.0], n_windows, rows, rng)
    models = {r: load_model(EXAMPLE / f"{r}.onnx") for r in ("primary", "fallback")}
    return Scenario(
        "diamonds",
        "regression",
        "price",
        Profile.load(config.profile),
        config.policy,
        models,
        reference.reset_index(drop=True),
        windows,
        shares,
        ["mae", "rmse"],
    )


def fair(n_windows: int, rows: int, rng: np.random.Generator, tmp: Path) -> Scenario:
    from sklearn.ensemble import GradientBoostingClassifier

    from guarded_serving.adapters import load_model
    from guarded_serving.adapters.sklearn import SklearnModel
    from guarded_serving.fallback import FallbackTrainer
    from guarded_serving.policy import Policy
    from guarded_serving.profile import build_profile

    path = importlib.metadata.distribution("statsmodels").locate_file(
        "statsmodels/datasets/fair/fair.csv"
    )
    df = pd.read_csv(str(path))
    df["affair"] = (df.pop("affairs") > 0).astype(int)
    df = df.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    young, old = df[df.yrs_married <= 9].reset_index(drop=True), df[df.yrs_married >= 13]
    train, reference, pool_in = young.iloc[:2000], young.iloc[2000:3000], young.iloc[3000:]
    features = [c for c in df.columns if c != "affair"]
    gbc = GradientBoostingClassifier(n_estimators=150, max_depth=3, random_state=0)
    primary = SklearnModel(gbc.fit(train[features], train["affair"]), name="fair-gbc")
    FallbackTrainer(task="classification", name="fair-logistic").fit(train, "affair").save_onnx(
        tmp / "fair.onnx"
    )
    models = {"primary": primary, "fallback": load_model(tmp / "fair.onnx")}
    profile = build_profile(train, "affair", task="classification")
    windows, shares = mixed_windows(pool_in, old, n_windows, rows, rng)
    return Scenario(
        "fair",
        "classification",
        "affair",
        profile,
        Policy(),
        models,
        reference,
        windows,
        shares,
        ["accuracy", "f1", "roc_auc"],
    )


def served(s: Scenario, frame: pd.DataFrame) -> dict[str, Any]:
    """Each role's Prediction on ``frame``, the routes the checks choose and the flagged rows."""
    from guarded_serving.adapters.base import Prediction
    from guarded_serving.checks import OK, check_batch

    v = check_batch(frame, s.profile, s.policy)
    if v.rejected.any():
        raise SystemExit(f"{s.name}: {int(v.rejected.sum())} rows rejected by the checks")
    flagged = np.asarray(v.status) != OK
    preds = {r: m.predict(frame[s.profile.feature_names]) for r, m in s.models.items()}
    p, f = preds["primary"], preds["fallback"]
    labels = np.where(flagged, f.labels, p.labels)
    probs = (
        None
        if p.probabilities is None
        else np.where(flagged[:, None], f.probabilities, p.probabilities)
    )
    preds["guarded"] = Prediction(labels, probs, p.classes)
    return {
        "predictions": preds,
        "routes": np.where(flagged, "fallback", "primary"),
        "flagged": flagged,
    }


def realized(s: Scenario, frame: pd.DataFrame, pred: Any) -> dict[str, float]:
    from guarded_serving.scoring import score

    return score(s.task, frame[s.target].to_numpy(), pred.labels, pred)


def run_ours(s: Scenario, tmp: Path) -> tuple[Any, dict[str, Any]]:
    """Fit on the reference, then estimate every window; returns the estimator too."""
    from guarded_serving.estimation import WindowEstimator, fit_estimation

    t = time.perf_counter()
    est = fit_estimation(s.profile, s.reference, s.models, tmp / f"{s.name}.estimation")
    fit_s = time.perf_counter() - t
    estimator = WindowEstimator(est)
    outs = [_estimate(s, estimator, i) for i in range(len(s.windows))]
    return estimator, {
        "fit_s": fit_s,
        "estimates": [
            {r: {m: o[r].get(m, float("nan")) for m in s.metrics} for r in ROLES} for o in outs
        ],
        "flagged_rows": [int(o["flagged"]["n"]) for o in outs],
    }


def _estimate(s: Scenario, estimator: Any, i: int) -> dict[str, Any]:
    got = s.served[i]
    primary_fallback = {r: got["predictions"][r] for r in ("primary", "fallback")}
    return estimator.estimate(
        s.windows[i][s.profile.feature_names], primary_fallback, got["routes"], got["flagged"]
    )  # type: ignore[no-any-return]


def time_ours(s: Scenario, estimator: Any) -> list[float]:
    """ms to estimate each window (all roles, both scopes), median of REPEATS."""
    times = []
    for i, w in enumerate(s.windows):
        got = s.served[i]
        features = w[s.profile.feature_names]
        primary_fallback = {r: got["predictions"][r] for r in ("primary", "fallback")}
        runs = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            estimator.estimate(features, primary_fallback, got["routes"], got["flagged"])
            runs.append(time.perf_counter() - t)
        times.append(float(np.median(runs)) * 1e3)
    return times


def write_nannyml_inputs(s: Scenario, folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    features = s.profile.feature_names
    (folder / "spec.json").write_text(
        json.dumps(
            {
                "task": s.task,
                "features": features,
                "roles": list(ROLES),
                "window_rows": rows,
                "metrics": s.metrics,
            }
        )
    )
    ref_served = served(s, s.reference)

    def frame(data: pd.DataFrame, pred: Any) -> pd.DataFrame:
        out = data[features].copy()
        out["y_pred"] = pred.labels
        if pred.probabilities is not None:
            out["y_pred_proba"] = pred.probabilities[:, list(map(str, pred.classes)).index("1")]
        return out

    for role in ROLES:
        ref = frame(s.reference, ref_served["predictions"][role])
        ref["y_true"] = s.reference[s.target].to_numpy()
        ref.to_parquet(folder / f"reference_{role}.parquet")
        parts = []
        for i, w in enumerate(s.windows):
            part = frame(w, s.served[i]["predictions"][role])
            part["window"] = i
            parts.append(part)
        pd.concat(parts, ignore_index=True).to_parquet(folder / f"windows_{role}.parquet")


def run_nannyml(data: Path) -> dict[str, Any]:
    py = ensure_nannyml_venv()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(py), str(RUNNER), str(data)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"nannyml runner failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summarise(
    s: Scenario, ours: dict[str, Any], nanny_rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """Accuracy from the first round (both are deterministic), speed from every round."""
    nanny = nanny_rounds[0] if nanny_rounds else None
    real = [
        {r: realized(s, w, s.served[i]["predictions"][r]) for r in ROLES}
        for i, w in enumerate(s.windows)
    ]
    rows = []
    for i in range(len(s.windows)):
        row: dict[str, Any] = {
            "window": i,
            "shift_share": s.shift[i],
            "flagged_rows": ours["flagged_rows"][i],
        }
        for r in ROLES:
            for m in s.metrics:
                row[f"{r}.{m}.realized"] = real[i][r].get(m)
                row[f"{r}.{m}.ours"] = ours["estimates"][i][r][m]
                if nanny:
                    row[f"{r}.{m}.nannyml"] = nanny[r]["estimates"][i][m]
        rows.append(row)
    low = [row for row in rows if row["shift_share"] <= LOW_SHIFT]
    errors: dict[str, Any] = {"all_windows": {}, f"shift_at_most_{LOW_SHIFT}": {}}
    for scope, part in zip(errors, (rows, low), strict=True):
        for r in ROLES:
            for m in s.metrics:
                key = f"{r}.{m}"
                real_v = np.array([row[f"{key}.realized"] for row in part], dtype=float)
                errors[scope][key] = {
                    tool: float(
                        np.nanmedian(
                            np.abs(
                                np.array([row[f"{key}.{tool}"] for row in part], dtype=float)
                                - real_v
                            )
                        )
                    )
                    for tool in (("ours", "nannyml") if nanny else ("ours",))
                }
    ours_ms = [float(np.median(t)) for t in ours["window_ms_rounds"]]
    speed: dict[str, Any] = {
        "ours_ms": float(np.median(ours_ms)),
        "ours_ms_rounds": ours_ms,
        "ours_fit_s": ours["fit_s"],
    }
    if nanny:
        nanny_ms = [
            float(np.median(np.sum([n[r]["window_ms"] for r in ROLES], axis=0)))
            for n in nanny_rounds
        ]
        ratios = [n / o for n, o in zip(nanny_ms, ours_ms, strict=False)]
        speed.update(
            nannyml_ms=float(np.median(nanny_ms)),
            nannyml_ms_rounds=nanny_ms,
            nannyml_fit_s=sum(nanny[r]["fit_s"] for r in ROLES),
            speedup=float(np.median(ratios)),
            speedup_rounds=ratios,
        )
    return {
        "task": s.task,
        "windows": len(rows),
        "median_abs_error": errors,
        "speed": speed,
        "per_window": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument(
        "--rounds", type=int, default=3, help="timing rounds, alternating ours and NannyML"
    )
    ap.add_argument("--no-nannyml", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(SEED)
    nanny_rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scenarios = [
            diamonds(args.windows, args.rows, rng),
            fair(args.windows, args.rows, rng, tmp),
        ]
        for s in scenarios:
            s.served = {i: served(s, w) for i, w in enumerate(s.windows)}
        fitted = {s.name: run_ours(s, tmp) for s in scenarios}
        ours = {name: result for name, (_, result) in fitted.items()}
        for o in ours.values():
            o["window_ms_rounds"] = []
        if not args.no_nannyml:
            for s in scenarios:
                write_nannyml_inputs(s, tmp / "nannyml" / s.name, args.rows)
        for k in range(args.rounds):
            print(f"round {k + 1}/{args.rounds}", file=sys.stderr)
            for s in scenarios:
                ours[s.name]["window_ms_rounds"].append(time_ours(s, fitted[s.name][0]))
            if not args.no_nannyml:
                nanny_rounds.append(run_nannyml(tmp / "nannyml"))
    results: dict[str, Any] = {
        "window_rows": args.rows,
        "windows": args.windows,
        "rounds": args.rounds,
        "nannyml": nanny_rounds[0]["nannyml"] if nanny_rounds else None,
        "scenarios": {},
    }
    for s in scenarios:
        r = summarise(s, ours[s.name], [n["scenarios"][s.name] for n in nanny_rounds])
        results["scenarios"][s.name] = r
        print(f"\n{s.name} ({s.task}, {r['windows']} windows of {args.rows} rows, shift 0 -> 100%)")
        print(
            f"  median |estimated - realized|   all windows: ours / nannyml   windows with shift <= {LOW_SHIFT}"
        )
        low = r["median_abs_error"][f"shift_at_most_{LOW_SHIFT}"]
        for key, e in r["median_abs_error"]["all_windows"].items():
            print(
                f"  {key:<22} {e['ours']:>12.4g} {e.get('nannyml', float('nan')):>10.4g}"
                f"   {low[key]['ours']:>12.4g} {low[key].get('nannyml', float('nan')):>10.4g}"
            )
        sp = r["speed"]
        line = f"  per window: ours {sp['ours_ms']:.2f} ms"
        if nanny_rounds:
            line += (
                f", nannyml {sp['nannyml_ms']:.1f} ms (median of per-round ratios {sp['speedup']:.0f}x; "
                f"rounds {', '.join(f'{x:.0f}x' for x in sp['speedup_rounds'])})"
            )
        print(
            line
            + f"; fit: ours {sp['ours_fit_s']:.1f} s"
            + (f", nannyml {sp['nannyml_fit_s']:.1f} s" if nanny_rounds else "")
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
