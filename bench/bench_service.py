"""Benchmark: the guarded service against a plain BentoML service serving the same ONNX model.

    python bench/bench_service.py                 # 5 rounds x 8 s per case (about 3.5 minutes)
    python bench/bench_service.py --seconds 3 --rounds 1

Both run through ``bentoml serve`` with one worker on loopback; the load generator is ``wrk``
(Debian package ``wrk``; installed with apt-get when missing), the same for both, with the same
request bodies: ``{"rows": [...]}`` with 1, 100 and 1,000 rows of the example's holdout data. The
guarded service runs with everything on: checks, shadow fallback and primary, drift counting, live
performance estimates on every row, the prediction log into SQLite (sample_rate 1.0) and
Prometheus metrics; the recording runs in its own process beside the worker (the default,
``prediction_log.recorder_process``). A third server (``--no-tuned-plain`` leaves it out) is the
same plain service with the process settings the guarded worker gives itself (BentoML's request
timers cancelled, traffic_timeout.py; the heap frozen, the collector's thresholds and the GIL
switch interval, interpreter.py): it separates what guarding and monitoring cost from what those
settings give. Cases alternate (guarded, plain, plain-tuned, guarded, ...) so machine
noise hits both alike; the table reports medians over rounds and the ratios guarded / plain, and
also the median of the per-round ratios (each round's guarded run against the plain run right
after it, which cancels slow drifts in the machine's load) and each worker's CPU time per request
(user + system, all its threads, from /proc via psutil), with the CPU of the worker's recording
process in a column of its own (the machine has two cores: both count). Results go to stdout and
bench/results/service.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from tests.server import Server, worker_processes, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "service.json"


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk is needed: apt-get install wrk")
    return path


def lua_for(body: str, path: Path) -> Path:
    script = path.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )
    return script


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def worker_process(srv: Server) -> Any:
    """The BentoML worker process of ``srv`` (the one that runs the service's code)."""
    assert srv.proc is not None
    workers = worker_processes(srv.proc.pid)
    if not workers:
        raise RuntimeError("no BentoML worker process found")
    return workers[0]


def cpu_seconds(proc: Any) -> tuple[float, float]:
    """(the process's user + system CPU seconds, its children's): the guarded worker's children
    are its recording process (recorder_process.py); a plain worker has none."""
    own = proc.cpu_times()
    kids = 0.0
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
            kids += t.user + t.system
        except Exception:  # noqa: BLE001 - exited meanwhile
            pass
    return own.user + own.system, kids


def run_wrk(wrk: str, url: str, script: Path, seconds: float, connections: int,
            worker: Any = None) -> dict[str, float]:
    cpu0 = cpu_seconds(worker) if worker is not None else None
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url + "/predict"],
        check=True, capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if bad or errors:
        raise RuntimeError(f"the load run had failures:\n{out}")
    result = {"rps": rps, "p50_ms": _ms(dist["50"]), "p99_ms": _ms(dist["99"])}
    if cpu0 is not None:
        cpu1 = cpu_seconds(worker)
        n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        result["cpu_us_per_request"] = (cpu1[0] - cpu0[0]) / n * 1e6
        result["recorder_cpu_us_per_request"] = (cpu1[1] - cpu0[1]) / n * 1e6
    return result


def monitoring_counts(url: str) -> dict[str, float]:
    """Rows served, and rows the prediction log and drift counting dropped, from /metrics."""
    import httpx

    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()

    def total(name: str) -> float:
        return sum(float(x.split()[-1]) for x in lines if x.startswith(name + "{"))

    dropped = "guarded_serving_prediction_log_dropped_rows_total"
    return {"served": total("guarded_serving_rows_total"), "dropped": total(dropped),
            "dropped_before_drift": sum(float(x.split()[-1]) for x in lines
                                        if x.startswith(dropped + "{") and 'stage="monitoring"' in x)}


