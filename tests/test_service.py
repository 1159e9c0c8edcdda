"""End-to-end: the real BentoML service over real HTTP, spans decoded from the OTLP wire."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from guarded_serving.config import load_config
from guarded_serving.guard import GuardedModel

from . import _data
from .otlp_receiver import GrpcOtlpReceiver, OtlpReceiver
from .server import Server, free_port, running, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def grpc_receiver() -> Iterator[GrpcOtlpReceiver]:
    with GrpcOtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver,
            grpc_receiver: GrpcOtlpReceiver) -> Iterator[dict[str, Server]]:
    """Services started side by side: the example traced into a live OTLP/HTTP receiver; the same
    over OTLP/gRPC; the example with its trace backend down; a primary that always raises beside a
    fragile fallback."""
    dead = free_port()  # nothing listens here
    specs = {
        "main": dict(tracing={"endpoint": receiver.endpoint}, max_rows=50),
        "grpc": dict(tracing={"endpoint": grpc_receiver.endpoint, "protocol": "grpc"}),
        "dead_backend": dict(tracing={"endpoint": f"http://127.0.0.1:{dead}/v1/traces"}),
        "broken": dict(primary={"callable": "tests.models_for_tests:raising_primary"},
                       fallback={"callable": "tests.models_for_tests:fragile_fallback"}),
    }
    srvs = {}
    for name, overrides in specs.items():
        d = tmp_path_factory.mktemp(name)
        srvs[name] = Server(write_config(d, **overrides))
    # No tracing in the serving config: BentoML's own tracing settings, as a BentoML user writes them.
    d = tmp_path_factory.mktemp("bentoml_tracing")
    bentoml_config = d / "bentoml_configuration.yaml"
    bentoml_config.write_text(
        "services:\n  GuardedService:\n    tracing:\n      exporter_type: otlp\n      sample_rate: 1.0\n"
        f"      otlp:\n        protocol: http\n        endpoint: {receiver.endpoint}\n"
    )
    srvs["bentoml_tracing"] = Server(write_config(d), env={"BENTOML_CONFIG": str(bentoml_config)})
    with running(srvs):
        yield srvs


@pytest.fixture(scope="module")
def main(servers: dict[str, Server]) -> Server:
    return servers["main"]


def post(srv: Server, path: str, body: Any = None, **kw: Any) -> httpx.Response:
    if body is not None and "content" not in kw:
        kw["json"] = body
    return httpx.post(srv.url + path, timeout=30.0, **kw)


def test_in_range_rows_are_served_by_the_primary_as_in_process(main: Server) -> None:
    df = _data.features(_data.holdout()).head(40)
    r = post(main, "/predict", {"rows": _data.json_rows(df)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"request_id", "predictions", "routes", "reasons", "timing_ms"}
    assert set(body["timing_ms"]) == {"validate", "primary", "fallback", "total"}
    assert r.headers["x-request-id"] == body["request_id"]
    local = GuardedModel.from_config(load_config(_data.CONFIG)).predict(df)
    assert body["routes"] == local.routes.tolist()
    assert body["routes"].count("primary") >= 39
    np.testing.assert_allclose(body["predictions"], local.predictions, rtol=1e-6)


def test_out_of_range_rows_go_to_the_fallback_with_reasons(main: Server) -> None:
    df = _data.features(_data.serve())
    big = df[df["carat"] > 2.0].head(5)
    r = post(main, "/predict", {"rows": _data.json_rows(big)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["routes"] == ["fallback"] * 5
    assert all("out_of_range:carat" in reasons for reasons in body["reasons"])
    assert all(isinstance(p, float) and p > 0 for p in body["predictions"])


def test_client_request_id_is_kept(main: Server) -> None:
    row = _data.json_rows(_data.features(_data.holdout()).head(1))
    r = post(main, "/predict", {"rows": row}, headers={"X-Request-ID": "order-42"})
    assert r.status_code == 200
    assert r.json()["request_id"] == "order-42" == r.headers["x-request-id"]


def test_schema_violation_is_422_naming_row_column_and_problem(main: Server) -> None:
    rows = _data.json_rows(_data.features(_data.holdout()).head(3))
    del rows[0]["depth"]
    rows[2]["carat"] = "heavy"
    r = post(main, "/predict", {"rows": rows})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "schema_violation" and body["request_id"]
    where = {(p["row"], p["column"]) for p in body["problems"]}
    assert {(0, "depth"), (2, "carat")} <= where
    bad = next(p for p in body["problems"] if p["column"] == "carat")
    assert bad["got"] == "heavy" and bad["expected"]


def test_on_reject_mark_answers_the_valid_rows(main: Server) -> None:
    rows = _data.json_rows(_data.features(_data.holdout()).head(3))
    rows[1]["carat"] = "heavy"
    r = post(main, "/predict", {"rows": rows, "on_reject": "mark"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["routes"][1] == "rejected" and body["predictions"][1] is None
    assert body["routes"][0] == "primary" and body["problems"][0]["row"] == 1


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b'[{"carat": 1}]', '"rows"'),
        (b'{"rows": {"carat": 1}}', "list"),
        (b'{"rows": [1, 2]}', "not JSON objects"),
    ],
)
def test_malformed_bodies_are_400(main: Server, content: bytes, needle: str) -> None:
    r = post(main, "/predict", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and needle in r.json()["message"]


def test_oversize_batch_is_413(main: Server) -> None:
    rows = _data.json_rows(_data.features(_data.holdout()).head(51))  # max_rows is 50 in this config
    r = post(main, "/predict", {"rows": rows})
    assert r.status_code == 413
    assert r.json()["error"] == "batch_too_large" and "50" in r.json()["message"]


def test_profile_summary(main: Server) -> None:
    r = httpx.get(main.url + "/profile")
    assert r.status_code == 200
    body = r.json()
    assert body["task"] == "regression" and body["model"] == "diamonds-price"
    assert [f["name"] for f in body["features"]][:2] == ["carat", "depth"]
    assert body["baseline"]["primary"]["mae"] > 0


def test_bad_input_never_kills_a_worker(main: Server) -> None:
    for content in (b"\xff\xfe", b"{" * 10000, b'{"rows": [{"carat": [[[]]]}]}', b'{"rows": [{"carat": 1e400}]}'):
        r = post(main, "/predict", content=content, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (content[:20], r.status_code, r.text)
    assert httpx.get(main.url + "/livez").status_code == 200
    ok = post(main, "/predict", {"rows": _data.json_rows(_data.features(_data.holdout()).head(1))})
    assert ok.status_code == 200


def test_metrics_count_routes_reasons_and_stages(main: Server) -> None:
    big = _data.features(_data.serve())
    post(main, "/predict", {"rows": _data.json_rows(big[big["carat"] > 2.0].head(3))})
    text = httpx.get(main.url + "/metrics").text
    assert 'guarded_serving_rows_total{model="diamonds-price",route="fallback"}' in text
    assert 'guarded_serving_flags_total{feature="carat",model="diamonds-price",reason="out_of_range"}' in text
    assert 'guarded_serving_stage_duration_seconds_bucket{le="0.001",model="diamonds-price",stage="validate"}' in text
    assert 'guarded_serving_requests_total{model="diamonds-price",status="422"}' in text


def _guard_span(receiver: OtlpReceiver, request_id: str) -> tuple[list[Any], Any]:
    """Every span received once the guard's span of ``request_id`` is in, and that span."""

    def is_it(s: Any) -> bool:
        return bool(s.name == "guarded_serving.predict" and s.attributes.get("guarded_serving.request.id") == request_id)

    spans = receiver.wait_for(lambda spans: any(is_it(s) for s in spans))
    return spans, next(s for s in spans if is_it(s))


