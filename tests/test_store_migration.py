"""Stores written by an older guarded-serving: each layout is built with that version's DDL and
rows as it wrote them, then opened by the current Store, which must read every old row (with its
outcome) through the current paths: ``joined``, ``add_outcomes`` (/feedback) and ``export``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa

from guarded_serving.errors import StoreError
from guarded_serving.store import Store
from guarded_serving.store.logbatch import LogBatch, encode
from guarded_serving.store.migration import LAYOUT, LegacyStoreError
from guarded_serving.store.sql import BODY_PART, request_key

from .conftest import released_together
from .test_store import BACKENDS, V1_BODY, V1_IDS, _check_v1, _prefix, _url

#: A body of the first batched format (6412ac9: per-buffer zstd, no request ids or rows; those
#: were in the index with each run's offset), written by that version's
#: ``encode(LogBatch.from_rows(_v0_rows()))`` (its logbatch.py and codec.py run as they were).
V0_BODY = Path(__file__).parent / "data" / "logbatch_v0_no_ids.bin"
V0_HEX = "018f3a2b4c5d7e6f8a9b0c1d2e3f4099"
#: (request_id, first_row, n_rows, offset) of the V0 body, as that version's ``_runs`` found them.
V0_RUNS = [(V0_HEX, 0, 3, 0), ("client-7", 0, 2, 3)]


def _v0_rows() -> list[dict[str, Any]]:
    rows = []
    for rid, n, t0 in ((V0_HEX, 3, 1717000100.0), ("client-7", 2, 1717000101.5)):
        for i in range(n):
            rows.append({"request_id": rid, "row": i, "ts": t0 + i * 0.25, "model": "diamonds-price",
                         "primary_model": "primary", "primary_version": "4", "fallback_model": "fallback",
                         "fallback_version": "2", "route": "fallback" if i == 1 else "primary",
                         "reasons": ["out_of_range:carat"] if i == 1 else [],
                         "prediction": 1000.0 + i, "primary_prediction": 990.0 + i,
                         "fallback_prediction": 1000.0 + i if i == 1 else 1010.0 + i,
                         "probabilities": None, "latency_ms": 2.5 + i,
                         "features": {"carat": 0.3 + i, "cut": ["Ideal", "Good", None][i]}})
    return rows


# -- the old DDL, copied from the version that wrote each layout ------------------------------------


def _outcomes(md: sa.MetaData, p: str) -> sa.Table:
    """The same in every version."""
    return sa.Table(f"{p}outcomes", md,
                    sa.Column("request_id", sa.Text, primary_key=True),
                    sa.Column("row", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("outcome", sa.Text),
                    sa.Column("ts", sa.Double, nullable=False))


def _row_table(md: sa.MetaData, p: str) -> sa.Table:
    """6412ac9^: one SQL row per served row, JSON columns as text."""
    text = sa.Text
    return sa.Table(
        f"{p}predictions", md,
        sa.Column("request_id", text, primary_key=True),
        sa.Column("row", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.Double, nullable=False),
        *(sa.Column(c, text) for c in ("model", "primary_model", "primary_version", "fallback_model",
                                       "fallback_version", "route", "reasons", "prediction",
                                       "primary_prediction", "fallback_prediction", "probabilities")),
        sa.Column("latency_ms", sa.Double),
        sa.Column("features", text),
        sa.Index(f"{p}predictions_ts", "ts"),
    )


def _log_batches(md: sa.MetaData, p: str) -> sa.Table:
    """6412ac9 to now."""
    return sa.Table(f"{p}log_batches", md,
                    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("first_ts", sa.Double, nullable=False),
                    sa.Column("last_ts", sa.Double, nullable=False),
                    sa.Column("rows", sa.Integer, nullable=False),
                    sa.Column("body", sa.LargeBinary, nullable=False),
                    sa.Index(f"{p}log_batches_last_ts", "last_ts"),
                    sqlite_autoincrement=True)


def _log_index(md: sa.MetaData, p: str, offsets: bool) -> sa.Table:
    """6412ac9 (with offsets and a batch_id index) and 26e3a65 to 02fb6bb (without)."""
    extra = [sa.Column("offset", sa.Integer, nullable=False), sa.Index(f"{p}log_index_batch", "batch_id")] \
        if offsets else []
    return sa.Table(f"{p}log_index", md,
                    sa.Column("request_id", sa.Text, primary_key=True),
                    sa.Column("first_row", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("n_rows", sa.Integer, nullable=False),
                    sa.Column("batch_id", sa.Integer, nullable=False),
                    *extra, sqlite_with_rowid=False)


def _log_keys(md: sa.MetaData, p: str, fingerprints: bool) -> sa.Table:
    """c070a4f (without fingerprints) and d002231 to now."""
    extra = [sa.Column("fingerprint", sa.BigInteger)] if fingerprints else []
    return sa.Table(f"{p}log_keys", md,
                    sa.Column("request_key", sa.LargeBinary, primary_key=True),
                    sa.Column("first_row", sa.Integer, primary_key=True, autoincrement=False),
                    sa.Column("n_rows", sa.Integer, nullable=False),
                    sa.Column("batch_id", sa.Integer, nullable=False),
                    *extra, sqlite_with_rowid=False)


def _parts_and_schemas(md: sa.MetaData, p: str) -> tuple[sa.Table, sa.Table]:
    """3edbacd and 1746f05 (parts numbered 65,536 to a batch)."""
    int64 = sa.BigInteger().with_variant(sa.Integer, "sqlite")
    return (sa.Table(f"{p}log_parts", md, sa.Column("id", int64, primary_key=True, autoincrement=False),
                     sa.Column("data", sa.LargeBinary, nullable=False)),
            sa.Table(f"{p}log_schemas", md, sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
                     sa.Column("body", sa.LargeBinary, nullable=False)))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def old(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, sa.Engine]]:
    """(url, prefix, engine) of an empty database for an old layout; every table of the prefix
    (old, current and legacy_) is dropped afterwards."""
    url, prefix = _url(request.param, tmp_path), _prefix()
    (tmp_path / "db").mkdir()
    engine = sa.create_engine(url)
    yield url, prefix, engine
    _drop_prefixed(engine, prefix)


def _drop_prefixed(engine: sa.Engine, prefix: str) -> None:
    md = sa.MetaData()
    md.reflect(engine, only=lambda name, _md: name.startswith(prefix))
    md.drop_all(engine)
    engine.dispose()


def _json(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _old_rows(n_requests: int, rows_each: int = 2, t0: float = 1_700_000_000.0) -> list[dict[str, Any]]:
    """Rows of the row-per-row table as its ``log_predictions`` wrote them (JSON as text)."""
    out = []
    for r in range(n_requests):
        rid = f"{r:032x}" if r % 2 else f"client-{r}"  # server-made hex ids and client ids
        for i in range(rows_each):
            out.append({"request_id": rid, "row": i, "ts": t0 + r + i / 10, "model": "diamonds-price",
                        "primary_model": "primary", "primary_version": "3", "fallback_model": "fallback",
                        "fallback_version": "1", "route": "fallback" if i else "primary",
                        "reasons": "out_of_range:carat;missing:cut" if i else "",
                        "prediction": _json(500.0 + r + i), "primary_prediction": _json(490.0 + r + i),
                        "fallback_prediction": _json(500.0 + r + i), "probabilities": None,
                        "latency_ms": 1.25, "features": _json({"carat": 0.5 + i, "cut": "Ideal"})})
    return out


def _row_store(engine: sa.Engine, prefix: str, rows: list[dict[str, Any]],
               outcomes: list[tuple[str, int, float]]) -> None:
    md = sa.MetaData()
    t, o = _row_table(md, prefix), _outcomes(md, prefix)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), rows)
        if outcomes:
            conn.execute(o.insert(), [{"request_id": r, "row": i, "outcome": _json(v), "ts": 5.0}
                                      for r, i, v in outcomes])


def _tables(engine: sa.Engine, prefix: str) -> set[str]:
    return {n[len(prefix):] for n in sa.inspect(engine).get_table_names() if n.startswith(prefix)}


# -- the row-per-row table ------------------------------------------------------------------------


def test_a_row_per_row_store_is_migrated_on_open_with_its_outcomes(old, tmp_path: Path) -> None:
    from guarded_serving.cli import export_frame

    url, prefix, engine = old
    rows = _old_rows(7)
    outcomes = [(rows[0]["request_id"], 0, 510.0), (rows[3]["request_id"], 1, 520.5)]
    _row_store(engine, prefix, rows, outcomes)

    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.copied == len(rows) == store.migrated.rows
    assert _tables(engine, prefix) >= {"legacy_predictions", "log_batches", "log_keys", "store_meta"}
    assert "predictions" not in _tables(engine, prefix)  # an old-version writer fails, loudly
    df = store.joined()
    assert len(df) == len(rows)
    by_key = {(r.request_id, r.row): r for r in df.itertuples()}
    for r in rows:
        got = by_key[(r["request_id"], r["row"])]
        assert (got.ts, got.route, got.reasons, got.latency_ms) == (r["ts"], r["route"], r["reasons"], 1.25)
        assert got.prediction == float(r["prediction"]) and got.primary_version == "3"
        assert got.features == {"carat": 0.5 + r["row"], "cut": "Ideal"}
    with_outcome = store.outcome_rows()
    assert sorted(zip(with_outcome.request_id, with_outcome.row, with_outcome.outcome, strict=True)) == sorted(outcomes)
    # /feedback finds old rows: the same outcome again is unchanged, a new one is stored.
    assert store.add_outcomes([outcomes[0], (rows[5]["request_id"], 1, 9.0)]) == \
        {"stored": 1, "unchanged": 1, "overwritten": 0}
    assert store.request_row_count(rows[0]["request_id"]) == 2
    # An old request is logged once, whoever sends it again.
    assert store.log_predictions([{"request_id": rows[0]["request_id"], "row": 0, "ts": 1.0}]) == 0
    exported = export_frame(store.joined(), "price")
    assert exported["price"].notna().sum() == 3 and "carat" in exported
    store.close()

    again = Store(url, prefix=prefix)  # marked: nothing to migrate, one read
    assert again.migrated is None and len(again.joined()) == len(rows)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT value FROM {prefix}store_meta")).scalar() == str(LAYOUT)
        assert conn.execute(sa.text(f"SELECT count(*) FROM {prefix}legacy_predictions")).scalar() == len(rows)
    again.close()


def _log_v2(engine: sa.Engine, prefix: str) -> dict[str, sa.Table]:
    """The log tables of 3edbacd to aa2692c (the current ones, before the layout was marked)."""
    md = sa.MetaData()
    tables = {"batches": _log_batches(md, prefix), "keys": _log_keys(md, prefix, fingerprints=True),
              "outcomes": _outcomes(md, prefix)}
    tables["parts"], tables["schemas"] = _parts_and_schemas(md, prefix)
    md.create_all(engine)
    return tables


def _append_v2(engine: sa.Engine, tables: dict[str, sa.Table], rows: list[dict[str, Any]],
               parts_per_batch: int, batch_id: int | None = None) -> None:
    """What ``append_log`` of 3edbacd to now wrote for ``rows`` (one request after another), its
    parts numbered ``parts_per_batch`` to a batch (65,536 before aa2692c)."""
    e = encode(LogBatch.from_rows(rows))
    whole = len(e.body) // BODY_PART * BODY_PART
    with engine.begin() as conn:
        s = tables["schemas"]
        if conn.execute(sa.select(s.c.id).where(s.c.id == e.schema_id)).first() is None:
            conn.execute(s.insert().values(id=e.schema_id, body=e.schema))
        ts = [r["ts"] for r in rows]
        values = {"first_ts": min(ts), "last_ts": max(ts), "rows": len(rows), "body": e.body[whole:]}
        if batch_id is not None:
            values["id"] = batch_id
        batch_id = conn.execute(tables["batches"].insert().values(**values)).inserted_primary_key[0]
        if whole:
            conn.execute(tables["parts"].insert(), [
                {"id": batch_id * parts_per_batch + i, "data": e.body[at:at + BODY_PART]}
                for i, at in enumerate(range(0, whole, BODY_PART))])
        runs: dict[str, int] = {}
        for r in rows:
            runs[r["request_id"]] = runs.get(r["request_id"], 0) + 1
        conn.execute(tables["keys"].insert(), [
            {"request_key": request_key(rid), "first_row": 0, "n_rows": n, "batch_id": batch_id}
            for rid, n in runs.items()])


def _served(tag: str, n_requests: int, rows_each: int = 3, t0: float = 1_800_000_000.0) -> list[dict[str, Any]]:
    """Rows as the recorder logs them (mappings for ``LogBatch.from_rows``)."""
    return [{"request_id": f"{tag}-{r}", "row": i, "ts": t0 + r + i / 100, "model": "diamonds-price",
             "route": "primary", "reasons": "", "prediction": 700.0 + r + i / 8, "primary_prediction": 700.0 + r + i / 8,
             "fallback_prediction": 650.25 + r, "latency_ms": 0.75 + r / 1000,
             "features": {"carat": 0.25 * i + r / 64, "cut": ["Ideal", "Good", "Fair"][i % 3]}}
            for r in range(n_requests) for i in range(rows_each)]


def test_an_old_table_beside_a_log_written_since_joins_it(old) -> None:
    # A team that upgraded before there was a migration: the old table, and a log (unmarked) of
    # the rows served since. The old rows join that log, which stays as it is.
    url, prefix, engine = old
    rows = _old_rows(4)
    _row_store(engine, prefix, rows, [(rows[0]["request_id"], 1, 1.5)])
    tables = _log_v2(engine, prefix)
    new = _served("new", 30)
    _append_v2(engine, tables, new, parts_per_batch=1 << 20)
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and not store.migrated.rebuild
    assert store.migrated.copied == len(rows) and store.migrated.tables == (f"{prefix}predictions",)
    df = store.joined()
    assert len(df) == len(rows) + len(new)
    assert df.loc[df.request_id == "new-3", "features"].tolist()[1] == {"carat": 0.25 + 3 / 64, "cut": "Good"}
    assert df.loc[(df.request_id == rows[0]["request_id"]) & (df.row == 1), "outcome"].tolist() == [1.5]
    assert store.add_outcomes([("new-0", 2, 3.0), (rows[2]["request_id"], 0, 4.0)])["stored"] == 2
    store.close()


def test_a_current_but_unmarked_store_is_only_marked(old) -> None:
    url, prefix, engine = old
    tables = _log_v2(engine, prefix)
    new = _served("new", 40)
    _append_v2(engine, tables, new, parts_per_batch=1 << 20)
    store = Store(url, prefix=prefix)
    assert store.migrated is None
    assert not any(t.startswith("legacy_") for t in _tables(engine, prefix))
    assert len(store.joined()) == len(new)
    store.close()


@pytest.mark.parametrize("batch_ids", [(None, None, None), (1, 16)], ids=["consecutive", "only-16th"])
def test_parts_numbered_the_old_way_are_renumbered(old, batch_ids) -> None:
    # 3edbacd and 1746f05 numbered a batch's parts from batch_id * 65,536; read with today's
    # 2**20 a batch got another batch's parts and the whole log failed to decode. With batches
    # 1 and 16 only the 16th has parts, and its first part's id is batch 1's first under 2**20.
    url, prefix, engine = old
    tables = _log_v2(engine, prefix)
    logged = []
    for k, batch_id in enumerate(batch_ids):
        rows = _served(f"b{k}", 1 if batch_id == 1 else 30, t0=1_800_000_000.0 + 100 * k)
        _append_v2(engine, tables, rows, parts_per_batch=1 << 16, batch_id=batch_id)
        logged += rows
    with pytest.raises(LegacyStoreError, match="numbered 65536 to a batch"):
        Store(url, prefix=prefix, migrate=False)
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.rebuild and store.migrated.copied == len(logged)
    assert {"legacy_log_batches", "legacy_log_parts", "legacy_log_keys"} <= _tables(engine, prefix)
    df = store.joined()
    assert len(df) == len(logged)
    assert sorted(df.prediction) == sorted(r["prediction"] for r in logged)
    assert store.add_outcomes([(logged[-1]["request_id"], logged[-1]["row"], 1.0)])["stored"] == 1
    store.close()


# -- the first batched layouts ----------------------------------------------------------------------


def test_the_first_batched_log_gets_its_request_ids_from_the_index(old) -> None:
    url, prefix, engine = old
    md = sa.MetaData()
    b, ix, o = _log_batches(md, prefix), _log_index(md, prefix, offsets=True), _outcomes(md, prefix)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(b.insert().values(id=1, first_ts=1717000100.0, last_ts=1717000101.75, rows=5,
                                       body=V0_BODY.read_bytes()))
        conn.execute(ix.insert(), [{"request_id": r, "first_row": f, "n_rows": n, "batch_id": 1, "offset": off}
                                   for r, f, n, off in V0_RUNS])
        conn.execute(o.insert().values(request_id="client-7", row=1, outcome="1003.5", ts=5.0))
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.copied == 5
    df = store.joined()
    want = _v0_rows()
    assert list(zip(df.request_id, df.row, strict=True)) == [(r["request_id"], r["row"]) for r in want]
    assert df.ts.tolist() == [r["ts"] for r in want] and df.route.tolist() == [r["route"] for r in want]
    for c in ("prediction", "primary_prediction", "fallback_prediction", "latency_ms", "features"):
        assert df[c].tolist() == [r[c] for r in want]
    assert df.reasons.tolist() == [";".join(r["reasons"]) for r in want]
    assert set(df.primary_version) == {"4"} and set(df.fallback_version) == {"2"}
    assert df.outcome.tolist() == [None] * 4 + [1003.5]
    assert store.add_outcomes([(V0_HEX, 2, 999.0)])["stored"] == 1
    store.close()


def test_a_log_of_both_batched_layouts_is_rebuilt_with_the_fingerprints_of_client_ids(old) -> None:
    # Upgraded from the first batched log to the version before this one without a migration:
    # log_batches holds bodies of both formats, the old log_index beside the newer log_keys.
    url, prefix, engine = old
    md = sa.MetaData()
    ix = _log_index(md, prefix, offsets=True)
    md.create_all(engine)
    tables = _log_v2(engine, prefix)
    with engine.begin() as conn:
        batch_id = conn.execute(tables["batches"].insert().values(
            first_ts=1717000100.0, last_ts=1717000101.75, rows=5, body=V0_BODY.read_bytes())).inserted_primary_key[0]
        conn.execute(ix.insert(), [{"request_id": r, "first_row": f, "n_rows": n, "batch_id": batch_id,
                                    "offset": off} for r, f, n, off in V0_RUNS])
    new = _served("new", 30)
    _append_v2(engine, tables, new, parts_per_batch=1 << 20)
    with engine.begin() as conn:
        k = tables["keys"]
        conn.execute(k.update().where(k.c.request_key == request_key("new-4")).values(fingerprint=-42))
        conn.execute(tables["outcomes"].insert(), [
            {"request_id": "client-7", "row": 0, "outcome": "1.5", "ts": 5.0},
            {"request_id": "new-4", "row": 2, "outcome": "2.5", "ts": 5.0}])
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.rebuild
    assert store.migrated.copied == 5 + len(new)
    df = store.outcome_rows()
    assert sorted(zip(df.request_id, df.row, df.outcome, strict=True)) == [("client-7", 0, 1.5), ("new-4", 2, 2.5)]
    assert len(store.joined()) == 5 + len(new)
    assert store.request_fingerprint("new-4") == (True, -42)
    assert store.request_fingerprint(V0_HEX) == (True, None)
    store.close()


def _per_buffer(body: bytes) -> bytes:
    """The V1 body as 26e3a65 to 02fb6bb wrote bodies: Arrow's per-buffer compression."""
    with pa.ipc.open_stream(pa.input_stream(pa.py_buffer(body), compression="zstd")) as r:
        table = r.read_all()
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue()


