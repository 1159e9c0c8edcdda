"""The prediction log's size on disk per logged row, as the service writes it.

    python bench/bench_logsize.py                      # one row a request, 2,000 requests
    python bench/bench_logsize.py --rows 50 --requests 200

Rows come from ``models/diamonds/data/serve.parquet`` (real distinct values, so the bodies do
not compress to nothing as ``bench_service``'s repeated body does). Each request gets a
server-made request id and goes through ``GuardedModel.predict`` and the ``Recorder`` (shadow
predictions, features logged), which flushes every ``--flush`` requests (50: one second at 50
requests a second, the default ``flush_seconds``) into a fresh SQLite store. After ``VACUUM``,
SQLite's ``dbstat`` gives the pages of each table and index; the table shows bytes per logged
row for the batch bodies and for the request index. Target (issue 10): at most 100 bytes a row.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.guard import GuardedModel  # noqa: E402
from guarded_serving.recorder import Recorder  # noqa: E402
from guarded_serving.runtime import new_request_id  # noqa: E402
from guarded_serving.store.sql import Store  # noqa: E402

CONFIG = ROOT / "models" / "diamonds" / "serving.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows per request")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--flush", type=int, default=50, help="requests per log flush")
    args = ap.parse_args()
    config = load_config(CONFIG)
    gm = GuardedModel.from_config(config)
    data = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "serve.parquet")
    data = data.drop(columns=[c for c in (config.profile and [gm.profile.target]) if c in data.columns])
    records = json.loads(data.to_json(orient="records"))
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
        rows = store.log_size()["rows"]
        store.close()
        con = sqlite3.connect(path)
        con.execute("VACUUM")
        sizes = dict(con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        payload = con.execute("SELECT SUM(LENGTH(body)) FROM gs_log_batches").fetchone()[0]
        con.close()
    body = sum(v for k, v in sizes.items() if "log_batches" in k or "log_schemas" in k)
    index = sum(v for k, v in sizes.items() if "log_keys" in k)
    print(f"{args.requests} requests of {args.rows} row(s), a flush every {args.flush} requests: {rows} rows logged")
    print(f"bytes per logged row: bodies {body / rows:.1f}, index {index / rows:.1f}, "
          f"total {(body + index) / rows:.1f} (bodies' own bytes {payload / rows:.1f})")


if __name__ == "__main__":
    main()
