"""Fuzzing the real service from its own OpenAPI document: at least 1,000 cases per route, no 5xx,
every error body in the documented shape.

Bodies are drawn from the request schemas the service publishes at ``/docs.json``
(hypothesis-jsonschema), then some are made hostile: values swapped for huge integers, lone
surrogates, long strings, deep nesting, non-JSON numbers; raw bytes and wrong content types too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .server import Server, running, write_config

hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")

pytestmark = pytest.mark.e2e
CASES = 1000
FUZZ = settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, httpx.Client, dict[str, Any]]]:
    srv = Server(write_config(tmp_path_factory.mktemp("fuzz"), max_rows=20,
                              limits={"max_body_bytes": 200_000, "max_string_length": 200}))
    with running({"fuzz": srv}), httpx.Client(base_url=srv.url, timeout=60) as client:
        yield srv, client, client.get("/docs.json").json()


@pytest.fixture(scope="module")
def seen() -> Counter[str]:
    return Counter()


HOSTILE = st.one_of(
    st.integers(min_value=10**300, max_value=10**420),
    st.just("\ud800"), st.text(min_size=201, max_size=400),
    st.recursive(st.none(), lambda c: st.lists(c, max_size=2), max_leaves=40),
    st.floats(allow_nan=False), st.booleans(), st.text(max_size=20),
)


def _poison(value: Any, data: st.DataObject) -> Any:
    """Replace some leaves of a schema-valid value with hostile ones."""
    if isinstance(value, dict):
        return {k: _poison(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [_poison(v, data) for v in value]
    return data.draw(HOSTILE) if data.draw(st.integers(0, 9)) == 0 else value


def _body(schema: dict[str, Any], data: st.DataObject) -> tuple[bytes, dict[str, str]]:
    kind = data.draw(st.sampled_from(["valid", "valid", "poisoned", "raw", "nested", "constant"]))
    headers = {"Content-Type": data.draw(st.sampled_from(
        ["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded", "application/problem+json"]))}
    if kind == "raw":
        return data.draw(st.binary(max_size=300)), headers
    if kind == "nested":
        depth = data.draw(st.integers(1, 3000))
        return b'{"rows": ' + b"[" * depth + b"]" * depth + b"}", headers
    value = data.draw(hypothesis_jsonschema.from_schema(schema))
    if kind == "poisoned":
        value = _poison(value, data)
    raw = json.dumps(value).encode()
    if kind == "constant":
        raw = raw.replace(b"0", b"NaN", 1)
    return raw, headers


def _check(r: httpx.Response, error_schema: dict[str, Any]) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500], r.request.content[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        body = r.json()
        jsonschema.validate(body, error_schema)
        assert set(body) <= {"error", "message", "problems", "request_id"}, body


def _post_route(route: str):  # noqa: ANN202
    @FUZZ
    @given(data=st.data())
    def run(fuzzed: tuple[Server, httpx.Client, dict[str, Any]], seen: Counter[str], data: st.DataObject) -> None:
        _, client, doc = fuzzed
        schema = doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        raw, headers = _body(schema, data)
        _check(client.post(route, content=raw, headers=headers), doc["components"]["schemas"]["Error"])
        seen[route] += 1

    return run


test_fuzz_predict = _post_route("/predict")
test_fuzz_feedback = _post_route("/feedback")

QUERY_VALUES = st.one_of(st.text(max_size=30), st.floats().map(repr), st.integers().map(str),
                         st.sampled_from(["inf", "-inf", "nan", "1e400", "0", "-1", "1.5", "", "\ud800"]))


@pytest.mark.parametrize("route", ["/profile", "/drift", "/performance"])
def test_fuzz_get_routes(fuzzed: tuple[Server, httpx.Client, dict[str, Any]], seen: Counter[str], route: str) -> None:
    _, client, doc = fuzzed
    names = st.sampled_from(["since", "window_rows", "x"]) | st.text(max_size=10)

    @FUZZ
    @given(params=st.dictionaries(names, QUERY_VALUES, max_size=3),
           method=st.sampled_from(["GET"] * 8 + ["POST", "PUT", "DELETE"]))
    def run(params: dict[str, str], method: str) -> None:
        query = "&".join(f"{httpx.QueryParams({k: v.encode('utf-8', 'surrogatepass').decode('utf-8', 'replace')})}"
                         for k, v in params.items())
        _check(client.request(method, f"{route}?{query}"), doc["components"]["schemas"]["Error"])
        seen[route] += 1

    run()
    assert seen[route] >= CASES


def test_every_route_got_its_cases(fuzzed: tuple[Server, httpx.Client, dict[str, Any]], seen: Counter[str]) -> None:
    srv, client, _ = fuzzed
    assert seen["/predict"] >= CASES and seen["/feedback"] >= CASES, seen
    assert "Traceback" not in srv.logs(tail=None)
    assert 'status="500"' not in client.get("/metrics").text
