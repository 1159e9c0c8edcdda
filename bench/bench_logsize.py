"""The prediction log's size on disk per logged row, as the service writes it.

    python bench/bench_logsize.py                      # one row a request, 2,000 requests
    python bench/bench_logsize.py --rows 50 --requests 200
    python bench/bench_logsize.py --cpu                # time encode and append_log per batch

Rows come from ``models/diamonds/data/serve.parquet`` (real distinct values, so the bodies do
not compress to nothing as ``bench_service``'s repeated body does). Each request gets a
server-made request id and goes through ``GuardedModel.predict`` and the ``Recorder`` (shadow
predictions, features logged), which flushes every ``--flush`` requests (50: one second at 50
requests a second, the default ``flush_seconds``) into a fresh SQLite store. After ``VACUUM``,
SQLite's ``dbstat`` gives the pages of each table and index; the table shows bytes per logged
row for the batch bodies (with the schema table) and for the request index. Target (issue 10): at
most 100 bytes a row.

``--cpu`` times, in process, what the recorder's thread spends on a flush: ``encode`` alone and
``Store.append_log`` (encode, the duplicate check and the SQLite transaction), for a batch of 50
one-row requests and for one 1,000-row request, as the recorder hands them over (fresh request
ids each time, so every row is new). Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.guard import GuardedModel  # noqa: E402
from guarded_serving.recorder import Recorder  # noqa: E402
from guarded_serving.runtime import new_request_id  # noqa: E402
from guarded_serving.store.logbatch import LogBatch, encode  # noqa: E402
from guarded_serving.store.sql import Store  # noqa: E402

CONFIG = ROOT / "models" / "diamonds" / "serving.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows per request")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--flush", type=int, default=50, help="requests per log flush")
    ap.add_argument("--cpu", action="store_true", help="time encode and append_log instead")
    ap.add_argument("--repeat", type=int, default=200, help="runs per timing (--cpu)")
    args = ap.parse_args()
    config = load_config(CONFIG)
    gm = GuardedModel.from_config(config)
    data = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "serve.parquet")
    data = data.drop(columns=[c for c in (config.profile and [gm.profile.target]) if c in data.columns])
    records = json.loads(data.to_json(orient="records"))
    if args.cpu:
        cpu(gm, config, records, args.repeat)
        return
    with tempfile.TemporaryDirectory(prefix="gs-logsize-") as tmp:
        path = Path(tmp) / "log.sqlite3"
        store = Store(f"sqlite:///{path}")
        rec = Recorder(gm, config, lambda: store)
        for i in range(args.requests):
            start = (i * args.rows) % max(1, len(records) - args.rows)
            rec.submit(new_request_id(), gm.predict(records[start:start + args.rows], on_reject="mark"))
            if (i + 1) % args.flush == 0:
                rec.flush()
        rec.close()
        size = store.log_size()
        rows, store_bytes = size["rows"], size["body_bytes"]
        store.close()
        con = sqlite3.connect(path)
        con.execute("VACUUM")
        sizes = dict(con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        payload = store_bytes
        con.close()
    body = sum(v for k, v in sizes.items() if "gs_log_" in k and "log_keys" not in k)
    index = sum(v for k, v in sizes.items() if "gs_log_keys" in k)
    print(f"{args.requests} requests of {args.rows} row(s), a flush every {args.flush} requests: {rows} rows logged")
    print(f"bytes per logged row: bodies {body / rows:.1f}, index {index / rows:.1f}, "
          f"total {(body + index) / rows:.1f} (bodies' own bytes {payload / rows:.1f})")
    print("pages by table and index (bytes a row):",
          ", ".join(f"{k} {v / rows:.1f}" for k, v in sorted(sizes.items()) if "log" in k))


def cpu(gm: GuardedModel, config: Any, records: list[dict[str, Any]], repeat: int) -> None:
    for label, rows, requests in (("50 requests of 1 row", 1, 50), ("1 request of 1,000 rows", 1000, 1)):
        with tempfile.TemporaryDirectory(prefix="gs-logcpu-") as tmp:
            store = Store(f"sqlite:///{Path(tmp) / 'log.sqlite3'}")
            batch = _handed_over(gm, config, records[: rows * requests], rows)
            sizes = np.unique(batch.request_id, return_counts=True)[1]
            enc, app = [], []
            for _ in range(repeat):
                fresh = LogBatch(np.repeat(np.array([new_request_id() for _ in sizes], dtype=object), sizes),
                                 batch.row, batch.columns, batch.features)
                t0 = time.perf_counter()
                encode(fresh)
                t1 = time.perf_counter()
                store.append_log(fresh)
                t2 = time.perf_counter()
                enc.append(t1 - t0)
                app.append(t2 - t1)
            store.close()
        print(f"{label}: encode {statistics.median(enc) * 1e3:.2f} ms, "
              f"append_log {statistics.median(app) * 1e3:.2f} ms (median of {repeat})")


class _Capture:
    """Stands in for the store: keeps what the recorder hands over."""

    def __init__(self) -> None:
        self.handed: list[LogBatch] = []

    def append_log(self, batch: LogBatch) -> int:
        self.handed.append(batch)
        return 0


def _handed_over(gm: GuardedModel, config: Any, records: list[dict[str, Any]], rows: int) -> LogBatch:
    """The one batch a recorder hands its store for ``records``, ``rows`` a request."""
    capture = _Capture()
    rec = Recorder(gm, config, lambda: capture)
    for i in range(0, len(records), rows):
        rec.submit(new_request_id(), gm.predict(records[i:i + rows], on_reject="mark"))
    rec.flush()
    rec.close()
    (batch,) = capture.handed
    return batch


if __name__ == "__main__":
    main()
