"""The store on SQLite and PostgreSQL, and the background prediction-log writer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from guarded_serving.errors import ConflictError, NotFoundError, StoreError
from guarded_serving.store import Store

from .conftest import released_together

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@cache
def _pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as e:  # noqa: BLE001
        return f"PostgreSQL at 127.0.0.1:5432 (database test) cannot be reached: {e}"


def _prefix() -> str:
    return f"gs_test_{uuid.uuid4().hex[:10]}_"


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "postgres":
        reason = _pg_unreachable()
        if reason:
            pytest.skip(reason)
        return PG_URL
    return f"sqlite:///{tmp_path / 'db' / 'store.sqlite3'}"


def _drop(store: Store) -> None:
    store.metadata.drop_all(store.engine)
    store.close()


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(url, table prefix) of a fresh store; its tables are dropped afterwards."""
    url, prefix = _url(request.param, tmp_path), _prefix()
    yield url, prefix
    _drop(Store(url, prefix=prefix))


@pytest.fixture
def store(backend: tuple[str, str]) -> Iterator[Store]:
    s = Store(*backend)
    yield s
    s.close()


def _rows(request_id: str, n: int, ts: float = 100.0, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"request_id": request_id, "row": i, "ts": ts + i, "model": "diamonds-price",
         "primary_model": "primary", "primary_version": "1", "fallback_model": "fallback",
         "fallback_version": "1", "route": "fallback" if i % 2 else "primary",
         "reasons": ["out_of_range:carat"] if i % 2 else [], "prediction": 100.0 + i,
         "primary_prediction": 90.0 + i, "fallback_prediction": 100.0 + i,
         "probabilities": None, "latency_ms": 1.5, "features": {"carat": 0.5 + i, "cut": "Ideal"},
         **extra}
        for i in range(n)
    ]


# -- drift segments ------------------------------------------------------------------------------


def test_segments_add_list_and_replace(store: Store) -> None:
    a = store.add_segment("w1", 0.0, 10.0, 100, {"counts": [1, 2, 3]})
    b = store.add_segment("w2", 5.0, 20.0, 50, {"counts": [4, 5, 6]})
    c = store.add_segment("w1", 10.0, 30.0, 10, {"counts": [0, 0, 1]})
    segs = store.segments()
    assert [s["id"] for s in segs] == [a, b, c]
    assert segs[0] == {"id": a, "worker": "w1", "first_ts": 0.0, "last_ts": 10.0, "rows": 100,
                       "state": {"counts": [1, 2, 3]}}
    assert [s["id"] for s in store.segments(since=15.0)] == [b, c]

    merged = {"worker": "merged", "first_ts": 0.0, "last_ts": 20.0, "rows": 150, "state": {"counts": [5, 7, 9]}}
    new_id = store.replace_segments([a, b], merged)
    assert new_id > c, "ids are never reused"
    assert [(s["id"], s["rows"]) for s in store.segments()] == [(new_id, 150), (c, 10)]
    # Another process compacted a and b already: nothing changes.
    assert store.replace_segments([a, c], merged) == -1
    assert [s["id"] for s in store.segments()] == [new_id, c]


# -- prediction log ------------------------------------------------------------------------------


def test_log_predictions_ignores_duplicates(store: Store) -> None:
    store.log_predictions(_rows("r1", 3))
    store.log_predictions(_rows("r1", 3, ts=999.0) + _rows("r2", 2))  # r1 again: ignored
    assert store.request_row_count("r1") == 3
    assert store.request_row_count("r2") == 2
    assert store.request_row_count("nope") == 0
    df = store.joined()
    assert len(df) == 5
    assert df.loc[df.request_id == "r1", "ts"].tolist() == [100.0, 101.0, 102.0]
    store.log_predictions([])


def test_server_made_ids_are_stored_without_a_lookup_and_a_repeated_write_still_once(store: Store) -> None:
    """Ids the server made are new, but for a write retried after its commit went through: the
    first try inserts without looking its ids up; a repeat meets the index's primary key, and
    the batch is written again with the lookup, keeping only what is new."""
    from guarded_serving.runtime import new_request_id

    a, b = new_request_id(), new_request_id()
    lookups: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "log_keys" in statement:
            lookups.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert store.log_predictions(_rows(a, 3)) == 3
        assert lookups == [], "fresh server-made ids: no lookup"
        assert store.log_predictions(_rows(a, 3, ts=999.0) + _rows(b, 2)) == 2
        assert lookups, "the repeat fell back to the lookup"
        lookups.clear()
        assert store.log_predictions(_rows("client-named", 1)) == 1
        assert lookups, "other ids are always looked up"
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert [store.request_row_count(r) for r in (a, b)] == [3, 2]
    df = store.joined()
    assert df.loc[df.request_id == a, "ts"].tolist() == [100.0, 101.0, 102.0]


