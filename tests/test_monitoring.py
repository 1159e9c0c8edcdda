"""End-to-end monitoring over real HTTP: drift merged across workers and replicas, alerts to a
webhook, outcomes through /feedback, live performance, durability and a slow store."""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from guarded_serving.config import load_config
from guarded_serving.drift.state import DriftState
from guarded_serving.drift.stats import DriftThresholds, evaluate
from guarded_serving.guard import GuardedModel
from guarded_serving.recorder import fill_shadows
from guarded_serving.store.sql import Store

from . import _data
from .otlp_receiver import OtlpReceiver
from .server import Server, free_port, write_config

pytestmark = pytest.mark.e2e

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
FAST = {"store": {"flush_seconds": 0.3}}


def _send(srv: Server, df: pd.DataFrame, batch: int = 50, threads: int = 4,
          headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    chunks = [df.iloc[i:i + batch] for i in range(0, len(df), batch)]

    def one(chunk: pd.DataFrame) -> dict[str, Any]:
        r = httpx.post(srv.url + "/predict", json={"rows": _data.json_rows(chunk)}, timeout=30.0, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, chunks))


def _drift(srv: Server, rows: int, timeout: float = 15.0) -> dict[str, Any]:
    """GET /drift once every worker has flushed ``rows`` rows."""
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(srv.url + "/drift", timeout=30.0).json()
        if body["cumulative"]["rows"] >= rows or time.monotonic() > deadline:
            return body  # type: ignore[no-any-return]
        time.sleep(0.3)


def _local_evaluation(df: pd.DataFrame) -> dict[str, Any]:
    config = load_config(_data.CONFIG)
    gm = GuardedModel.from_config(config)
    state = DriftState.empty(gm.profile)
    r = gm.predict(df)
    assert r.verdicts is not None
    fill_shadows(gm, r)  # as the service's recorder does
    state.update(r.verdicts.columns, r.primary_predictions)
    return evaluate(state, gm.profile, DriftThresholds(min_rows=config.drift.min_rows))


def _by_name(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in ev["features"]}


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh table prefix in the shared PostgreSQL database, dropped afterwards."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL)
        engine.connect().close()
    except Exception as e:  # pragma: no cover - CI starts PostgreSQL first
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}: {e}")
    prefix = f"gs_e2e_{uuid.uuid4().hex[:8]}_"
    yield prefix
    with engine.begin() as conn:
        for (name,) in conn.execute(sa.text("select tablename from pg_tables where tablename like :p"),
                                    {"p": prefix + "%"}).all():
            conn.execute(sa.text(f'drop table if exists "{name}" cascade'))


def test_two_workers_add_up_to_one_drift_view(tmp_path: Path) -> None:
    df = _data.features(_data.holdout()).sample(1200, random_state=1)
    # One open window: nothing is compacted, so the segments still name the worker that wrote them.
    cfg = write_config(tmp_path, drift={"window_rows": 100_000}, **FAST)
    with Server(cfg, workers=2) as srv:
        _send(srv, df, batch=20, threads=8)
        body = _drift(srv, len(df))
        metrics = httpx.get(srv.url + "/metrics").text
    workers = {s["worker"] for s in Store(load_config(cfg).store.url).segments()}
    # /metrics adds up the workers too.
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("guarded_serving_rows_total{"))
    assert served == len(df)
    assert len(workers) >= 2, "both workers should have seen part of the traffic"
    assert body["cumulative"]["rows"] == len(df)
    local = _by_name(_local_evaluation(df))
    for name, f in _by_name(body["cumulative"]).items():
        assert f["live_rows"] == local[name]["live_rows"]
        assert f["psi"] == pytest.approx(local[name]["psi"], rel=1e-9, abs=1e-12)
    assert body["cumulative"]["status"] == "ok"


