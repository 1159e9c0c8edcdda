"""Benchmark: the guard's batch check and single-row guarded prediction, beside their peers.

    python bench/bench_checks.py            # full run (about a minute and a half, plus a one-off venv for pandera)
    python bench/bench_checks.py --quick    # fewer repeats

In one run, on the same ~100,000 rows of the example data (train, holdout and shifted serving rows,
resampled) with a time-zone-aware datetime column added (``listed``: when the stone was listed;
training saw 2020-2023, the rows span 2020-2024, so some are out of its range), it times:
  * our ``check_batch`` (coercion, nulls, ranges, categories, the multivariate outlier score);
  * the floor: plain numpy range checks and ``np.isin`` category checks over the same columns;
  * pandera validating the same ranges, categories and non-nullability (lazy, so it reports every
    failure as we do). pandera runs from its own virtualenv (.bench-venvs/pandera), created on first
    use, on the same rows written to Parquet;
and single-row latency, median and p99: the guarded model in-process (one JSON-like row, as the
service passes it) beside the bare onnxruntime call for the same row, and ``check_batch`` alone on
one JSON row with and without the datetime column.
Results go to stdout and bench/results/checks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer_venv import ensure_venv

# Before numpy loads BLAS, or it is too late: on this shared 2-core machine, BLAS threads spinning
# against the other processes made the outlier score's einsum 30x slower than on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from guarded_serving.profile import Profile  # noqa: E402

EXAMPLE = ROOT / "models" / "diamonds"
RESULTS = ROOT / "bench" / "results" / "checks.json"

PANDERA_WORKER = r'''
import json, sys, time
import numpy as np, pandas as pd
import pandera
import pandera.pandas as pa

spec = json.load(open(sys.argv[1]))
df = pd.read_parquet(sys.argv[2])
repeats = int(sys.argv[3])
cols = {}
for f in spec["features"]:
    if f["kind"] == "datetime":
        lo, hi = (pd.Timestamp(f[k], unit="s", tz="UTC") for k in ("min", "max"))
        if not f["timezone"]:
            lo, hi = lo.tz_localize(None), hi.tz_localize(None)
        cols[f["name"]] = pa.Column(checks=pa.Check.in_range(lo, hi), nullable=f["null_count"] > 0)
    elif f["kind"] in ("numeric", "integer"):
        cols[f["name"]] = pa.Column(float, pa.Check.in_range(f["min"], f["max"]), nullable=f["null_count"] > 0)
    else:
        cols[f["name"]] = pa.Column(str, pa.Check.isin(list(f["categories"])), nullable=f["null_count"] > 0)
schema = pa.DataFrameSchema(cols)
times, failures = [], None
for _ in range(repeats):
    t = time.perf_counter()
    try:
        schema.validate(df, lazy=True)
        failures = 0
    except pa.errors.SchemaErrors as e:
        failures = len(e.failure_cases)
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "failure_cases": failures, "pandera": pandera.__version__}))
'''


TRAIN_SPAN = (pd.Timestamp("2020-01-01", tz="UTC"), pd.Timestamp("2024-01-01", tz="UTC"))
ROWS_SPAN = (pd.Timestamp("2020-01-01", tz="UTC"), pd.Timestamp("2024-03-01", tz="UTC"))


def with_listed(df: pd.DataFrame, span: tuple[pd.Timestamp, pd.Timestamp], seed: int) -> pd.DataFrame:
    """``df`` with a time-zone-aware datetime column ``listed``, uniform over ``span``."""
    rng = np.random.default_rng(seed)
    lo, hi = (int(t.timestamp()) for t in span)
    return df.assign(listed=pd.to_datetime(rng.integers(lo, hi, len(df)), unit="s", utc=True))


def load_profile():  # type: ignore[no-untyped-def]
    """The example's profile, rebuilt on its training data with the ``listed`` column."""
    from guarded_serving.profile import build_profile

    train = with_listed(pd.read_parquet(EXAMPLE / "data" / "train.parquet"), TRAIN_SPAN, seed=1)
    return build_profile(train, "price")