@pytest.mark.parametrize("layout", ["log_index", "log_keys without fingerprints"])
def test_a_text_keyed_index_or_one_without_fingerprints_is_rebuilt(old, layout) -> None:
    # Opening these crashed (log_keys has no fingerprint column) or lost /feedback for every old
    # row (a new log_keys beside the old log_index).
    url, prefix, engine = old
    md = sa.MetaData()
    b, o = _log_batches(md, prefix), _outcomes(md, prefix)
    if layout == "log_index":
        ix, body = _log_index(md, prefix, offsets=False), _per_buffer(V1_BODY.read_bytes())
        keys = [{"request_id": r, "first_row": 0, "n_rows": 3, "batch_id": 1} for r in V1_IDS]
    else:
        ix, body = _log_keys(md, prefix, fingerprints=False), V1_BODY.read_bytes()
        keys = [{"request_key": request_key(r), "first_row": 0, "n_rows": 3, "batch_id": 1} for r in V1_IDS]
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(b.insert().values(id=1, first_ts=1717000000.25, last_ts=1717000001.45, rows=6, body=body))
        conn.execute(ix.insert(), keys)
        conn.execute(o.insert().values(request_id=V1_IDS[1], row=2, outcome='"setosa"', ts=5.0))
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.rebuild and store.migrated.copied == 6
    df = store.joined()
    _check_v1({c: df[c].tolist() for c in df.columns})
    assert df.outcome.tolist() == [None] * 5 + ["setosa"]
    assert store.outcome_rows().request_id.tolist() == [V1_IDS[1]]
    assert store.add_outcomes([(V1_IDS[0], 0, "versicolor")])["stored"] == 1
    store.log_predictions([{"request_id": "after", "row": 0, "ts": 2e9, "prediction": 1.0}])
    assert store.request_row_count("after") == 1
    store.close()


