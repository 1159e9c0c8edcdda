"""Benchmark: drift detection quality and speed, beside alibi-detect's TabularDrift.

    python bench/bench_drift.py                 # 200 windows per scenario and size (a few minutes)
    python bench/bench_drift.py --windows 50    # shorter
    python bench/bench_drift.py --no-alibi      # ours only

Reference: the example's training features (models/diamonds/data/train.parquet). Live windows are
bootstrap samples (with replacement, fixed seed) of holdout.parquet, which comes from the same
population, then changed per scenario:

  no_shift          nothing: every "drift" is a false alarm (target: <= 5% of windows, ours);
  depth_mean_shift  depth + 0.5 training standard deviations (+0.67 points): a gauge that now reads
                    systematically high;
  table_spread      table spread 1.5x around its training mean, still recorded in whole percent
                    (round): a new, less consistent cutting supplier;
  cut_frequencies   rows resampled so that the most frequent cut ("Ideal", 45%) halves its share,
                    the others growing in proportion: a change in the product mix;
  depth_small_shift depth + 0.2 standard deviations: an extra, with no target, to show what
                    requiring an effect size (PSI) on top of significance costs on small shifts;
  train_resample    windows drawn from the training rows themselves: an extra, with no target,
                    showing each test's false-alarm rate when the reference is exactly right
                    (bootstrap windows of the 6,976 holdout rows all share that sample's own small
                    differences from training, which large windows start to detect).

Each window goes through ``DriftState.update`` (features and the primary model's predictions) and
``evaluate``; a window counts as flagged when the overall status is "drift" (the features-only
rate is printed too, as alibi-detect sees no predictions). alibi-detect 0.13 (Kolmogorov-Smirnov per
numeric feature, chi-square per categorical one, p_val=0.05, Bonferroni) gets the same windows,
categoricals as integer codes. It pins numpy<2, so it runs from its own virtualenv
(.bench-venvs/alibi), created on first use, through bench/alibi_runner.py on windows written to
.npz files. It is installed without its declared dependencies (opencv, scikit-image, matplotlib,
Pillow are for images and plots, unused by TabularDrift) plus the few its import needs.

Speed: ``evaluate`` (on counts) and the counting of raw rows (``update``) for windows of 1,000 /
10,000 / 100,000 rows beside alibi-detect's ``predict`` on the same windows, and the per-request
cost of ``update`` for a one-row batch. Results go to stdout and bench/results/drift.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from peer_venv import ensure_venv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "models" / "diamonds"
RESULTS = ROOT / "bench" / "results" / "drift.json"
RUNNER = ROOT / "bench" / "alibi_runner.py"
ALIBI_REQUIREMENTS = [
    "numpy<2", "pandas<3", "scipy<2", "scikit-learn<2", "pydantic<3", "toml<1", "catalogue<3",
    "typing-extensions", "dill<0.4", "tqdm", "requests", "numba<0.60", "transformers<5",
]
WINDOW_SIZES = (500, 2000)
SPEED_SIZES = (1_000, 10_000, 100_000)
TARGETED = ("depth_mean_shift", "table_spread", "cut_frequencies")
SEED = 20240601


def ensure_alibi_venv() -> Path:
    return ensure_venv("alibi", ALIBI_REQUIREMENTS, ["--no-deps", "alibi-detect==0.13.0"])


class Scenarios:
    """The live windows: a pool of rows per scenario and, per window, indices into it."""

    def __init__(self, holdout: pd.DataFrame, train: pd.DataFrame, features: list[str]) -> None:
        self.holdout = holdout[features].reset_index(drop=True)
        self.train = train[features].reset_index(drop=True)
        self.std = train[features].std(numeric_only=True)
        self.mean = train[features].mean(numeric_only=True)

    def pool(self, name: str) -> pd.DataFrame:
        if name == "train_resample":
            return self.train
        df = self.holdout.copy()
        if name == "depth_mean_shift":
            df["depth"] = df["depth"] + 0.5 * self.std["depth"]
        elif name == "depth_small_shift":
            df["depth"] = df["depth"] + 0.2 * self.std["depth"]
        elif name == "table_spread":
            mu = self.mean["table"]
            df["table"] = np.round(mu + 1.5 * (df["table"] - mu))
        return df

    def draw(self, name: str, n: int, windows: int, rng: np.random.Generator) -> np.ndarray:
        size = len(self.pool(name))
        if name != "cut_frequencies":
            return rng.integers(0, size, (windows, n))
        top = (self.holdout["cut"] == "Ideal").to_numpy()
        share = top.mean()
        weights = np.where(top, 0.5 * share / top.sum(), (1 - 0.5 * share) / (~top).sum())
        return rng.choice(size, (windows, n), p=weights / weights.sum())


def guard_columns(df: pd.DataFrame) -> dict[str, Any]:
    """Columns as the guard hands them to DriftState.update: float arrays and Arrow strings."""
    return {c: df[c].to_numpy(dtype=float) if df[c].dtype.kind == "f" else df[c].array
            for c in df.columns}


def codes(df: pd.DataFrame, profile: Any) -> np.ndarray:
    """A float matrix for alibi-detect: numeric features as they are, categoricals as codes."""
    cols = []
    for fp in profile.features:
        if fp.is_numeric:
            cols.append(df[fp.name].to_numpy(dtype=float))
        else:
            cats = pd.CategoricalDtype(list(fp.categories))
            c = pd.Series(df[fp.name].astype(object)).astype(cats).cat.codes.to_numpy()
            cols.append(np.where(c < 0, len(cats.categories), c).astype(float))
    return np.column_stack(cols)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=200, help="windows per scenario and size")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats per window size")
    ap.add_argument("--no-alibi", action="store_true", help="skip the alibi-detect peer")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from guarded_serving.adapters import load_model
    from guarded_serving.drift import DriftState, DriftThresholds, evaluate
    from guarded_serving.profile import Profile

    profile = Profile.load(EXAMPLE / "profile.json")
    names = profile.feature_names
    primary = load_model(EXAMPLE / "primary.onnx", task="regression")
    train = pd.read_parquet(EXAMPLE / "data" / "train.parquet")
    holdout = pd.read_parquet(EXAMPLE / "data" / "holdout.parquet")
    scen = Scenarios(holdout, train, names)
    thresholds = DriftThresholds()
    scenario_names = ("no_shift", *TARGETED, "depth_small_shift", "train_resample")

    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    np.savez(work / "ref.npz", x_ref=codes(train, profile),
             categorical=np.array([j for j, f in enumerate(profile.features) if not f.is_numeric]))

    ours: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for si, name in enumerate(scenario_names):
        pool = scen.pool(name)
        preds = np.asarray(primary.predict(pool).labels, dtype=float)
        pool_codes = codes(pool, profile)
        for n in WINDOW_SIZES:
            idx = scen.draw(name, n, args.windows, np.random.default_rng([SEED, si, n]))
            np.savez(work / f"scenario_{name}@{n}.npz", pool=pool_codes, idx=idx.astype(np.int32))
            overall, features_only, warn, eval_ms = [], [], [], []
            for rows in idx:
                window = pool.iloc[rows]
                state = DriftState.empty(profile)
                state.update(guard_columns(window), preds[rows], now=0.0)
                t = time.perf_counter()
                out = evaluate(state, profile, thresholds)
                eval_ms.append((time.perf_counter() - t) * 1e3)
                overall.append(out["status"] == "drift")
                features_only.append(any(f["status"] == "drift" for f in out["features"]))
                warn.append(out["status"] == "warn")
            ours[f"{name}@{n}"] = {
                "drift_rate": float(np.mean(overall)),
                "features_only_drift_rate": float(np.mean(features_only)),
                "warn_rate": float(np.mean(warn)),
                "windows": len(idx),
                "evaluate_ms_median": float(np.median(eval_ms)),
            }
    print(f"ours: {len(ours)} scenario x size cells in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)

    # -- speed ---------------------------------------------------------------------------------
    rng = np.random.default_rng(SEED)
    speed: dict[str, dict[str, float]] = {}
    pool = scen.pool("no_shift")
    preds = np.asarray(primary.predict(pool).labels, dtype=float)
    for n in SPEED_SIZES:
        rows = rng.integers(0, len(pool), n)
        window = pool.iloc[rows]
        cols, p = guard_columns(window), preds[rows]
        np.savez(work / f"speed_{n}.npz", x=codes(window, profile))
        state = DriftState.empty(profile)
        state.update(cols, p)

        def count(cols: dict[str, Any] = cols, p: np.ndarray = p) -> None:
            DriftState.empty(profile).update(cols, p)

        speed[str(n)] = {
            "evaluate_ms": median_ms(lambda s=state: evaluate(s, profile, thresholds),
                                     args.repeats * 3),
            "update_ms": median_ms(count, args.repeats),
        }
    one = pool.iloc[:1]
    one_cols, one_pred = guard_columns(one), preds[:1]
    one_obj = {c: (v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object))
               for c, v in one_cols.items()}
    single: dict[str, float] = {}
    for label, cols in (("arrow_strings", one_cols), ("object_strings", one_obj)):
        state = DriftState.empty(profile)
        times = []
        for _ in range(20_000):
            t = time.perf_counter_ns()
            state.update(cols, one_pred, now=0.0)
            times.append(time.perf_counter_ns() - t)
        single[label] = float(np.median(times) / 1e3)

    results: dict[str, Any] = {
        "windows_per_cell": args.windows,
        "thresholds": asdict(thresholds),
        "ours": ours,
        "speed": speed,
        "single_row_update_us": single,
    }
    if not args.no_alibi:
        py = ensure_alibi_venv()
        t0 = time.perf_counter()
        out = subprocess.run([str(py), str(RUNNER), str(work), str(args.repeats * 3)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"alibi-detect runner failed:\n{out.stderr[-3000:]}")
        alibi = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"alibi-detect: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        results["alibi"] = alibi
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict[str, Any]) -> None:
    alibi = results.get("alibi")
    version = alibi["alibi_detect"] if alibi else "-"
    print(f"\nwindows flagged as drift ({results['windows_per_cell']} bootstrap windows per cell; "
          f"ours: overall status 'drift'; alibi-detect {version}: is_drift)")
    print(f"  {'scenario':<20} {'rows':>5}  {'ours':>6} {'ours feat.':>10} {'ours warn':>9} "
          f"{'alibi':>6}   verdict")
    for key, o in results["ours"].items():
        name, n = key.split("@")
        a = alibi["scenarios"][key]["drift_rate"] if alibi else None
        if name == "no_shift":
            verdict = f"false alarms, target <= 5%: {'met' if o['drift_rate'] <= 0.05 else 'MISSED'}"
        elif name == "train_resample":
            verdict = "false alarms, reference exactly right (no target)"
        elif name in TARGETED and a is not None:
            verdict = f"target ours >= alibi: {'met' if o['drift_rate'] >= a else 'MISSED'}"
        else:
            verdict = "(no target)"
        a_text = f"{a:6.1%}" if a is not None else "     -"
        print(f"  {name:<20} {n:>5}  {o['drift_rate']:6.1%} {o['features_only_drift_rate']:10.1%} "
              f"{o['warn_rate']:9.1%} {a_text}   {verdict}")

    print("\nspeed (median ms; ours evaluate works on counts, update counts the raw rows)")
    print(f"  {'rows':>8} {'evaluate':>9} {'update':>9} {'alibi predict':>14} "
          f"{'alibi/evaluate':>15} {'alibi/(update+evaluate)':>24}")
    for n, s in results["speed"].items():
        a = alibi["predict_ms"].get(n) if alibi else None
        ratios = (f"{a / s['evaluate_ms']:14.0f}x {a / (s['update_ms'] + s['evaluate_ms']):23.1f}x"
                  if a else f"{'-':>15} {'-':>24}")
        a_text = f"{a:14.1f}" if a else f"{'-':>14}"
        print(f"  {int(n):>8,} {s['evaluate_ms']:9.2f} {s['update_ms']:9.2f} {a_text} {ratios}")
    single = results["single_row_update_us"]
    print(f"\none-row DriftState.update (9 features + prediction), median: "
          f"{single['arrow_strings']:.1f} µs with Arrow strings, "
          f"{single['object_strings']:.1f} µs with object strings")


if __name__ == "__main__":
    main()
