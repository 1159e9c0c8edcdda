"""End-to-end isolation of serving from monitoring: a busy dashboard and a silent database."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from . import _data
from .server import Server, write_config
from .test_runtime import silent_database  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e


def _predict_latencies(url: str, seconds: float) -> tuple[list[float], list[list[str]]]:
    row = _data.json_rows(_data.features(_data.holdout()).head(1))
    out, reasons = [], []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30.0) as c:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            r = c.post("/predict", json={"rows": row})
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            reasons.extend(r.json()["reasons"])
    return out, reasons


def test_32_concurrent_drift_readers_do_not_slow_predict(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, store={"flush_seconds": 0.5})
    with Server(cfg) as srv:
        _predict_latencies(srv.url, 2)
        quiet, _ = _predict_latencies(srv.url, 8)
        stop = threading.Event()

        def reader() -> int:
            n = 0
            with httpx.Client(base_url=srv.url, timeout=30.0) as c:
                while not stop.is_set():
                    assert c.get("/drift").status_code == 200
                    n += 1
            return n

        with ThreadPoolExecutor(32) as ex:
            futures = [ex.submit(reader) for _ in range(32)]
            busy, reasons = _predict_latencies(srv.url, 10)
            stop.set()
            reads = sum(f.result() for f in futures)
    p99 = lambda xs: statistics.quantiles(xs, n=100)[98]  # noqa: E731
    assert reads > 32
    assert not any("latency_budget" in r for r in reasons)
    assert p99(busy) <= 1.5 * p99(quiet) + 0.005, (p99(quiet), p99(busy))


def test_a_silent_postgresql_never_slows_predict_and_sigterm_stops_the_server(
        tmp_path: Path, silent_database: str) -> None:  # noqa: F811
    cfg = write_config(tmp_path, store={"url": silent_database, "flush_seconds": 0.5})
    srv = Server(cfg).start()
    try:
        latencies, reasons = _predict_latencies(srv.url, 3)
        assert max(latencies) < 1.0 and all(r == [] for r in reasons)
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            for method, path, body in (("GET", "/drift", None), ("GET", "/performance", None),
                                       ("POST", "/feedback", {"request_id": "x", "outcomes": [1.0]})):
                t = time.perf_counter()
                r = c.request(method, path, json=body)
                took = time.perf_counter() - t
                assert r.status_code == 503 and took < 5.0, (path, r.status_code, took)
    finally:
        t = time.perf_counter()
        srv.stop(signal.SIGTERM, timeout=10.0)
        stopped = srv.proc is not None and srv.proc.poll() is not None
        took = time.perf_counter() - t
        srv.kill()
    assert stopped and took < 10.0, f"SIGTERM took {took:.1f} s"
