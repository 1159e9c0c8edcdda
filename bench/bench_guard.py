"""In-process benchmark: ``GuardedModel.predict`` against the bare onnxruntime call on the same rows.

    python bench/bench_guard.py                  # 7 rounds
    python bench/bench_guard.py --rounds 3 --profile   # also a pyinstrument profile per case

Cases: 1,000 rows as a DataFrame, one row as a list of row dicts (the service's shape), one row
as a DataFrame. The bare call is what a user without guarded-serving would write: one
``InferenceSession.run`` on feeds built from the same input (a DataFrame's columns, or the row
dicts). Rounds alternate guarded and bare; each round times many calls and keeps the median of
repeats, the table shows medians over rounds, the ratio (1,000 rows) and the difference in
microseconds (one row). Targets (issue 10): 1,000 rows within 2x; one row as dicts within 150 us
of the bare call; a one-row DataFrame within 300 us. Results go to bench/results/guard.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.guard import GuardedModel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "guard.json"
CONFIG = ROOT / "models" / "diamonds" / "serving.yaml"


def bare_caller(gm: GuardedModel) -> Callable[[Any], Any]:
    """The plain onnxruntime call on a DataFrame or on row dicts, as a user would write it."""
    session = gm.primary.session  # type: ignore[attr-defined]
    inputs = [(i.name, i.type) for i in session.get_inputs()]

    def call(data: Any) -> Any:
        feeds = {}
        for name, kind in inputs:
            values = data[name].to_numpy() if isinstance(data, pd.DataFrame) else [r[name] for r in data]
            dtype = object if "string" in kind else np.float32
            feeds[name] = np.asarray(values, dtype=dtype).reshape(-1, 1)
        return session.run(None, feeds)[0]

    return call


def time_us(fn: Callable[[], Any], budget_s: float) -> float:
    """Median microseconds per call over repeats that fill ``budget_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    per_repeat = max(1, int(budget_s / 5 / one))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_repeat):
            fn()
        samples.append((time.perf_counter() - t0) / per_repeat * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per case per round")
    ap.add_argument("--profile", action="store_true", help="print a pyinstrument profile per case")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    config = load_config(CONFIG)
    gm = GuardedModel.from_config(config)
    bare = bare_caller(gm)
    holdout = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "holdout.parquet").drop(columns=["price"])
    big = pd.concat([holdout] * (1000 // len(holdout) + 1), ignore_index=True).head(1000)
    cases: dict[str, Any] = {
        "1000_rows_frame": big,
        "1_row_dicts": json.loads(holdout.head(1).to_json(orient="records")),
        "1_row_frame": holdout.head(1).reset_index(drop=True),
    }
    runs: dict[str, dict[str, list[float]]] = {k: {"guarded": [], "bare": []} for k in cases}
    for _ in range(args.rounds):
        for name, data in cases.items():
            runs[name]["guarded"].append(time_us(lambda d=data: gm.predict(d), args.seconds))
            runs[name]["bare"].append(time_us(lambda d=data: bare(d), args.seconds))
    results: dict[str, Any] = {}
    print(f"in-process, {args.rounds} rounds (medians, us per call)")
    print(f"{'case':>16} {'guarded':>9} {'bare':>9} {'ratio':>7} {'diff us':>8}")
    for name, r in runs.items():
        g, b = statistics.median(r["guarded"]), statistics.median(r["bare"])
        paired = statistics.median(x / y for x, y in zip(r["guarded"], r["bare"], strict=True))
        results[name] = {"guarded_us": g, "bare_us": b, "ratio": g / b, "paired_ratio": paired,
                         "diff_us": g - b, "rounds": r}
        print(f"{name:>16} {g:>9.1f} {b:>9.1f} {g / b:>7.2f} {g - b:>8.1f}")
    if args.profile:
        from pyinstrument import Profiler

        for name, data in cases.items():
            n = 300 if name.startswith("1000") else 5000
            prof = Profiler(interval=0.0001)
            with prof:
                for _ in range(n):
                    gm.predict(data)
            print(f"\n==== {name}: {n} calls of GuardedModel.predict")
            print(prof.output_text(unicode=False, color=False, show_all=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