def test_a_request_repeated_within_a_batch_keeps_its_first_rows(store: Store) -> None:
    # Not one run a request: the slow path, row by row, drops what repeats or is already logged.
    store.log_predictions(_rows("r0", 1))
    rows = _rows("r1", 2) + _rows("r2", 1) + _rows("r1", 3, ts=500.0) + _rows("r0", 2) + _rows("r2", 1)
    assert store.log_predictions(rows) == 2 + 1 + 1 + 1
    assert [store.request_row_count(r) for r in ("r0", "r1", "r2")] == [2, 3, 1]
    df = store.joined().sort_values(["request_id", "row"])
    assert df.loc[df.request_id == "r1", "ts"].tolist() == [100.0, 101.0, 502.0]


def test_an_in_memory_store_keeps_the_log() -> None:
    store = Store("sqlite://")
    store.log_predictions(_rows("r1", 2))
    assert store.joined()["prediction"].tolist() == [100.0, 101.0]
    store.close()


def test_long_bodies_are_stored_in_parts_and_purged_with_their_batch(store: Store) -> None:
    from guarded_serving.store.sql import BODY_PART

    store.log_predictions(_rows("big", 600, ts=10.0))
    store.log_predictions(_rows("small", 1, ts=2000.0))
    with store.engine.connect() as conn:
        parts = conn.execute(sa.select(sa.func.count()).select_from(store.t_log_parts)).scalar_one()
    size = store.log_size()
    assert parts >= 2 and size["body_bytes"] > parts * BODY_PART
    df = store.joined()
    assert len(df) == 601 and df.loc[df.request_id == "big", "row"].tolist() == list(range(600))
    assert df.loc[df.request_id == "big", "features"].iloc[599] == {"carat": 599.5, "cut": "Ideal"}
    assert store.purge_predictions(1000.0) == 600
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.t_log_parts)).scalar_one() == 0
    assert store.joined()["request_id"].tolist() == ["small"]


def test_joined_decodes_json_and_joins_outcomes(store: Store) -> None:
    probs = {"classes": ["a", "b"], "primary": [0.2, 0.8], "fallback": [0.6, 0.4], "served": [0.2, 0.8]}
    store.log_predictions(_rows("r1", 4) + _rows("r2", 2, ts=50.0, probabilities=probs))
    store.add_outcomes([("r1", 1, 123.5), ("r2", 0, "b")])

    df = store.joined()
    assert list(df.columns) == [
        "request_id", "row", "ts", "model", "primary_model", "primary_version", "fallback_model",
        "fallback_version", "route", "reasons", "prediction", "primary_prediction",
        "fallback_prediction", "probabilities", "latency_ms", "features", "outcome", "outcome_ts"]
    assert df[["request_id", "row"]].values.tolist() == [["r2", 0], ["r2", 1]] + [["r1", i] for i in range(4)]
    r1 = df[df.request_id == "r1"].set_index("row")
    assert r1.loc[1, "reasons"] == "out_of_range:carat"
    assert r1.loc[0, "reasons"] == ""
    assert r1.loc[1, "features"] == {"carat": 1.5, "cut": "Ideal"}
    assert r1.loc[1, "outcome"] == 123.5 and r1.loc[1, "outcome_ts"] > 0
    assert r1.loc[0, "outcome"] is None and r1.loc[0, "probabilities"] is None
    assert df.iloc[0]["probabilities"] == probs and df.iloc[0]["outcome"] == "b"

    only = store.joined(with_outcomes_only=True)
    assert only[["request_id", "row"]].values.tolist() == [["r2", 0], ["r1", 1]]
    assert store.joined(since=101.0)["ts"].tolist() == [101.0, 102.0, 103.0]
    assert store.joined(limit=2)["ts"].tolist() == [102.0, 103.0], "limit keeps the most recent"
    cheap = store.outcome_rows()
    assert "features" not in cheap.columns and len(cheap) == 2
    empty = store.joined(since=1e9)
    assert len(empty) == 0 and "outcome" in empty.columns


