"""The serving runtime in process on a temporary SQLite store (no HTTP): the recording pipeline,
sampling, durable mode, bounded queues, a silent database."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from guarded_serving.config import load_config
from guarded_serving.errors import ConfigError, StoreError
from guarded_serving.runtime import ServingRuntime, new_request_id

from ._data import features, holdout, json_rows, serve
from .server import write_config


def _runtime(tmp_path: Path, **overrides: object) -> ServingRuntime:
    return ServingRuntime(load_config(write_config(tmp_path, **overrides)))


def test_every_served_row_reaches_drift_and_log_as_batches(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    rows = json_rows(features(serve()).head(300))
    ids = [new_request_id() for _ in range(30)]
    for i, rid in enumerate(ids):
        rt.predict(rows[i * 10:(i + 1) * 10], request_id=rid)
    assert rt.recorder.flush(10)
    store = rt.store()
    assert all(store.request_row_count(rid) == 10 for rid in ids)
    df = store.joined()
    assert len(df) == 300 and set(df["route"]) <= {"primary", "fallback"}
    assert df["fallback_prediction"].notna().all(), "the shadow fallback answered every row"
    flagged = df[df["route"] == "fallback"]
    assert len(flagged) and flagged["primary_prediction"].notna().all(), "the shadow primary too"
    assert df.iloc[0]["features"]["cut"] in {"Ideal", "Premium", "Good", "Very Good", "Fair"}
    size = store.log_size()
    assert size["rows"] == 300 and size["index_entries"] == 30
    view = rt.drift()
    assert view["cumulative"]["rows"] == 300
    assert rt.feedback([(ids[0], 3, 1234.0)]) == {"stored": 1, "unchanged": 0, "overwritten": 0}
    rt.close()


def test_sampling_logs_an_exactly_counted_share_and_drift_sees_every_row(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, prediction_log={"sample_rate": 0.3})
    rows = json_rows(features(holdout()).head(5))
    for _ in range(200):
        rt.predict(rows, request_id=new_request_id())
    assert rt.recorder.flush(10)
    c = rt.recorder.counts
    assert c.logged + c.sampled_out == c.submitted == 1000
    assert 150 <= c.logged <= 450
    assert rt.store().log_size()["rows"] == c.logged
    assert rt.drift()["cumulative"]["rows"] == 1000
    rt.close()


def test_durable_predict_returns_after_its_rows_are_committed(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, prediction_log={"durable": True, "flush_seconds": 5.0})
    rows = json_rows(features(holdout()).head(3))
    rid = new_request_id()
    rt.predict(rows, request_id=rid)
    assert rt.store().request_row_count(rid) == 3, "acknowledged before the log had the rows"

    async def many() -> list[str]:
        ids = [new_request_id() for _ in range(20)]
        await asyncio.gather(*(rt.apredict(rows, request_id=i) for i in ids))
        return ids

    ids = asyncio.run(many())
    assert all(rt.store().request_row_count(i) == 3 for i in ids)
    assert rt.store().log_size()["rows"] == 63
    rt.close()


def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, prediction_log={"queue_size": 10, "flush_seconds": 30.0, "batch_size": 10_000},
                  max_rows=10)
    rows = json_rows(features(holdout()).head(10))

    async def on_the_loop() -> None:  # the event loop never waits for room: it drops and counts
        for _ in range(5):
            await rt.apredict(rows, request_id=new_request_id())

    asyncio.run(on_the_loop())
    c = rt.recorder.counts
    assert c.submitted + c.dropped["monitoring"] == 50 and c.dropped["monitoring"] >= 30
    rt.close()


def test_a_worker_thread_waits_briefly_for_room_instead_of_dropping(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, prediction_log={"queue_size": 10, "flush_seconds": 30.0, "batch_size": 10_000},
                  max_rows=10)
    rows = json_rows(features(holdout()).head(10))
    for _ in range(5):
        rt.predict(rows, request_id=new_request_id())
    assert rt.recorder.flush(10)
    assert rt.recorder.counts.dropped["monitoring"] == 0 and rt.store().log_size()["rows"] == 50
    rt.close()


@pytest.fixture
def silent_database() -> str:
    """A TCP listener that accepts connections and never answers, as a hung PostgreSQL."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    yield f"postgresql+psycopg://postgres@127.0.0.1:{srv.getsockname()[1]}/test"
    stop.set()
    for s in held:
        s.close()
    srv.close()


def test_a_silent_database_is_a_fast_store_error_and_never_slows_predict(tmp_path: Path,
                                                                           silent_database: str) -> None:
    rt = _runtime(tmp_path, store={"url": silent_database, "timeout_seconds": 1.0, "flush_seconds": 0.2})
    rows = json_rows(features(holdout()).head(1))
    t = time.perf_counter()
    for _ in range(50):
        assert rt.predict(rows, request_id=new_request_id()).routes.tolist() == ["primary"]
    assert time.perf_counter() - t < 2.0

    async def monitoring() -> list[float]:
        took = []
        for call in (rt.adrift, rt.aperformance, lambda: rt.afeedback([("x", 0, 1.0)])):
            t = time.perf_counter()
            with pytest.raises(StoreError):
                await call()
            took.append(time.perf_counter() - t)
        return took

    assert max(asyncio.run(monitoring())) < 5.0
    t = time.perf_counter()
    rt.close(timeout=3.0)
    assert time.perf_counter() - t < 4.0


def test_a_sample_rate_outside_0_to_1_is_refused(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    assert rt.guard.breaker.state == "closed" and rt.guard.executor.threads >= 1
    rt.close()
    with pytest.raises(ConfigError, match="prediction_log.sample_rate"):
        load_config(write_config(tmp_path, prediction_log={"sample_rate": 2.0}))
    # A config built in code, past the loader, is refused by the recorder all the same.
    cfg = rt.config.model_copy(update={"prediction_log": rt.config.prediction_log.model_copy(
        update={"sample_rate": 2.0})})
    with pytest.raises(ConfigError, match="sample_rate"):
        ServingRuntime(cfg)
