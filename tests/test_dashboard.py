"""The Grafana dashboard in deploy/grafana: its shape, and every query of it evaluated by a real
Prometheus (Debian's package) that scraped the real service.

No Grafana is to be had from this machine's registries, so Grafana itself is not started; what can
go wrong with a dashboard that loads is its PromQL (a metric renamed, a label misspelled, a query
that parses but matches nothing), and that is what Prometheus answers here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from . import _data
from .server import ROOT, Server, free_port, write_config

DASHBOARD = ROOT / "deploy" / "grafana" / "guarded-serving.json"
MODEL = "diamonds-price"
#: Panels that stay empty on healthy traffic: nothing failed, nothing was dropped.
QUIET = {"Primary errors and latency-budget misses", "Rows not logged", "Estimate on flagged rows"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


def test_dashboard_is_importable_and_parameterised() -> None:
    d = _dashboard()
    assert d["uid"] == "guarded-serving" and d["panels"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["includeAll"] and variables["model"]["multi"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            # Every query follows the model picker, so one dashboard serves every guarded model.
            assert 'model=~"$model"' in t["expr"], (p["title"], t["expr"])
    # Each metric the service exports is on the dashboard.
    exprs = " ".join(e for _, e in _queries())
    for name in ("requests_total", "stage_duration_seconds_bucket", "rows_total", "flags_total",
                 "primary_errors_total", "latency_budget_misses_total", "drift_status", "drift_psi",
                 "retrain_recommended", "drift_window_rows", "live_metric", "prediction_log_dropped_rows_total",
                 "prediction_log_lost_rows_total",
                 "estimated_metric", "estimated_metric_band", "estimated_rows"):
        assert f"guarded_serving_{name}" in exprs, name


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("Prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    return path


class Prometheus:
    """Debian's Prometheus scraping ``target`` every second, on a free loopback port."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: guarded-serving\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10.0)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                if httpx.get(self.url + "/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("prometheus not ready")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _grafana_to_promql(expr: str) -> str:
    # What Grafana substitutes before it sends a query: the model picker ("All" is .*) and the
    # rate window (at least four scrape intervals).
    return expr.replace("$model", MODEL).replace("$__rate_interval", "15s")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("dashboard")
    cfg = write_config(tmp, drift={"window_rows": 300, "min_rows": 200}, store={"flush_seconds": 0.3})
    holdout = _data.holdout().sample(900, random_state=5)
    big = _data.serve()
    big = big[big["carat"] >= 1.5].head(20)
    with Server(cfg, workers=2) as srv:
        prom = Prometheus(prometheus_binary, srv.url.removeprefix("http://"), tmp)
        try:
            prom.wait_ready()
            answers = []
            for chunk in [holdout.iloc[i:i + 50] for i in range(0, len(holdout), 50)] + [big]:
                r = httpx.post(srv.url + "/predict", json={"rows": _data.json_rows(_data.features(chunk))}, timeout=30)
                assert r.status_code == 200, r.text
                answers.append((r.json()["request_id"], chunk[_data.TARGET].tolist()))
            for rid, outcomes in answers:
                r = httpx.post(srv.url + "/feedback", json={"request_id": rid, "outcomes": outcomes}, timeout=30)
                assert r.status_code == 200, r.text
            # Keep traffic flowing while Prometheus takes enough scrapes for rate() over 15 s.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                httpx.post(srv.url + "/predict", json={"rows": _data.json_rows(_data.features(big.head(2)))}, timeout=30)
                httpx.get(srv.url + "/drift", timeout=30)  # /drift evaluates, setting the drift gauges
                httpx.get(srv.url + "/performance", timeout=30)
                time.sleep(0.5)
            yield prom
        finally:
            prom.close()


@pytest.mark.e2e
@pytest.mark.parametrize(("title", "expr"), _queries(), ids=[t for t, _ in _queries()])
def test_every_dashboard_query_is_answered_by_prometheus(scraped: Prometheus, title: str, expr: str) -> None:
    result = scraped.query(_grafana_to_promql(expr))
    if title not in QUIET:
        assert result, f"{title}: {expr} matched nothing after real traffic"
        for series in result:
            assert re.fullmatch(r"-?[\d.e+-]+|NaN", series["value"][1]), series