def test_events_without_follows_get_it_and_chain_once(old) -> None:
    # cbdeb81 to 408f4c3: no follows column, so recording a drift status change failed.
    url, prefix, engine = old
    md = sa.MetaData()
    ev = sa.Table(f"{prefix}events", md,
                  sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                  sa.Column("ts", sa.Double, nullable=False),
                  sa.Column("kind", sa.Text, nullable=False),
                  sa.Column("body", sa.Text),
                  sa.Index(f"{prefix}events_kind_ts", "kind", "ts"),
                  sqlite_autoincrement=True)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(ev.insert(), [{"ts": 1.0, "kind": "drift_status", "body": '{"status": "ok"}'},
                                   {"ts": 2.0, "kind": "drift_status", "body": '{"status": "drift"}'}])
    store = Store(url, prefix=prefix)
    assert store.migrated is not None and store.migrated.events_follows and store.migrated.copied == 0
    assert [e["body"]["status"] for e in store.events("drift_status")] == ["drift", "ok"]
    first = store.add_event_after("drift_status", 0, {"status": "ok"}, ts=3.0)
    assert first is not None
    assert store.add_event_after("drift_status", 0, {"status": "ok"}, ts=3.0) is None  # recorded once
    assert store.add_event_after("drift_status", first, {"status": "drift"}, ts=4.0) is not None
    store.close()


