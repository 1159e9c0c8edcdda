"""End-to-end: every bad input a JSON 4xx, protected routes, limits, BentoML's clients.

One test per failure found when the service was attacked (issue 11)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException

from guarded_serving.config import load_config
from guarded_serving.service import public_paths

from . import _data
from .conftest import wait_until
from .server import Server, free_port, running, write_config

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ERROR_KEYS = {"error", "message", "problems", "request_id"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    specs: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
        "open": (dict(max_rows=50, limits={"max_body_bytes": 1_000_000, "header_timeout_seconds": 1.5}), {}),
        "locked": (dict(auth={"max_failures": 5, "failure_window_seconds": 60}), {"GUARDED_SERVING_TOKEN": TOKEN}),
        "dead_store": (dict(store={"url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"}), {}),
    }
    srvs = {name: Server(write_config(tmp_path_factory.mktemp(name), **cfg), env=env)
            for name, (cfg, env) in specs.items()}
    with running(srvs):
        yield srvs


@pytest.fixture(scope="module")
def srv(servers: dict[str, Server]) -> Server:
    return servers["open"]


def rows(n: int = 1) -> list[dict[str, Any]]:
    return _data.json_rows(_data.features(_data.holdout()).head(n))


def post(srv: Server, path: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(srv.url + path, content=content, timeout=30.0,
                      headers={"Content-Type": "application/json", **(headers or {})})


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) <= ERROR_KEYS and {"error", "message"} <= set(body), body
    if code:
        assert body["error"] == code, body
    return body


def test_huge_integer_is_422_not_500(srv: Server) -> None:
    raw = json.dumps({"rows": rows()}).encode().replace(b'"carat":', b'"carat":' + b"9" * 401 + b",\"_\":", 1)
    body = assert_error(post(srv, "/predict", raw), 422, "schema_violation")
    assert body["problems"][0]["column"] == "carat"


def test_deep_nesting_is_400_not_500(srv: Server) -> None:
    assert_error(post(srv, "/predict", b"[" * 10_000 + b"]" * 10_000), 400, "bad_request")
    assert_error(post(srv, "/predict", b'{"rows": [' + b"[" * 5000 + b"]" * 5000 + b"]}"), 400)


def test_lone_surrogate_is_422_not_a_fallback_failure(srv: Server) -> None:
    r = rows()
    r[0]["cut"] = "\ud800"
    body = assert_error(post(srv, "/predict", json.dumps({"rows": r}).encode()), 422, "schema_violation")
    assert body["problems"][0]["column"] == "cut"
    assert 'guarded_serving_requests_total{model="diamonds-price",status="503"}' not in httpx.get(srv.url + "/metrics").text


def test_feedback_bad_numbers_and_ids_are_json_4xx(srv: Server) -> None:
    assert_error(post(srv, "/feedback", b'{"request_id": "abc", "outcomes": [1' + b"0" * 400 + b"]}"), 422)
    assert_error(post(srv, "/feedback", json.dumps({"request_id": "\ud800", "outcomes": [1]}).encode()), 400)


@pytest.mark.parametrize("query", ["window_rows=inf", "window_rows=nan", "window_rows=0", "window_rows=1e400",
                                   "since=nan", "since=-inf", "window_rows=%ED%A0%80"])
def test_bad_query_parameters_are_400(srv: Server, query: str) -> None:
    assert_error(httpx.get(f"{srv.url}/performance?{query}"), 400, "bad_request")


def test_client_disconnect_is_not_a_server_error(srv: Server) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"rows\": [")
        time.sleep(0.3)
    def counted() -> str | None:
        text = httpx.get(srv.url + "/metrics").text
        return text if 'status="499"' in text else None

    metrics = wait_until(counted, 10)
    assert 'guarded_serving_requests_total{model="diamonds-price",status="500"}' not in metrics
    assert "Traceback" not in srv.logs() and "[ERROR]" not in srv.logs()


def test_body_over_the_byte_limit_is_413_unread(srv: Server) -> None:
    t0 = time.perf_counter()
    assert_error(post(srv, "/predict", b" " * 50_000_000), 413, "payload_too_large")
    assert time.perf_counter() - t0 < 10
    chunked = httpx.post(srv.url + "/predict", content=iter([b" " * 600_000] * 3),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(chunked, 413, "payload_too_large")


def test_too_many_rows_is_413_before_parsing(srv: Server) -> None:
    raw = json.dumps({"rows": [{}] * 100_000}).encode()
    assert_error(post(srv, "/predict", raw), 413, "batch_too_large")


def test_long_category_is_422_and_never_logged(srv: Server) -> None:
    r = rows()
    r[0]["cut"] = "x" * 1_000_000
    body = assert_error(post(srv, "/predict", json.dumps({"rows": r}).encode()), 413)  # over 1 MB here
    r[0]["cut"] = "x" * 5000
    body = assert_error(post(srv, "/predict", json.dumps({"rows": r}).encode()), 422, "schema_violation")
    assert body["problems"][0]["expected"] == "at most 1000 characters"


def test_headers_that_never_end_lose_the_connection(srv: Server) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        s.settimeout(10)
        with pytest.raises(OSError):
            for _ in range(100):
                s.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
                if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    raise OSError("closed")
        assert time.monotonic() - t0 < 6  # header_timeout_seconds is 1.5 here
    assert httpx.get(srv.url + "/livez").status_code == 200


@pytest.mark.parametrize(("content", "headers", "status", "code"), [
    (b'{"rows": []}', {}, 400, "bad_request"),
    (b"rows", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (gzip.compress(b'{"rows": [{}]}'), {"Content-Encoding": "gzip"}, 415, "unsupported_media_type"),
    (b'{"rows": [{"carat": NaN}]}', {}, 400, "bad_request"),
])
def test_bad_bodies_are_documented_errors(srv: Server, content: bytes, headers: dict[str, str], status: int,
                                          code: str) -> None:
    body = assert_error(post(srv, "/predict", content, headers), status, code)
    assert "problems" not in body or len(body["problems"]) < 3


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/predict", 405), ("PUT", "/feedback", 405), ("POST", "/profile", 405), ("POST", "/livez", 405),
    ("DELETE", "/metrics", 405), ("POST", "/schema.json", 405), ("GET", "/nope", 404), ("GET", "/predict/x", 404),
])
def test_every_route_answers_json_for_404_and_405(srv: Server, method: str, path: str, status: int) -> None:
    assert_error(httpx.request(method, srv.url + path), status)


def test_bodies_never_carry_exception_text_or_store_urls(servers: dict[str, Server]) -> None:
    srv = servers["dead_store"]
    for r in (httpx.get(srv.url + "/drift", timeout=30), httpx.get(srv.url + "/performance", timeout=30)):
        body = assert_error(r, 503, "store_unavailable")
        assert "postgres" not in r.text and "127.0.0.1" not in r.text and "Error" not in body["message"]
    assert "postgres" in srv.logs()  # the details are in the log


def test_read_routes_need_the_token_and_predict_health_metrics_do_not(servers: dict[str, Server]) -> None:
    srv = servers["locked"]
    for path in ("/profile", "/drift", "/performance", "/docs.json", "/schema.json", "/nope"):
        assert_error(httpx.get(srv.url + path, headers={"X-Forwarded-For": "1.2.3.4"}), 401, "unauthorized")
    assert httpx.get(srv.url + "/profile", headers=AUTH).status_code == 200
    assert "source" not in httpx.get(srv.url + "/profile", headers=AUTH).json()
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(srv.url + path).status_code == 200
    assert httpx.post(srv.url + "/predict", json={"rows": rows()}).status_code == 200
    assert_error(httpx.post(srv.url + "/feedback", json={"request_id": "x", "outcomes": [1]}), 401)


def test_public_routes_can_be_protected_by_config(tmp_path) -> None:
    cfg = load_config(write_config(tmp_path, auth={"protect_predict": True, "protect_metrics": True,
                                                   "protect_health": True}))
    assert public_paths(cfg) == frozenset()
    assert public_paths(load_config(write_config(tmp_path))) == {"/predict", "/metrics", "/livez", "/readyz", "/healthz"}


def test_bentoml_clients_pass_the_token(servers: dict[str, Server]) -> None:
    with bentoml.SyncHTTPClient(servers["locked"].url, token=TOKEN) as client:
        assert client.predict(rows=rows())["routes"] == ["primary"]


def test_wrong_tokens_are_counted_and_rate_limited(servers: dict[str, Server]) -> None:
    srv = servers["locked"]
    codes = [httpx.get(srv.url + "/drift", headers={"Authorization": f"Bearer guess-{i}"}).status_code
             for i in range(8)]
    assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3, codes
    r = httpx.get(srv.url + "/drift", headers=AUTH)  # locked out: even the right token waits
    assert_error(r, 429, "too_many_requests")
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert httpx.post(srv.url + "/predict", json={"rows": rows()}).status_code == 200  # public: unaffected
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'guarded_serving_auth_failures_total{model="diamonds-price",reason="invalid"}' in metrics
    assert 'guarded_serving_auth_failures_total{model="diamonds-price",reason="rate_limited"}' in metrics


def test_outcomes_are_checked_before_the_store(srv: Server) -> None:
    rid = httpx.post(srv.url + "/predict", json={"rows": rows(2)}).json()["request_id"]
    for bad in ([1e200, 500], ["yes", 500], [True, 500], [None, 500]):
        body = assert_error(post(srv, "/feedback", json.dumps({"request_id": rid, "outcomes": bad}).encode()), 422)
        assert body["problems"][0]["row"] == 0
    ok = post(srv, "/feedback", json.dumps({"request_id": rid, "outcomes": [1500, 700]}).encode())
    assert ok.status_code == 200, ok.text
    # A wrong type for a row that has an outcome is still a 422, not a 409.
    assert_error(post(srv, "/feedback", json.dumps({"request_id": rid, "outcomes": ["1500", 700]}).encode()), 422)


def test_openapi_document_lists_the_routes(srv: Server) -> None:
    doc = httpx.get(srv.url + "/docs.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/predict", "/feedback", "/profile", "/drift", "/performance",
                                 "/admin/promote", "/admin/rollback"}
    assert doc["paths"]["/admin/promote"]["post"]["security"] == [{"bearer": []}]
    row = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["rows"]
    assert row["maxItems"] == 50 and "carat" in row["items"]["properties"]
    assert doc["paths"]["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def test_bentoml_sync_client_calls_predict_and_gets_our_errors(srv: Server) -> None:
    with bentoml.SyncHTTPClient(srv.url) as client:
        answer = client.predict(rows=rows(2))
        assert answer["routes"] == ["primary", "primary"] and len(answer["predictions"]) == 2
        bad = rows()
        bad[0]["carat"] = "heavy"
        with pytest.raises(BentoMLException) as e:
            client.predict(rows=bad)
    assert int(e.value.error_code) == 422
    assert json.loads(str(e.value))["problems"][0]["column"] == "carat"


def test_bentoml_async_client_calls_predict(srv: Server) -> None:
    async def call() -> Any:
        async with bentoml.AsyncHTTPClient(srv.url) as client:
            return await client.predict(rows=rows())

    assert asyncio.run(call())["routes"] == ["primary"]


def test_another_bentoml_service_depends_on_it(srv: Server, tmp_path) -> None:
    caller = Server(srv.config, target="tests.caller_service:Caller", env={"GUARDED_URL": srv.url})
    with caller:
        ok = httpx.post(caller.url + "/price", json={"rows": rows()}, timeout=30).json()
        assert ok["status"] == 200 and ok["answer"]["routes"] == ["primary"]
        bad = rows()
        del bad[0]["depth"]
        err = httpx.post(caller.url + "/price", json={"rows": bad}, timeout=30).json()
    assert err["status"] == 422 and json.loads(err["error"])["error"] == "schema_violation"
