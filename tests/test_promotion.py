"""Promotion and rollback: switch events in the store, followed by every runtime sharing it;
requests in flight finish on the model set they started with (in process, temporary SQLite)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from guarded_serving.config import load_config
from guarded_serving.errors import ConflictError
from guarded_serving.promotion import Action, current_switch, promote, rollback, switches
from guarded_serving.report import build_report
from guarded_serving.runtime import ServingRuntime, new_request_id

from ._data import EXAMPLE, features, json_rows, serve
from .conftest import wait_until
from .server import ROOT, Server, predict_with_outcomes, write_config
from .test_monitoring import PG_URL, pg_schema  # noqa: F401 - the fixture

CHALLENGER = {
    "path": str(EXAMPLE / "fallback.onnx"),
    "version": "c1",
    "profile": str(EXAMPLE / "profile.json"),
}


def _config(tmp_path: Path, **overrides: object):  # noqa: ANN202
    return load_config(write_config(tmp_path, **{"challenger": CHALLENGER, **overrides}))


def _version(rt: ServingRuntime) -> str:
    return rt.predict(
        json_rows(features(serve()).head(2)), request_id=new_request_id()
    ).primary_version


def test_promote_then_rollback_switches_every_runtime_on_the_store(tmp_path: Path) -> None:
    config = _config(tmp_path, primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"})
    a, b = ServingRuntime(config), ServingRuntime(config)
    assert _version(a) == _version(b) == "p1"
    ev = a.switch(Action.PROMOTE, actor="test", reason="replay better")
    assert (ev["action"], ev["from_version"], ev["to_version"], ev["serving_version"]) == (
        "promote",
        "p1",
        "c1",
        "c1",
    )
    assert _version(a) == "c1", "the process that recorded it follows at once"
    assert wait_until(lambda: _version(b) == "c1", 5), "another process within seconds"
    result = b.predict(json_rows(features(serve()).head(3)), request_id=new_request_id())
    assert result.to_dict()["primary_version"] == "c1"
    # The promoted model serves (the example's fallback, answering where the checks pass).
    assert (
        result.primary_predictions[result.routes == "primary"]
        == result.predictions[result.routes == "primary"]
    ).all()
    with pytest.raises(ConflictError, match="already the primary"):
        promote(a.store(), config, actor="test")
    rollback(a.store(), config, actor="test", reason="worse on outcomes")
    assert wait_until(lambda: _version(a) == _version(b) == "p1", 5)
    with pytest.raises(ConflictError, match="nothing to roll back"):
        rollback(a.store(), config, actor="test")
    history = switches(a.store())
    assert [(e.action, e.from_version, e.to_version, e.actor) for e in history] == [
        (Action.ROLLBACK, "c1", "p1", "test"),
        (Action.PROMOTE, "p1", "c1", "test"),
    ]
    assert history[1].reason == "replay better"
    perf = a.performance()
    assert perf["primary_version"] == "p1"
    assert [(e["action"], e["actor"], e["reason"]) for e in perf["switches"]] == [
        ("rollback", "test", "worse on outcomes"),
        ("promote", "test", "replay better"),
    ]
    # A process that starts after a promotion serves the promoted set from its first request.
    promote(a.store(), config, actor="test")
    late = ServingRuntime(config)
    assert _version(late) == "c1"
    for rt in (a, b, late):
        rt.close()


def test_the_log_names_the_primary_that_served_each_row(tmp_path: Path) -> None:
    config = _config(tmp_path, primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"})
    rt = ServingRuntime(config)
    before, after = new_request_id(), new_request_id()
    rows = json_rows(features(serve()).head(4))
    rt.predict(rows, request_id=before)
    assert rt.recorder.flush(10)
    rt.switch(Action.PROMOTE, actor="test")
    rt.predict(rows, request_id=after)
    assert rt.recorder.flush(10)
    df = rt.store().joined()
    versions = dict(zip(df["request_id"], df["primary_version"], strict=True))
    assert versions[before] == "p1" and versions[after] == "c1"
    assert df.loc[df["request_id"] == before, "challenger_prediction"].notna().all()
    # Once promoted, the challenger is the primary: it is no longer scored as a challenger.
    assert df.loc[df["request_id"] == after, "challenger_prediction"].isna().all()
    rt.close()


def test_requests_in_flight_finish_on_the_model_they_started_with(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        primary={"callable": "tests.models_for_tests:slow_primary", "version": "slow"},
        latency_budget_ms=None,
    )
    rt = ServingRuntime(config)
    rows = json_rows(features(serve()).head(3))
    out: dict[str, object] = {}
    started = threading.Event()

    def call() -> None:
        started.set()
        out["result"] = rt.predict(rows, request_id=new_request_id())

    t = threading.Thread(target=call)
    t.start()
    started.wait()
    rt.switch(Action.PROMOTE, actor="test")  # while the slow primary (0.5 s) is still answering
    t.join(10)
    result = out["result"]
    assert result.primary_version == "slow"  # type: ignore[attr-defined]
    assert (result.predictions[result.routes == "primary"] == 1.0).all()  # type: ignore[attr-defined]
    assert _version(rt) == "c1"
    rt.close()


def test_a_set_that_cannot_load_leaves_the_old_one_serving(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    config = _config(tmp_path, primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"})
    rt = ServingRuntime(config)
    bad = _config(tmp_path, challenger={**CHALLENGER, "path": str(broken), "version": "bad"})
    promote(rt.store(), bad, actor="test")
    assert wait_until(lambda: rt.switch_failures == 1, 5)
    assert _version(rt) == "p1" and current_switch(rt.store()).to_version == "bad"
    rt.close()


def test_concurrent_switches_are_recorded_once(tmp_path: Path) -> None:
    config = _config(tmp_path, primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"})
    rt = ServingRuntime(config)
    store = rt.store()
    results: list[object] = []

    def go() -> None:
        try:
            results.append(promote(store, config, actor="race"))
        except ConflictError as e:
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(switches(store)) == 1
    assert sum(not isinstance(r, ConflictError) for r in results) == 1
    rt.close()


def constant(data):  # noqa: ANN001, ANN201 - a poor primary, for auto-promotion to beat
    return data["carat"].to_numpy() * 0.0 + 1.0


def test_auto_promotion_once_the_challenger_is_better_on_enough_outcomes(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        primary={"callable": "tests.test_promotion:constant", "version": "const"},
        challenger={**CHALLENGER, "path": str(EXAMPLE / "primary.onnx")},
        auto_promote={"enabled": True, "min_outcomes": 100},
    )
    rt = ServingRuntime(config)
    df = serve().head(200)
    rows, price = json_rows(features(df)), df["price"].tolist()
    ids = [new_request_id() for _ in range(20)]
    for i, rid in enumerate(ids[:5]):
        rt.predict(rows[i * 10 : (i + 1) * 10], request_id=rid)
    assert rt.recorder.flush(10)
    rt.feedback(
        [(rid, j, float(price[i * 10 + j])) for i, rid in enumerate(ids[:5]) for j in range(10)]
    )
    assert rt.performance()["challenger"]["n"] == 50 and _version(rt) == "const", (
        "too few outcomes yet"
    )
    for i, rid in enumerate(ids[5:], start=5):
        rt.predict(rows[i * 10 : (i + 1) * 10], request_id=rid)
    assert rt.recorder.flush(10)
    rt.feedback(
        [(rid, j, float(price[i * 10 + j])) for i, rid in enumerate(ids) for j in range(10)][50:]
    )
    perf = rt.performance()
    assert perf["challenger"]["verdict"] == "better"
    assert _version(rt) == "c1"
    (ev,) = switches(rt.store())
    assert ev.actor == "auto_promote" and ev.action == Action.PROMOTE
    rt.performance()
    assert len(switches(rt.store())) == 1, "recorded once"
    html = build_report(config)  # the report shows the verdict and the switch
    assert "id=challenger" in html and "id=switches" in html and "auto_promote" in html
    rt.close()


# -- end to end, over HTTP ---------------------------------------------------------------------

TOKEN = "promote-t0ken"


@contextmanager
def _steady_load(
    urls: list[str], threads: int = 4
) -> Iterator[list[tuple[float, int, str | None]]]:
    """One-row requests in a loop from ``threads`` clients spread over ``urls``, until the block
    ends: (time answered, status, primary_version) per request."""
    rows = json_rows(features(serve()).head(50))
    out: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=urls[k % len(urls)], timeout=30.0) as c:
            i = k
            while not stop.is_set():
                r = c.post("/predict", json={"rows": [rows[i % len(rows)]]})
                out.append(
                    (
                        time.time(),
                        r.status_code,
                        r.json().get("primary_version") if r.status_code == 200 else None,
                    )
                )
                i += threads

    with ThreadPoolExecutor(threads) as ex:
        for k in range(threads):
            ex.submit(client, k)
        try:
            yield out
        finally:
            stop.set()


def _switched_within(
    answers: list[tuple[float, int, str | None]], t0: float, version: str
) -> float:
    """Seconds from ``t0`` (wall clock: the switch's ts in the store) to the last answer naming
    another version (0 when none came after t0)."""
    stale = [t for t, _, v in answers if t > t0 and v != version]
    return max(stale) - t0 if stale else 0.0


def _serving(srv: Server, version: str) -> float:
    """Workers serving ``version``, as guarded_serving_primary_info adds them up."""
    for line in httpx.get(srv.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("guarded_serving_primary_info{") and f'version="{version}"' in line:
            return float(line.split()[-1])
    return 0.0


def _cli_switch(action: str, config: Path, reason: str) -> float:
    """``guarded-serving ACTION CONFIG`` run as an operator would; when the switch was recorded."""
    done = subprocess.run(
        [sys.executable, "-m", "guarded_serving.cli", action, str(config), "--reason", reason, "--json"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    return float(json.loads(done.stdout)["ts"])


@pytest.mark.e2e
def test_promote_and_rollback_under_load_over_http(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        challenger=CHALLENGER,
        store={"flush_seconds": 0.3},
        primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"},
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Server(cfg, workers=2, env={"GUARDED_SERVING_TOKEN": TOKEN}) as srv:
        df = serve().head(200)
        with httpx.Client(base_url=srv.url, timeout=30.0, headers=auth) as c:
            body = predict_with_outcomes(c, df)
            assert body["primary_version"] == "p1"
            perf = c.get("/performance").json()
            assert (
                perf["overall"]["challenger"]["n"] == 200 and perf["challenger"]["version"] == "c1"
            )
            assert "intervals" in perf["challenger"]
            assert httpx.post(srv.url + "/admin/promote").status_code == 401, (
                "the token is required"
            )
            with _steady_load([srv.url]) as answers:
                wait_until(lambda: len(answers) > 200, 30)
                t0 = time.time()
                ev = c.post("/admin/promote", json={"reason": "e2e", "actor": "pytest"})
                assert ev.status_code == 200, ev.text
                assert ev.json()["to_version"] == "c1"
                wait_until(lambda: _serving(srv, "c1") == 2, 10)
                time.sleep(1.0)
                promoted = _switched_within(answers, t0, "c1")
                t1 = _cli_switch("rollback", cfg, "e2e")
                wait_until(lambda: _serving(srv, "p1") == 2, 10)
                time.sleep(1.0)
                rolled_back = _switched_within(answers, t1, "p1")
            statuses = [s for _, s, _ in answers]
            metrics = httpx.get(srv.url + "/metrics").text
        print(
            f"\n{len(answers)} answers, non-2xx {sum(s >= 300 for s in statuses)}; promote followed "
            f"by every answer within {promoted:.2f} s, rollback within {rolled_back:.2f} s"
        )
        assert all(200 <= s < 300 for s in statuses)
        assert promoted < 5.0 and rolled_back < 5.0
        assert 'action="promote"' in metrics and 'action="rollback"' in metrics


@pytest.mark.e2e
@pytest.mark.postgres
def test_two_service_processes_on_postgresql_switch_together(
    tmp_path: Path,
    pg_schema: str,  # noqa: F811 - the fixture
) -> None:
    store = {"url": PG_URL, "table_prefix": pg_schema, "flush_seconds": 0.3}
    servers = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        servers.append(
            Server(
                write_config(
                    tmp_path / d,
                    challenger=CHALLENGER,
                    store=store,
                    primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"},
                )
            )
        )
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda s: s.start(), servers))
    try:
        with _steady_load([s.url for s in servers]) as answers:
            wait_until(lambda: len(answers) > 100, 30)
            t0 = _cli_switch("promote", servers[0].config, "two replicas")
            for s in servers:
                wait_until(lambda s=s: _serving(s, "c1") == 1, 10)
            time.sleep(1.0)
            within = _switched_within(answers, t0, "c1")
        print(f"\n{len(answers)} answers over two processes; both serve c1 within {within:.2f} s")
        assert all(200 <= s < 300 for _, s, _ in answers)
        assert within < 5.0
    finally:
        for s in servers:
            s.stop()


def test_live_estimates_follow_the_served_primarys_profile(tmp_path: Path) -> None:
    """Estimation artefacts belong to the profile they were fitted with: a promoted primary whose
    profile has none is not estimated with its predecessor's error models; a rollback brings them
    back."""
    profile = tmp_path / "challenger-profile.json"
    profile.write_bytes((EXAMPLE / "profile.json").read_bytes())  # no estimation artefacts beside it
    config = _config(tmp_path, challenger={**CHALLENGER, "profile": str(profile)},
                     primary={"path": str(EXAMPLE / "primary.onnx"), "version": "p1"})
    rt = ServingRuntime(config)
    assert rt.estimates is not None and rt.estimates.estimator is not None
    rt.switch(Action.PROMOTE, actor="test")
    assert _version(rt) == "c1" and rt.estimates.estimator is None
    rt.switch(Action.ROLLBACK, actor="test")
    assert _version(rt) == "p1" and rt.estimates.estimator is not None
    rt.close()