# -- opening ----------------------------------------------------------------------------------------


def test_without_migrating_an_old_store_is_refused_and_left_as_it_was(old) -> None:
    url, prefix, engine = old
    _row_store(engine, prefix, _old_rows(2), [])
    before = _tables(engine, prefix)
    with pytest.raises(LegacyStoreError, match="migrate-store") as e:
        Store(url, prefix=prefix, migrate=False)
    assert e.value.plan.rows == 4 and "predictions" in e.value.plan.describe()
    assert _tables(engine, prefix) == before


def test_a_store_of_a_newer_layout_is_refused(old) -> None:
    url, prefix, engine = old
    Store(url, prefix=prefix).close()
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {prefix}store_meta SET value = '{LAYOUT + 1}'"))
    with pytest.raises(StoreError, match="newer guarded-serving"):
        Store(url, prefix=prefix)


def _open(url: str, prefix: str, start: Any, results: Any) -> None:
    start.wait()
    try:
        s = Store(url, prefix=prefix)
        results.put(("ok", None if s.migrated is None else s.migrated.copied))
        s.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(e)))


@pytest.mark.parametrize("kind", BACKENDS)
def test_workers_opening_an_old_store_at_once_migrate_it_once(kind: str, tmp_path: Path) -> None:
    url, prefix = _url(kind, tmp_path), _prefix()
    (tmp_path / "db").mkdir()
    engine = sa.create_engine(url)
    rows = _old_rows(3000)
    _row_store(engine, prefix, rows, [(rows[-1]["request_id"], 1, 2.0)])
    try:
        outs = released_together(_open, [(url, prefix)] * 4, timeout=120)
        assert sorted(outs, key=str) == sorted([("ok", len(rows))] + [("ok", None)] * 3, key=str)
        store = Store(url, prefix=prefix)
        assert len(store.joined(features=False)) == len(rows)
        assert store.outcome_rows().request_id.tolist() == [rows[-1]["request_id"]]
        store.close()
    finally:
        _drop_prefixed(engine, prefix)


def test_the_cli_says_what_it_would_migrate_then_migrates(tmp_path: Path, capsys) -> None:
    from guarded_serving.cli import main

    from .server import write_config

    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    engine = sa.create_engine(url)
    rows = _old_rows(5)
    _row_store(engine, "gs_", rows, [])
    cfg = write_config(tmp_path)
    assert main(["migrate-store", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gs_predictions: 10 logged row(s)" in out and "without --dry-run" in out
    assert "predictions" in _tables(engine, "gs_")
    assert main(["migrate-store", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "(10 logged row(s) copied)" in out and "gs_legacy_predictions" in out
    assert main(["migrate-store", str(cfg)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    assert main(["export", str(cfg), "--out", str(tmp_path / "log.json")]) == 0
    exported = json.loads((tmp_path / "log.json").read_text())
    assert sorted(r["request_id"] for r in exported) == sorted(r["request_id"] for r in rows)
    assert exported[0]["carat"] == 0.5
    store = Store(url)
    assert store.migrated is None and len(store.joined()) == len(rows)
    store.close()