def test_server_made_and_client_ids_share_the_log_with_distinct_keys(store: Store) -> None:
    # Server-made ids (32 lowercase hex digits) are stored as 16 bytes, in the body and the index;
    # any other id as its text. No two ids share an index key, even one whose ASCII text is 16
    # bytes of another's hex.
    from guarded_serving.runtime import new_request_id
    from guarded_serving.store.sql import request_id_of, request_key

    server = new_request_id()
    lookalike = bytes.fromhex("6162636465666768696a6b6c6d6e6f70").decode()  # "abcdefghijklmnop"
    ids = [server, "6162636465666768696a6b6c6d6e6f70", lookalike, "ABCDEF0123456789ABCDEF0123456789", "x"]
    assert len({request_key(i) for i in ids}) == len(ids)
    assert [request_id_of(request_key(i)) for i in ids] == ids
    assert len(request_key(server)) == 16
    store.log_predictions(_rows(server, 2))  # a batch of server-made ids only: binary in the body
    store.log_predictions([r for i in ids[1:] for r in _rows(i, 1)])  # mixed: text in the body
    assert [store.request_row_count(i) for i in ids] == [2, 1, 1, 1, 1]
    assert sorted(store.joined()["request_id"].tolist()) == sorted([server, *ids])
    store.add_outcomes([(server, 1, 5.0), (lookalike, 0, 6.0)])
    assert sorted(store.outcome_rows()["request_id"].tolist()) == sorted([server, lookalike])
    with pytest.raises(NotFoundError):
        store.add_outcomes([(server.upper(), 0, 1.0)])


#: A body of the second format (the whole IPC stream with its schema, one zstd frame), written by
#: that code: two server-made requests of three rows, labels, probabilities and features.
V1_BODY = Path(__file__).parent / "data" / "logbatch_v1_zstd_stream.bin"
V1_IDS = ["018f3a2b4c5d7e6f8a9b0c1d2e3f4051", "018f3a2b4c5e7a6b8c9d0e1f20314253"]


def _check_v1(cols: Any) -> None:
    assert list(cols["request_id"]) == [V1_IDS[0]] * 3 + [V1_IDS[1]] * 3
    assert list(cols["row"]) == [0, 1, 2] * 2
    assert list(cols["fallback_prediction"]) == ["setosa", "versicolor", "versicolor"] * 2
    assert list(cols["model"]) == ["iris"] * 6 and list(cols["primary_version"]) == ["3"] * 6
    assert cols["probabilities"][0] == {"classes": ["setosa", "versicolor"], "served": [0.9, 0.1]}


def test_bodies_of_earlier_formats_still_read() -> None:
    import io

    import pyarrow as pa

    from guarded_serving.store.logbatch import decode

    body = V1_BODY.read_bytes()
    cols = decode(body)
    _check_v1(cols)
    assert list(cols["f:species_hint"]) == ["a", "a", None] * 2
    # The first format: the same stream with Arrow's per-buffer compression.
    with pa.ipc.open_stream(pa.input_stream(pa.py_buffer(body), compression="zstd")) as r:
        table = r.read_all()
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    _check_v1(decode(sink.getvalue()))


def test_a_store_with_bodies_of_the_earlier_format_reads_and_extends_them(store: Store) -> None:
    from guarded_serving.store.sql import request_key

    with store.engine.begin() as conn:
        batch_id = conn.execute(store.t_log_batches.insert().values(
            first_ts=1717000000.25, last_ts=1717000001.45, rows=6, body=V1_BODY.read_bytes())).inserted_primary_key[0]
        conn.execute(store.t_log_index.insert(), [
            {"request_key": request_key(r), "first_row": 0, "n_rows": 3, "batch_id": batch_id} for r in V1_IDS])
    store.log_predictions(_rows(V1_IDS[0], 3) + _rows("new", 2))  # the old request again: left out
    assert store.request_row_count(V1_IDS[0]) == 3
    df = store.joined()
    assert len(df) == 8
    _check_v1({c: df.loc[df.request_id.isin(V1_IDS), c].tolist() for c in df.columns})
    assert df.loc[df.request_id == "new", "model"].tolist() == ["diamonds-price"] * 2
    assert store.add_outcomes([(V1_IDS[1], 2, "setosa")])["stored"] == 1


