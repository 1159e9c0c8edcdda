"""Benchmark: what the live estimates cost the recorder, per 1,000 served rows.

    python bench/bench_live_estimates.py              # 5 rounds of 5,000 rows per batch size
    python bench/bench_live_estimates.py --rounds 3 --rows 2000 --sample-rate 1.0 0.1

An in-process ``ServingRuntime`` of the example (SQLite store in a temporary folder, everything
on) serves the holdout in requests of 1, 100 and 1,000 rows; the recorder's consumer thread
tallies each lot it takes. Reported per batch size: the tally's own time per 1,000 rows
(``LiveEstimates.cost``, measured inside the consumer thread: error models in ONNX, the feature
encoding, the sums) and its share of the recorder's whole time per 1,000 rows with estimation off
and on (rounds alternate off/on; medians). The tally runs off the request path, so this is
background CPU, not latency. Results go to stdout and bench/results/live_estimates.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.runtime import ServingRuntime, new_request_id  # noqa: E402
from tests import _data  # noqa: E402
from tests.server import write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "live_estimates.json"


def one_run(rows: list[dict[str, Any]], batch: int, estimation: bool,
            sample_rate: float | None = None) -> tuple[float, float, int]:
    """(recorder seconds, tally seconds, rows) for serving ``rows`` in batches of ``batch``."""
    settings: dict[str, Any] = {"enabled": estimation}
    if sample_rate is not None:
        settings["sample_rate"] = sample_rate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp), estimation=settings, drift={"window_rows": 1000})
        rt = ServingRuntime(load_config(cfg))
        try:
            process = rt.recorder._process  # timed in the consumer thread, where it runs
            spent = [0.0]

            def timed(items: Any) -> None:
                t = time.perf_counter()
                process(items)
                spent[0] += time.perf_counter() - t

            rt.recorder._process = timed  # type: ignore[method-assign]
            for i in range(0, len(rows), batch):
                rt.predict(rows[i:i + batch], request_id=new_request_id())
            assert rt.recorder.flush(60)
            tally = rt.estimates.cost[0] if rt.estimates is not None else 0.0
            return spent[0], tally, len(rows)
        finally:
            rt.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--sample-rate", type=float, nargs="+", default=[1.0, 0.1],
                    help="estimation.sample_rate of the runs with estimation on (0.1 is the default)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    holdout = _data.features(_data.holdout())
    rows = _data.json_rows(holdout.sample(args.rows, replace=True, random_state=0))
    out: dict[str, Any] = {"rows": args.rows, "rounds": args.rounds, "cases": {}}
    rates = args.sample_rate
    print(f"{'batch':>6} {'recorder off':>13}" + "".join(
        f" {'tally at ' + str(r):>12} {'recorder on':>12} {'ratio':>6}" for r in rates))
    for batch in args.batches:
        off: list[float] = []
        on: dict[float, list[float]] = {r: [] for r in rates}
        tally: dict[float, list[float]] = {r: [] for r in rates}
        for _ in range(args.rounds):  # alternating: off, then each sample rate
            rec, _t, n = one_run(rows, batch, False)
            off.append(rec / n * 1e6)
            for r in rates:
                rec, t, n = one_run(rows, batch, True, r)
                on[r].append(rec / n * 1e6)
                tally[r].append(t / n * 1e6)
        case: dict[str, Any] = {"recorder_ms_per_1000_rows_off": statistics.median(off), "sample_rates": {}}
        line = f"{batch:>6} {case['recorder_ms_per_1000_rows_off']:>13.1f}"
        for r in rates:
            c = {"tally_ms_per_1000_rows": statistics.median(tally[r]),
                 "recorder_ms_per_1000_rows_on": statistics.median(on[r])}
            c["recorder_ratio_on_off"] = c["recorder_ms_per_1000_rows_on"] / case["recorder_ms_per_1000_rows_off"]
            case["sample_rates"][str(r)] = c
            line += (f" {c['tally_ms_per_1000_rows']:>12.1f} {c['recorder_ms_per_1000_rows_on']:>12.1f}"
                     f" {c['recorder_ratio_on_off']:>6.2f}")
        out["cases"][str(batch)] = case
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