def log_size(config: Path) -> dict[str, float]:
    """Rows in the guarded service's prediction log and their bytes (bodies + index rows)."""
    from guarded_serving.config import load_config
    from guarded_serving.store.sql import Store

    cfg = load_config(config)
    store = Store(cfg.store.url, prefix=cfg.store.table_prefix)
    try:
        size: dict[str, float] = dict(store.log_size())
    finally:
        store.close()
    # An index row: its key (request id) plus about 16 bytes of numbers and record header.
    total = size["body_bytes"] + size["index_key_bytes"] + 16 * size["index_entries"]
    size["bytes_per_row"] = total / size["rows"] if size["rows"] else 0.0
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 100, 1000], help="rows per request, per case")
    ap.add_argument("--overrides", default="{}",
                    help='serving-config overrides as JSON, to measure what a feature costs, e.g. '
                         '\'{"prediction_log": {"enabled": false}}\'')
    ap.add_argument("--tuned-plain", action=argparse.BooleanOptionalAction, default=True,
                    help="also run plain BentoML with the guarded worker's process settings "
                         "(bench/plain_service.py, PLAIN_TUNED=1)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    wrk = ensure_wrk()
    holdout = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "holdout.parquet").drop(columns=["price"])
    tmp = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    rows = pd.concat([holdout] * (1000 // len(holdout) + 1), ignore_index=True)
    bodies = {n: json.dumps({"rows": json.loads(rows.head(n).to_json(orient="records"))}) for n in args.rows}
    scripts = {n: lua_for(b, tmp / f"rows{n}") for n, b in bodies.items()}
    env = {"OMP_NUM_THREADS": "1"}
    guarded = Server(write_config(tmp, **json.loads(args.overrides)), workers=1, env=env)
    plain = Server(tmp / "serving.yaml", workers=1, env=env, target="bench.plain_service:PlainService")
    servers = {"guarded": guarded, "plain": plain}
    if args.tuned_plain:
        servers["plain-tuned"] = Server(tmp / "serving.yaml", workers=1, env={**env, "PLAIN_TUNED": "1"},
                                        target="bench.plain_service:PlainService")
    peers = [k for k in servers if k != "guarded"]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for srv in servers.values():
            stack.enter_context(srv)
        workers = {k: worker_process(srv) for k, srv in servers.items()}
        for n, script in scripts.items():
            for srv in servers.values():  # warm up
                run_wrk(wrk, srv.url, script, 2, args.connections)
            before = monitoring_counts(guarded.url)
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in servers}
            for _ in range(args.rounds):  # alternating: guarded, plain, plain-tuned, guarded, ...
                for k, srv in servers.items():
                    runs[k].append(run_wrk(wrk, srv.url, script, args.seconds, args.connections, workers[k]))
            metrics = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "recorder_cpu_us_per_request")
            med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()}
            for peer in peers:
                suffix = "" if peer == "plain" else "_" + peer.replace("-", "_")
                med["ratio" + suffix] = {
                    "throughput": med["guarded"]["rps"] / med[peer]["rps"],
                    "p50": med["guarded"]["p50_ms"] / med[peer]["p50_ms"],
                    "p99": med["guarded"]["p99_ms"] / med[peer]["p99_ms"],
                    "cpu_per_request": med["guarded"]["cpu_us_per_request"] / med[peer]["cpu_us_per_request"],
                }
                pairs = list(zip(runs["guarded"], runs[peer], strict=True))
                med["paired_ratio_median" + suffix] = {
                    "throughput": statistics.median(g["rps"] / p["rps"] for g, p in pairs),
                    "p50": statistics.median(g["p50_ms"] / p["p50_ms"] for g, p in pairs),
                }
            after = monitoring_counts(guarded.url)
            # Honesty check: under overload the monitoring drops rows (counted) rather than slow
            # requests down; say how many it dropped in this case.
            med["monitoring"] = {k: after[k] - before[k] for k in after}
            results[f"{n}_rows"] = {**med, "rounds": runs}
    print(f"\nwrk, 1 thread, {args.connections} connections, {args.seconds:.0f} s x {args.rounds} rounds, "
          "one BentoML worker each (medians over rounds)")
    print(f"{'rows/request':>12} {'service':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}"
          f" {'recorder us/req':>15}")
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        for name in ("guarded", *peers):
            g = r[name]
            print(f"{key.split('_')[0]:>12} {name:>11} {g['rps']:>9.0f} {g['p50_ms']:>8.2f} {g['p99_ms']:>8.2f}"
                  f" {g['cpu_us_per_request']:>11.0f} {g['recorder_cpu_us_per_request']:>15.0f}")
        for peer in peers:
            suffix = "" if peer == "plain" else "_" + peer.replace("-", "_")
            ratio, paired = r["ratio" + suffix], r["paired_ratio_median" + suffix]
            print(f"{'':>12} {'/ ' + peer:>11} {ratio['throughput']:>9.2f} {ratio['p50']:>8.2f} {ratio['p99']:>8.2f}"
                  f" {ratio['cpu_per_request']:>11.2f}   paired: throughput {paired['throughput']:.2f},"
                  f" p50 {paired['p50']:.2f}")
        print(f"{'':>12} (log dropped {r['monitoring']['dropped']:.0f} of {r['monitoring']['served']:.0f} rows, "
              f"{r['monitoring']['dropped_before_drift']:.0f} of them before drift counting)")
    results["log_size"] = log_size(guarded.config)
    size = results["log_size"]
    if size.get("rows"):
        print(f"prediction log: {size['rows']} rows, {size['bytes_per_row']:.1f} bytes a row "
              "(batch bodies plus index entries)")
    results["cpu_count"] = os.cpu_count()
    results["overrides"] = json.loads(args.overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
