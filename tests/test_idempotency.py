"""Client request ids: fingerprints, each worker's memory of recent requests, and end to end
across two servers (replicas) sharing one store: a retry gets the same answer and is logged once,
a reused id with other rows is a 409."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from guarded_serving.errors import ConflictError
from guarded_serving.idempotency import RecentRequests, fingerprint

from . import _data
from .conftest import wait_until
from .server import Server, running, write_config


def test_fingerprint_is_canonical_and_tells_rows_apart() -> None:
    rows = [{"carat": 0.5, "cut": "Ideal"}, {"carat": 1.0, "cut": "Good"}]
    same = [{"cut": "Ideal", "carat": 0.5}, {"cut": "Good", "carat": 1.0}]  # other key order
    assert fingerprint(rows, "raise") == fingerprint(same, "raise")
    assert fingerprint(rows, "raise") != fingerprint(rows[:1], "raise")
    assert fingerprint(rows, "raise") != fingerprint(rows, "mark")
    assert fingerprint(rows, "raise") != fingerprint([{"carat": 0.5, "cut": "Ideal"}, {"carat": 1.0, "cut": "good"}], "raise")
    assert 0 <= fingerprint([{"x": "\ud800"}], "raise") < 2**63  # a lone surrogate hashes, too


def test_recent_requests_answer_retries_refuse_reuse_and_stay_within_bytes() -> None:
    recent = RecentRequests(max_bytes=1_000)
    assert recent.check("a", 1) is None
    recent.begin("a", 1)
    assert recent.check("a", 1).body is None  # in flight
    with pytest.raises(ConflictError) as e:
        recent.check("a", 2)
    assert e.value.code == "conflict" and e.value.problems[0].column == "X-Request-ID"
    recent.answered("a", 1, b"x" * 500)
    assert recent.check("a", 1).body == b"x" * 500
    for i in range(20):  # newer answers push the oldest out, within the byte budget
        recent.answered(f"r{i}", i, b"y" * 100)
    assert recent.check("a", 1) is None and recent.check("r19", 19).body == b"y" * 100
    recent.forget("r19")
    assert recent.check("r19", 7) is None


@pytest.mark.e2e
def test_client_ids_across_two_replicas_sharing_a_store(tmp_path: Path) -> None:
    from guarded_serving.config import load_config
    from guarded_serving.store.sql import Store

    store_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    configs = [write_config(d, store={"url": store_url}) for d in dirs]
    rows = _data.json_rows(_data.features(_data.holdout()).head(3))
    other = _data.json_rows(_data.features(_data.holdout()).iloc[3:6])
    with running({"a": Server(configs[0]), "b": Server(configs[1])}) as srv:
        a, b = srv["a"].url, srv["b"].url
        first = httpx.post(a + "/predict", json={"rows": rows}, headers={"X-Request-ID": "order-17"}, timeout=30)
        assert first.status_code == 200 and first.json()["request_id"] == "order-17"
        again = httpx.post(a + "/predict", json={"rows": rows}, headers={"X-Request-ID": "order-17"}, timeout=30)
        assert again.status_code == 200 and again.content == first.content  # the same answer, byte for byte
        reused = httpx.post(a + "/predict", json={"rows": other}, headers={"X-Request-ID": "order-17"}, timeout=30)
        assert reused.status_code == 409
        body = reused.json()
        assert body["error"] == "conflict" and body["request_id"] == "order-17"
        assert body["problems"][0]["column"] == "X-Request-ID"

        store = Store(store_url, timeout_s=5.0)
        try:
            wait_until(lambda: store.request_row_count("order-17") == 3, timeout=20)
            assert store.request_fingerprint("order-17")[1] is not None
            # The other replica knows the id from the store: a retry there is answered again
            # (the same predictions, routes and reasons) and not logged twice...
            retry = httpx.post(b + "/predict", json={"rows": rows}, headers={"X-Request-ID": "order-17"}, timeout=30)
            assert retry.status_code == 200
            for key in ("request_id", "predictions", "routes", "reasons"):
                assert retry.json()[key] == first.json()[key]
            # ... and the id with other rows is a 409 there too.
            other_b = httpx.post(b + "/predict", json={"rows": other}, headers={"X-Request-ID": "order-17"}, timeout=30)
            assert other_b.status_code == 409 and other_b.json()["error"] == "conflict"
            # Server-made ids skip all of it; a fresh client id is a new request.
            plain = httpx.post(b + "/predict", json={"rows": other}, timeout=30)
            fresh = httpx.post(b + "/predict", json={"rows": other}, headers={"X-Request-ID": "order-18"}, timeout=30)
            assert plain.status_code == 200 and fresh.status_code == 200
            wait_until(lambda: store.request_row_count("order-18") == 3, timeout=20)
            wait_until(lambda: store.request_row_count(plain.json()["request_id"]) == 3, timeout=20)
            assert store.request_fingerprint(plain.json()["request_id"]) == (True, None)
            time.sleep(1.5)  # one more flush interval: a second copy would be written by now
            log = store.joined(features=False)
            assert (log["request_id"] == "order-17").sum() == 3
            assert log.loc[log["request_id"] == "order-17", "prediction"].tolist() == first.json()["predictions"]
        finally:
            store.close()
    assert load_config(configs[0]).store.url == store_url