def test_purge_removes_old_predictions_and_their_outcomes(store: Store) -> None:
    # Retention works a stored batch at a time (a recorder flush: about a second of traffic).
    store.log_predictions(_rows("old", 2, ts=10.0))
    store.log_predictions(_rows("new", 2, ts=1000.0))
    store.add_outcomes([("old", 0, 1.0), ("new", 0, 2.0)])
    assert store.purge_predictions(500.0) == 2
    assert store.joined()["request_id"].tolist() == ["new", "new"]
    assert store.outcome_rows()["request_id"].tolist() == ["new"]
    with pytest.raises(NotFoundError):
        store.add_outcomes([("old", 0, 1.0)])


# -- outcomes ------------------------------------------------------------------------------------


def test_add_outcomes_stored_unchanged_overwritten(store: Store) -> None:
    store.log_predictions(_rows("r1", 3))
    assert store.add_outcomes([("r1", 0, 10.0), ("r1", 1, 11.0)]) == {"stored": 2, "unchanged": 0, "overwritten": 0}
    # Same value again (1 == 1.0 as JSON): unchanged; a new row: stored.
    assert store.add_outcomes([("r1", 0, 10), ("r1", 2, 12.0)]) == {"stored": 1, "unchanged": 1, "overwritten": 0}
    assert store.add_outcomes([("r1", 0, 99.0), ("r1", 1, 11.0)], overwrite=True) == {
        "stored": 0, "unchanged": 1, "overwritten": 1}
    assert store.outcome_rows()["outcome"].tolist() == [99.0, 11.0, 12.0]


def test_conflicting_outcome_is_409_and_writes_nothing(store: Store) -> None:
    store.log_predictions(_rows("r1", 3))
    store.add_outcomes([("r1", 0, 10.0)])
    with pytest.raises(ConflictError) as info:
        store.add_outcomes([("r1", 1, 11.0), ("r1", 0, 20.0)])
    err = info.value
    assert err.code == "conflict"
    [p] = err.problems
    assert p.row == 0 and p.expected == "10.0" and p.got == 20.0 and "r1" in p.problem
    # The new row of the failed call was rolled back with it.
    assert store.outcome_rows()[["row", "outcome"]].values.tolist() == [[0, 10.0]]
    with pytest.raises(ConflictError):  # one call giving two values for one row
        store.add_outcomes([("r1", 2, 1.0), ("r1", 2, 2.0)])


def test_unknown_request_or_row_is_404_and_writes_nothing(store: Store) -> None:
    store.log_predictions(_rows("r1", 3))
    with pytest.raises(NotFoundError) as info:
        store.add_outcomes([("r1", 0, 1.0), ("ghost", 0, 1.0), ("r1", 7, 1.0)])
    err = info.value
    assert err.code == "not_found"
    by_row = {p.row: p for p in err.problems}
    assert by_row[0].problem.startswith("unknown_request") and "ghost" in by_row[0].problem
    assert by_row[7].problem.startswith("unknown_row") and "r1" in by_row[7].problem
    assert len(store.outcome_rows()) == 0


# -- events, health, errors ------------------------------------------------------------------------


def test_events_newest_first(store: Store) -> None:
    store.add_event("drift_status", {"status": "ok"}, ts=1.0)
    store.add_event("alert", {"feature": "carat"}, ts=2.0)
    store.add_event("drift_status", {"status": "drifting"}, ts=3.0)
    assert [e["body"] for e in store.events(kind="drift_status")] == [{"status": "drifting"}, {"status": "ok"}]
    assert [e["kind"] for e in store.events(since=2.0)] == ["drift_status", "alert"]
    assert len(store.events(limit=1)) == 1
    assert store.ping()


def test_sqlite_is_wal_with_normal_sync_and_creates_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "s.sqlite3"
    s = Store(f"sqlite:///{path}")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
    s.close()
    assert path.exists()
    full = Store(f"sqlite:///{path}?synchronous=full")
    with full.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    full.close()


def test_unreachable_store_raises_store_error_without_password() -> None:
    with pytest.raises(StoreError) as info:
        Store("postgresql+psycopg://gs:s3cret-pw@127.0.0.1:1/test")
    assert "s3cret-pw" not in str(info.value) and "***" in str(info.value)
    assert info.value.code == "store_unavailable"