def test_spans_arrive_over_otlp_with_parent_links_and_attributes(main: Server, receiver: OtlpReceiver) -> None:
    big = _data.features(_data.serve())
    rows = _data.json_rows(_data.features(_data.holdout()).head(2)) + _data.json_rows(big[big["carat"] > 2.0].head(1))
    r = post(main, "/predict", {"rows": rows}, headers={"X-Request-ID": "trace-me-1"})
    assert r.status_code == 200

    spans, root = _guard_span(receiver, "trace-me-1")
    assert root.attributes["guarded_serving.rows"] == 3
    assert root.attributes["guarded_serving.rows.primary"] == 2
    assert root.attributes["guarded_serving.rows.fallback"] == 1
    assert "out_of_range:carat" in root.attributes["guarded_serving.reasons"]
    assert root.attributes["guarded_serving.model.name"] == "diamonds-price"
    children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    # Shadow predictions run later, in the background, outside the request's trace.
    assert set(children) == {"guarded_serving.validate", "guarded_serving.primary", "guarded_serving.fallback"}
    assert all(c.trace_id == root.trace_id for c in children.values())
    assert children["guarded_serving.primary"].attributes["guarded_serving.model.name"] == "diamonds-gbr"
    # The request span is BentoML's HTTP server span, with OTel HTTP semantic conventions.
    http = next(s for s in spans if s.span_id == root.parent_span_id)
    assert http.kind == 2  # SERVER
    assert http.attributes.get("http.method", http.attributes.get("http.request.method")) == "POST"
    assert root.resource.get("service.name")