def load_rows(n: int) -> pd.DataFrame:
    parts = [pd.read_parquet(EXAMPLE / "data" / f"{s}.parquet") for s in ("train", "holdout", "serve")]
    df = pd.concat(parts, ignore_index=True).drop(columns=["price"])
    df = df.sample(n=n, replace=True, random_state=0).reset_index(drop=True)
    return with_listed(df, ROWS_SPAN, seed=2)


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def numpy_floor(df: pd.DataFrame, profile) -> np.ndarray:  # type: ignore[no-untyped-def]
    bad = np.zeros(len(df), dtype=bool)
    for f in profile.features:
        if f.is_datetime:
            a = df[f.name].to_numpy(dtype="datetime64[us]")  # UTC
            lo, hi = (np.datetime64(int(v * 1e6), "us") for v in (f.min, f.max))
            bad |= (a < lo) | (a > hi)
            continue
        a = df[f.name].to_numpy()
        if f.is_numeric:
            bad |= (a < f.min) | (a > f.max)
        else:
            bad |= ~np.isin(a, np.array(list(f.categories), dtype=object))
    return bad


def ensure_pandera_venv() -> Path:
    return ensure_venv("pandera", ["pandera>=0.20", "pandas", "pyarrow"])


class PanderaPeer:
    """pandera in its own virtualenv, on the same rows (written once to Parquet)."""

    def __init__(self, df: pd.DataFrame, profile) -> None:  # type: ignore[no-untyped-def]
        self.py = ensure_pandera_venv()
        self._dir = tempfile.TemporaryDirectory()
        d = Path(self._dir.name)
        self.spec, self.data, self.worker = d / "spec.json", d / "rows.parquet", d / "worker.py"
        self.spec.write_text(json.dumps({"features": [f.to_dict() for f in profile.features]}))
        df.to_parquet(self.data)
        self.worker.write_text(PANDERA_WORKER)

    def run(self, repeats: int) -> dict:  # type: ignore[type-arg]
        out = subprocess.run([str(self.py), str(self.worker), str(self.spec), str(self.data), str(repeats)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"pandera worker failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def close(self) -> None:
        self._dir.cleanup()


def single_row_check(profile, repeats: int) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """``check_batch`` alone on one JSON row (as the service passes it), with and without the
    datetime column (as ISO 8601 text)."""
    from guarded_serving.checks import check_batch

    row = load_rows(1).iloc[0]
    with_dt = [{**{k: (v.item() if hasattr(v, "item") else v) for k, v in row.drop("listed").items()},
                "listed": row["listed"].isoformat()}]
    without = [{k: v for k, v in with_dt[0].items() if k != "listed"}]
    plain = Profile.load(EXAMPLE / "profile.json")
    return {
        "check, example profile": timed(lambda: check_batch(without, plain), repeats),
        "check, with a datetime column": timed(lambda: check_batch(with_dt, profile), repeats),
    }


def single_row(repeats: int) -> dict[str, list[float]]:
    from guarded_serving.config import load_config
    from guarded_serving.guard import GuardedModel

    config = load_config(EXAMPLE / "serving.yaml")
    row = pd.read_parquet(EXAMPLE / "data" / "holdout.parquet").drop(columns=["price"]).iloc[:1]
    rows = row.to_dict(orient="records")
    results: dict[str, list[float]] = {}
    gm = GuardedModel.from_config(config)
    results["guarded"] = timed(lambda: gm.predict(rows), repeats)
    session = gm.primary.session  # type: ignore[attr-defined]
    feeds = gm.primary._feeds({c: row[c].to_numpy() for c in row.columns})  # type: ignore[attr-defined]
    results["bare onnxruntime"] = timed(lambda: session.run(None, feeds), repeats)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-pandera", action="store_true", help="skip the pandera peer")
    args = ap.parse_args()
    from guarded_serving.checks import check_batch
    from guarded_serving.policy import Policy

    rounds = 2 if args.quick else 5
    per_round = 3 if args.quick else 5
    profile = load_profile()
    df = load_rows(args.rows)
    # The same checks pandera is given: types, nulls, ranges, categories (no outlier score).
    same = Policy(outlier_quantile=None)
    pandera = None if args.no_pandera else PanderaPeer(df, profile)
    # Rounds alternate ours, the floor and pandera, so that the machine's load, which drifts over
    # minutes here, weighs on all of them alike; the ratios are the medians of per-round ratios.
    times: dict[str, list[float]] = {"ours": [], "ours_same_checks_as_pandera": [], "numpy_floor": [], "pandera": []}
    ratios: dict[str, list[float]] = {"ours_over_floor": [], "pandera_over_ours_same": []}
    pa: dict = {}
    for _ in range(rounds):
        ours = timed(lambda: check_batch(df, profile), per_round)
        ours_same = timed(lambda: check_batch(df, profile, same), per_round)
        floor = timed(lambda: numpy_floor(df, profile), per_round)
        times["ours"] += ours
        times["ours_same_checks_as_pandera"] += ours_same
        times["numpy_floor"] += floor
        ratios["ours_over_floor"].append(float(np.median(ours) / np.median(floor)))
        if pandera is not None:
            pa = pandera.run(per_round)
            times["pandera"] += pa["times"]
            ratios["pandera_over_ours_same"].append(float(np.median(pa["times"]) / np.median(ours_same)))
    if pandera is not None:
        pandera.close()
    v = check_batch(df, profile)
    floor_flags = int(numpy_floor(df, profile).sum())
    results: dict = {
        "rows": len(df),
        "rounds": rounds,
        "check_ms": {k: float(np.median(t) * 1e3) for k, t in times.items() if t},
        "ratio_median_of_rounds": {k: float(np.median(r)) for k, r in ratios.items() if r},
        "ratio_rounds": {k: r for k, r in ratios.items() if r},
        "flagged": {"ours_range_category_or_outlier": int((v.status != 0).sum()),
                    "numpy_floor_range_or_category": floor_flags},
    }
    if pa:
        results["pandera_version"] = pa["pandera"]
        results["pandera_failure_cases"] = pa["failure_cases"]

    lat = single_row(500 if args.quick else 3000)
    lat.update(single_row_check(profile, 500 if args.quick else 3000))
    results["single_row_us"] = {
        k: {"median": float(np.median(t) * 1e6), "p99": float(np.percentile(t, 99) * 1e6)}
        for k, t in lat.items()
    }

    c, r = results["check_ms"], results["ratio_median_of_rounds"]
    print(f"\nbatch check over {len(df):,} rows with a datetime column ({rounds} alternating rounds of "
          f"{per_round}; medians)")
    same_ms = c["ours_same_checks_as_pandera"]
    print(f"  {'ours, full (with outlier score)':<40} {c['ours']:9.1f} ms")
    print(f"  {'ours, ranges+categories+nulls only':<40} {same_ms:9.1f} ms")
    print(f"  {'numpy floor (range + np.isin)':<40} {c['numpy_floor']:9.1f} ms   "
          f"ours full/floor = {r['ours_over_floor']:.2f}x (target <= 2x)")
    if "pandera" in c:
        print(f"  {'pandera ' + results['pandera_version'] + ' (same checks, lazy)':<40} {c['pandera']:9.1f} ms   "
              f"pandera/ours same checks = {r['pandera_over_ours_same']:.1f}x (target >= 10x; rounds: "
              f"{', '.join(f'{x:.1f}' for x in results['ratio_rounds']['pandera_over_ours_same'])}); "
              f"pandera/ours full = {c['pandera'] / c['ours']:.1f}x")
    print("\nsingle-row prediction latency (µs)")
    for k, s in results["single_row_us"].items():
        print(f"  {k:<34} median {s['median']:8.1f}   p99 {s['p99']:8.1f}")
    bare = results["single_row_us"]["bare onnxruntime"]["median"]
    print(f"  guarded/bare median = {results['single_row_us']['guarded']['median'] / bare:.1f}x; "
          f"guard overhead = {results['single_row_us']['guarded']['median'] - bare:.0f} µs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