def test_store_errors_are_wrapped(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    s.metadata.drop_all(s.engine)  # the tables vanish under a running store
    with pytest.raises(StoreError, match="logging 1 prediction row"):
        s.log_predictions(_rows("r1", 1))
    assert s.url_display.endswith("s.sqlite3")
    s.close()


# -- several processes ---------------------------------------------------------------------------


def _process_worker(url: str, prefix: str, fresh_prefix: str, worker: int, n: int,
                    start: Any, results: Any) -> None:
    start.wait()
    out: dict[str, Any] = {"worker": worker, "errors": []}
    try:
        # Both processes create the same new tables at once.
        Store(url, prefix=fresh_prefix).add_segment(f"w{worker}", 0.0, 1.0, 1, {"w": worker})
        s = Store(url, prefix=prefix)
        for i in range(0, n, 5):
            s.add_outcomes([(f"own{worker}", j, float(j)) for j in range(i, i + 5)])
            s.add_outcomes([("same", j, float(j)) for j in range(i, i + 5)])  # equal values: no conflict
            s.add_segment(f"w{worker}", float(i), float(i + 1), 5, {"i": i})
        try:
            s.add_outcomes([("contested", j, worker) for j in range(n)])
            out["contested"] = "won"
        except ConflictError:
            out["contested"] = "conflict"
        s.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out["errors"].append(repr(e))
    results.put(out)


@pytest.mark.parametrize("kind", BACKENDS)
def test_two_processes_write_concurrently(kind: str, tmp_path: Path) -> None:
    url, prefix, fresh = _url(kind, tmp_path), _prefix(), _prefix()
    n = 40
    s = Store(url, prefix=prefix)
    s.log_predictions(_rows("own0", n) + _rows("own1", n) + _rows("same", n) + _rows("contested", n))
    try:
        outs = released_together(_process_worker, [(url, prefix, fresh, w, n) for w in (0, 1)], timeout=60)
        assert [o["errors"] for o in outs] == [[], []]
        assert sorted(o["contested"] for o in outs) == ["conflict", "won"]
        winner = next(o["worker"] for o in outs if o["contested"] == "won")
        df = s.outcome_rows()
        counts = df.groupby("request_id").size().to_dict()
        assert counts == {"own0": n, "own1": n, "same": n, "contested": n}
        assert set(df.loc[df.request_id == "contested", "outcome"]) == {winner}
        assert len(s.segments()) == 2 * (n // 5)
        assert sorted(seg["worker"] for seg in Store(url, prefix=fresh).segments()) == ["w0", "w1"]
    finally:
        _drop(s)
        _drop(Store(url, prefix=fresh))


def test_a_chain_of_events_is_extended_once(store: Store) -> None:
    assert store.last_event("drift_status") is None
    first = store.add_event_after("drift_status", 0, {"statuses": {"carat": "ok"}})
    assert first is not None
    assert store.add_event_after("drift_status", 0, {"statuses": {"carat": "ok"}}) is None
    second = store.add_event_after("drift_status", first, {"statuses": {"carat": "drift"}})
    # Another process saw the same change from the same event: it loses, and knows it.
    assert second is not None and store.add_event_after("drift_status", first, {"x": 1}) is None
    last = store.last_event("drift_status")
    assert last is not None and last["id"] == second and last["body"] == {"statuses": {"carat": "drift"}}


def test_log_predictions_in_many_statements_keeps_every_row_once(store: Store) -> None:
    # Rows go in several to a statement, a statement per chunk; duplicates within one call and
    # across calls are ignored as with single-row inserts.
    big = _rows("big", 1234)
    store.log_predictions(big + _rows("big", 3) + _rows("other", 1))
    store.log_predictions(_rows("big", 1300))  # 66 new rows, the rest already there
    assert store.request_row_count("big") == 1300
    assert store.request_row_count("other") == 1
    df = store.joined()
    assert len(df) == 1301
    assert sorted(df.loc[df.request_id == "big", "row"].tolist()) == list(range(1300))


def test_request_ids_are_uuid7_and_sort_by_time() -> None:
    from guarded_serving.runtime import new_request_id

    first = [new_request_id() for _ in range(1000)]
    time.sleep(0.002)
    later = new_request_id()
    assert len(set(first)) == 1000
    for rid in first:
        u = uuid.UUID(rid)
        assert len(rid) == 32 and u.hex == rid and u.version == 7 and u.variant == uuid.RFC_4122
    assert max(first) < later  # a later millisecond sorts after: the log's key grows at one end
    assert abs(int(later[:12], 16) / 1e3 - time.time()) < 5  # the prefix is Unix milliseconds