@pytest.mark.postgres
def test_two_service_processes_share_postgresql(tmp_path: Path, pg_schema: str) -> None:
    df = _data.features(_data.holdout()).sample(900, random_state=2)
    store = {"url": PG_URL, "table_prefix": pg_schema, "flush_seconds": 0.3}
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a = Server(write_config(tmp_path / "a", store=store))
    b = Server(write_config(tmp_path / "b", store=store))
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.start(), (a, b)))
    try:
        _send(a, df.iloc[:400])
        _send(b, df.iloc[400:])
        time.sleep(1.0)
        view_a, view_b = _drift(a, len(df)), _drift(b, len(df))
    finally:
        a.stop()
        b.stop()
    assert view_a["cumulative"]["rows"] == view_b["cumulative"]["rows"] == len(df)
    local = _by_name(_local_evaluation(df))
    for name, f in _by_name(view_b["cumulative"]).items():
        assert f["psi"] == pytest.approx(local[name]["psi"], rel=1e-9, abs=1e-12)


class _Webhook:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                hook.alerts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts if a.get("kind") == kind]


def test_shifted_traffic_turns_drift_on_recommends_retraining_and_alerts(tmp_path: Path) -> None:
    hook = _Webhook()
    rx = OtlpReceiver().__enter__()
    cfg = write_config(tmp_path, drift={"window_rows": 300, "min_rows": 200, "consecutive_windows_for_retrain": 2,
                                        "webhook_url": hook.url}, tracing={"endpoint": rx.endpoint}, **FAST)
    holdout = _data.features(_data.holdout()).sample(600, random_state=3)
    serve = _data.features(_data.serve())
    shifted = serve[serve["carat"] >= 1.0].sample(900, random_state=3)
    with Server(cfg, workers=2) as srv:
        _send(srv, holdout, threads=1)
        calm = _drift(srv, 600)
        assert calm["current"]["status"] in ("ok", "warn")
        assert not calm["retrain_recommended"]
        _send(srv, shifted.iloc[:300], threads=1)
        one = _drift(srv, 900)
        _send(srv, shifted.iloc[300:], threads=1)
        later = _drift(srv, 1500)
        deadline = time.monotonic() + 10
        while not (hook.of_kind("drift_alert") and hook.of_kind("estimate_alert")) and time.monotonic() < deadline:
            time.sleep(0.2)
        metrics = httpx.get(srv.url + "/metrics").text
    assert _by_name(one["current"])["carat"]["status"] == "drift"
    assert not one["retrain_recommended"], "one drifting window is not yet persistent drift"
    assert later["retrain_recommended"] and later["consecutive_drift_windows"] >= 2, [(w["rows"], w["closed"], w["status"]) for w in later["windows"]]
    drift_alerts = hook.of_kind("drift_alert")
    assert drift_alerts, "the webhook should have received an alert"
    alert = drift_alerts[0]
    assert any(c["feature"] == "carat" and c["to"] == "drift" for c in alert["changes"])
    # Two workers evaluate drift, but each change is recorded and alerted once.
    carat_alerts = [a for a in drift_alerts for c in a["changes"] if c["feature"] == "carat" and c["to"] == "drift"]
    assert len(carat_alerts) == 1, hook.alerts
    # So is the estimate falling below the baseline (the same webhook, another kind).
    assert len([a for a in hook.of_kind("estimate_alert") if "primary.mae" in a["new"]]) == 1, hook.alerts
    assert 'guarded_serving_drift_status{feature="carat",model="diamonds-price"} 2.0' in metrics
    assert 'guarded_serving_retrain_recommended{model="diamonds-price"}' in metrics
    assert "drift: feature carat changed from" in srv.logs(tail=None)
    # ...and a span event, exported like every other span.
    def carat_drifted(spans: list[Any]) -> bool:
        return any(e[0] == "guarded_serving.drift.status_change" and e[1]["guarded_serving.feature"] == "carat"
                   and e[1]["guarded_serving.drift.to"] == "drift" for s in spans for e in s.events)

    rx.wait_for(carat_drifted)
    rx.__exit__(None, None, None)