def test_bentoml_own_tracing_settings_carry_the_guard_spans(servers: dict[str, Server], receiver: OtlpReceiver) -> None:
    r = post(servers["bentoml_tracing"], "/predict", {"rows": _data.json_rows(_data.features(_data.holdout()).head(1))},
             headers={"X-Request-ID": "bentoml-config-1"})
    assert r.status_code == 200

    spans, root = _guard_span(receiver, "bentoml-config-1")
    assert {s.name for s in spans if s.parent_span_id == root.span_id} == {"guarded_serving.validate", "guarded_serving.primary"}
    http = next(s for s in spans if s.span_id == root.parent_span_id)
    assert http.kind == 2 and http.trace_id == root.trace_id


def test_spans_also_export_over_otlp_grpc(servers: dict[str, Server], grpc_receiver: GrpcOtlpReceiver) -> None:
    rows = _data.json_rows(_data.features(_data.holdout()).head(1))
    assert post(servers["grpc"], "/predict", {"rows": rows}, headers={"X-Request-ID": "grpc-1"}).status_code == 200
    spans = grpc_receiver.wait_for(lambda ss: any(
        s.attributes.get("guarded_serving.request.id") == "grpc-1" and s.name == "guarded_serving.predict" for s in ss))
    root = next(s for s in spans if s.attributes.get("guarded_serving.request.id") == "grpc-1"
                and s.name == "guarded_serving.predict")
    assert {s.name for s in spans if s.parent_span_id == root.span_id} == {
        "guarded_serving.validate", "guarded_serving.primary"}


def test_a_raising_primary_still_gets_fallback_answers(servers: dict[str, Server]) -> None:
    srv = servers["broken"]
    rows = _data.json_rows(_data.features(_data.holdout()).head(4))
    r = post(srv, "/predict", {"rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["routes"] == ["fallback"] * 4
    assert all("primary_error" in reasons for reasons in body["reasons"])


def test_fallback_failure_is_503_naming_the_request(servers: dict[str, Server]) -> None:
    srv = servers["broken"]
    row = _data.json_rows(_data.features(_data.serve()).query("carat > 3.0").head(1))
    r = post(srv, "/predict", {"rows": row}, headers={"X-Request-ID": "doomed-1"})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "fallback_failed" and r.json()["request_id"] == "doomed-1"
    assert post(srv, "/predict", {"rows": _data.json_rows(_data.features(_data.holdout()).head(1))}).status_code == 200


def _latencies(srv: Server, rows: list[dict[str, Any]], n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=srv.url, timeout=30.0) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/predict", json={"rows": rows})
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200
    return out


def test_trace_backend_down_adds_no_latency(servers: dict[str, Server]) -> None:
    rows = _data.json_rows(_data.features(_data.holdout()).head(1))
    live, dead = servers["main"], servers["dead_backend"]
    _latencies(live, rows, 20), _latencies(dead, rows, 20)  # warm up
    a, b = [], []
    for _ in range(3):  # interleave so machine noise hits both alike
        a += _latencies(live, rows, 100)
        b += _latencies(dead, rows, 100)
    med_live, med_dead = statistics.median(a), statistics.median(b)
    assert med_dead < med_live * 1.3 + 0.002, (med_live, med_dead)
    assert max(b) < 5.0  # no request waits for an exporter timeout


def test_logs_have_no_tracebacks(servers: dict[str, Server]) -> None:
    for name, srv in servers.items():
        assert "Traceback" not in srv.logs() or name == "broken", srv.logs()
