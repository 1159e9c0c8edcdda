"""Soak benchmark (not in CI): worker memory under a long steady load with every monitoring
feature on.

    python bench/bench_soak.py                   # 10 minutes at 60 requests/s
    python bench/bench_soak.py --minutes 3 --rate 40

One BentoML worker serves the example; a paced load of 1-row and 50-row requests (alternating)
runs for ``--minutes``; the RSS of the worker and of its recording process (recorder_process.py) is
sampled every 10 s. The target (issue 10): RSS at the end within 10% of RSS after minute 1, for
each of the two, with no rows dropped from the log. Results go to stdout and
bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pandas as pd  # noqa: E402

from bench.bench_service import log_size, monitoring_counts, worker_process  # noqa: E402
from tests.server import Server, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=60.0, help="requests per second, in all")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    data = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "serve.parquet").drop(columns=["price"])
    records = json.loads(data.to_json(orient="records"))
    tmp = Path(tempfile.mkdtemp(prefix="gs-soak-"))
    srv = Server(write_config(tmp), workers=1, env={"OMP_NUM_THREADS": "1"})
    samples: list[dict[str, float]] = []
    sent = {"n": 0, "errors": 0}
    with srv:
        worker = worker_process(srv)
        stop = threading.Event()
        interval = args.clients / args.rate

        def client(k: int) -> None:
            i = k
            with httpx.Client(base_url=srv.url, timeout=30.0) as c:
                next_at = time.monotonic()
                while not stop.is_set():
                    n = 1 if i % 2 else 50
                    start = (i * 50) % (len(records) - 50)
                    r = c.post("/predict", json={"rows": records[start:start + n]})
                    sent["n"] += 1
                    sent["errors"] += r.status_code != 200
                    i += args.clients
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(10)
            kids = worker.children(recursive=True)
            samples.append({"t_s": round(time.monotonic() - t0, 1),
                            "rss_mb": worker.memory_info().rss / 2**20,
                            "recorder_rss_mb": sum(k.memory_info().rss for k in kids) / 2**20,
                            "requests": sent["n"]})
            print(f"{samples[-1]['t_s']:>7.0f} s  RSS {samples[-1]['rss_mb']:7.1f} MB  recorder "
                  f"{samples[-1]['recorder_rss_mb']:7.1f} MB  {sent['n']} requests", flush=True)
        stop.set()
        for t in threads:
            t.join()
        counts = monitoring_counts(srv.url)
    minute1 = next((s for s in samples if s["t_s"] >= 60), samples[0])
    last = samples[-1]
    growth = last["rss_mb"] / minute1["rss_mb"] - 1
    rec_growth = (last["recorder_rss_mb"] / minute1["recorder_rss_mb"] - 1) if minute1["recorder_rss_mb"] else 0.0
    result: dict[str, Any] = {
        "minutes": args.minutes, "rate": args.rate, "requests": sent["n"], "errors": sent["errors"],
        "rss_minute_1_mb": minute1["rss_mb"], "rss_end_mb": last["rss_mb"], "growth": growth,
        "recorder_rss_minute_1_mb": minute1["recorder_rss_mb"], "recorder_rss_end_mb": last["recorder_rss_mb"],
        "recorder_growth": rec_growth,
        "rows_served": counts["served"], "rows_dropped": counts["dropped"], "samples": samples,
        "log": log_size(srv.config),
    }
    print(f"\nRSS after minute 1 {minute1['rss_mb']:.1f} MB, at the end {last['rss_mb']:.1f} MB "
          f"({growth:+.1%}); recording process {minute1['recorder_rss_mb']:.1f} -> "
          f"{last['recorder_rss_mb']:.1f} MB ({rec_growth:+.1%}); {sent['n']} requests, {sent['errors']} errors, "
          f"{counts['dropped']:.0f} of {counts['served']:.0f} rows dropped from the log")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