def test_a_store_that_is_down_degrades_monitoring_not_predictions(tmp_path: Path) -> None:
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=1"
    with Server(write_config(tmp_path, store={"url": dead, "flush_seconds": 0.3})) as srv:
        rows = _data.json_rows(_data.features(_data.holdout()).head(3))
        for _ in range(5):
            r = httpx.post(srv.url + "/predict", json={"rows": rows}, timeout=30.0)
            assert r.status_code == 200 and r.json()["routes"] == ["primary"] * 3
        for method, path, body in (("GET", "/drift", None), ("GET", "/performance", None),
                                   ("POST", "/feedback", {"request_id": r.json()["request_id"], "outcomes": [1.0, 2.0, 3.0]})):
            resp = httpx.request(method, srv.url + path, json=body, timeout=30.0)
            assert resp.status_code == 503, (path, resp.text)
            assert resp.json()["error"] == "store_unavailable" and "***" not in resp.text
        time.sleep(1.0)
        assert httpx.get(srv.url + "/livez").status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
    dropped = [line for line in metrics.splitlines()
               if line.startswith("guarded_serving_prediction_log_dropped_rows_total{")]
    assert dropped and float(dropped[0].split()[-1]) == 15


# -- feedback and performance ---------------------------------------------------------------

def _feedback_loop(srv: Server, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve in-range and shifted rows, post their true prices, return GET /performance."""
    holdout, serve = _data.holdout().sample(300, random_state=4), _data.serve()
    shifted = serve[serve["carat"] >= 1.0].sample(300, random_state=4)
    both = pd.concat([holdout, shifted], ignore_index=True)
    answers = _send(srv, _data.features(both), batch=25, headers=headers)
    offset = 0
    for a in answers:
        n = len(a["predictions"])
        outcomes = both["price"].iloc[offset:offset + n].astype(float).tolist()
        r = httpx.post(srv.url + "/feedback", json={"request_id": a["request_id"], "outcomes": outcomes},
                       headers=headers, timeout=30.0)
        assert r.status_code == 200, r.text
        assert r.json()["stored"] == n
        offset += n
    perf = httpx.get(srv.url + "/performance", timeout=30.0).json()
    perf["_routes"] = [r for a in answers for r in a["routes"]]
    return perf


def _assert_fallback_helps(perf: dict[str, Any]) -> None:
    routes = perf.pop("_routes")
    assert perf["rows_with_outcomes"] == 600
    fb = perf["by_route"]["fallback"]
    assert fb["rows"] == routes.count("fallback") and fb["rows"] >= 290
    assert fb["fallback"]["mae"] < fb["primary"]["mae"], fb
    assert perf["decision_impact"]["guarded_better"] is True
    assert perf["by_route"]["primary"]["rows"] == routes.count("primary")
    assert perf["baseline"]["primary"]["mae"] > 0


def test_outcomes_show_the_fallback_beat_the_primary_on_shifted_rows(tmp_path: Path) -> None:
    with Server(write_config(tmp_path, **FAST)) as srv:
        perf = _feedback_loop(srv)
        metrics = httpx.get(srv.url + "/metrics").text
    _assert_fallback_helps(perf)
    assert 'guarded_serving_live_metric{metric="mae",model="diamonds-price",role="fallback",route="fallback"}' in metrics


@pytest.mark.postgres
def test_outcomes_and_performance_against_postgresql(tmp_path: Path, pg_schema: str) -> None:
    cfg = write_config(tmp_path, store={"url": PG_URL, "table_prefix": pg_schema, "flush_seconds": 0.3})
    with Server(cfg) as srv:
        perf = _feedback_loop(srv)
    _assert_fallback_helps(perf)


def test_feedback_bad_input_and_token(tmp_path: Path) -> None:
    token = "s3cret-token"
    with Server(write_config(tmp_path, **FAST), env={"GUARDED_SERVING_TOKEN": token}) as srv:
        auth = {"Authorization": f"Bearer {token}"}
        a = _send(srv, _data.features(_data.holdout()).head(2))[0]  # /predict stays open
        rid = a["request_id"]

        def fb(body: Any, headers: dict[str, str] | None = auth) -> httpx.Response:
            return httpx.post(srv.url + "/feedback", json=body, headers=headers, timeout=30.0)

        r = fb({"request_id": rid, "outcomes": [500.0, 600.0]}, headers=None)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert fb({"request_id": rid, "outcomes": [500.0, 600.0]},
                  {"Authorization": "Bearer nope"}).status_code == 401
        r = fb({"request_id": "no-such-request", "outcomes": [1.0]})
        assert r.status_code == 404 and "no-such-request" in json.dumps(r.json())
        r = fb({"items": [{"request_id": rid, "row": 7, "outcome": 1.0}]})
        assert r.status_code == 404 and "row 7" in json.dumps(r.json())
        r = fb({"request_id": rid, "outcomes": ["cheap", 600.0]})
        assert r.status_code == 422 and r.json()["problems"][0]["row"] == 0
        assert fb({"request_id": rid, "outcomes": "x"}).status_code == 400
        r = fb({"request_id": rid, "outcomes": [500.0, 600.0]})
        assert r.status_code == 200 and r.json()["stored"] == 2
        r = fb({"request_id": rid, "outcomes": [500.0, 600.0]})
        assert r.status_code == 200 and r.json()["stored"] == 0 and r.json()["unchanged"] == 2
        r = fb({"items": [{"request_id": rid, "row": 1, "outcome": 650.0}]})
        assert r.status_code == 409 and r.json()["problems"][0]["expected"] in ("600.0", 600.0)
        r = fb({"items": [{"request_id": rid, "row": 1, "outcome": 650.0}], "overwrite": True})
        assert r.status_code == 200 and r.json()["overwritten"] == 1


def test_acknowledged_outcomes_survive_sigkill(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, **FAST)
    srv = Server(cfg, workers=2).start()
    answers = _send(srv, _data.features(_data.holdout()).head(1000), batch=5, threads=8)
    acked: list[tuple[str, list[float]]] = []
    stop = threading.Event()

    def feed(part: list[dict[str, Any]]) -> None:
        with httpx.Client(timeout=10.0) as c:
            for a in part:
                if stop.is_set():
                    return
                outcomes = [float(1000 + i) for i in range(len(a["predictions"]))]
                try:
                    r = c.post(srv.url + "/feedback", json={"request_id": a["request_id"], "outcomes": outcomes})
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    acked.append((a["request_id"], outcomes))

    threads = [threading.Thread(target=feed, args=(answers[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill()  # SIGKILL to the whole process group, mid-load
    stop.set()
    for t in threads:
        t.join()
    assert 60 <= len(acked) < len(answers)
    store = Store(load_config(cfg).store.url)
    got = store.outcome_rows()
    stored = {(r.request_id, r.row): r.outcome for r in got.itertuples()}
    for rid, outcomes in acked:
        for i, o in enumerate(outcomes):
            assert stored.get((rid, i)) == o, f"acknowledged outcome {rid}/{i} lost"
    srv2 = Server(cfg).start()  # and the service comes back on the same store
    try:
        r = httpx.post(srv2.url + "/feedback", json={"request_id": acked[0][0], "outcomes": acked[0][1]})
        assert r.status_code == 200 and r.json()["unchanged"] == len(acked[0][1])
    finally:
        srv2.stop()


def test_a_slow_store_never_slows_predict_and_drops_are_counted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, prediction_log={"queue_size": 20, "batch_size": 10}, max_rows=20, **FAST)
    row = _data.json_rows(_data.features(_data.holdout()).head(1))
    with Server(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30.0) as c:
        def latencies(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                assert c.post("/predict", json={"rows": row}).status_code == 200
                out.append(time.perf_counter() - t0)
            return out

        latencies(30)
        normal = latencies(200)
        # Another process takes the SQLite file's write lock and keeps it: every write waits.
        db = sqlite3.connect(load_config(cfg).store.url.removeprefix("sqlite:///"), timeout=30)
        db.execute("BEGIN EXCLUSIVE")
        try:
            blocked = latencies(200)
        finally:
            db.rollback()
            db.close()
        metrics = c.get("/metrics").text
    assert statistics.median(blocked) < statistics.median(normal) * 1.5 + 0.002
    assert max(blocked) < 1.0
    dropped = [line for line in metrics.splitlines()
               if line.startswith("guarded_serving_prediction_log_dropped_rows_total{")]
    assert dropped and float(dropped[0].split()[-1]) > 0
