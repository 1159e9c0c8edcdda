"""The store: drift segments, the prediction log, outcomes and events, in SQLite or PostgreSQL.

One code path over SQLAlchemy Core serves both dialects. Several processes (the service's
workers, the CLI) may share one store: every write is one transaction, and SQLite write
transactions start with ``BEGIN IMMEDIATE`` so that writers queue on the busy timeout instead of
failing half-way.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the process
being killed, but a power loss or OS crash may lose the last few transactions. Add
``?synchronous=full`` to the URL (or pass ``synchronous="full"``) to survive those too, at the
cost of an fsync per commit. An in-memory SQLite URL (``sqlite://``) keeps one connection for
the whole store: meant for tests, not for concurrent use.

The prediction log is stored a batch at a time (``logbatch.LogBatch``: one compressed Arrow
record batch per flush in ``{prefix}log_batches``) with a small index, ``{prefix}log_keys``,
that maps each request id to its rows of a batch: one index row per request, not per row. Its key
is the request id as bytes, 16 for a server-made id (``request_key``). A store written by an older
guarded-serving is migrated to these tables when first opened (``migration``).

Every connection gets a connect timeout and a statement timeout (``timeout_s``): a database
that accepts connections and never answers is a StoreError after a few seconds, not a hang.

>>> store = Store("sqlite:///guarded-serving.sqlite3")  # doctest: +SKIP
>>> store.log_predictions([{"request_id": "r1", "row": 0, "ts": 1.0, "prediction": 2.5}])  # doctest: +SKIP
>>> store.add_outcomes([("r1", 0, 2.4)])  # doctest: +SKIP
{'stored': 1, 'unchanged': 0, 'overwritten': 0}
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..codec import dumps, jsonable, loads
from ..errors import ConflictError, NotFoundError, Problem, StoreError
from .logbatch import (
    FEATURE_PREFIX,
    LOG_COLUMNS,
    EncodedBatch,
    LogBatch,
    decode,
    encode,
    is_hex_id,
    schema_id_of,
)
from .logbatch import JSON_COLUMNS as JSON_COLUMNS  # re-exported

if TYPE_CHECKING:
    from .migration import Plan

log = logging.getLogger(__name__)

#: Columns of the prediction log as ``joined`` returns them.
PREDICTION_COLUMNS = ("request_id", "row", *LOG_COLUMNS, "features")
#: Default connect and statement timeout (s): a silent database fails fast.
DEFAULT_TIMEOUT_S = 3.0
_SQLITE_BUSY_MS = 10_000
_SYNCHRONOUS = ("off", "normal", "full", "extra")
# Keeps IN (...) lists well under SQLite's and PostgreSQL's limits on bound parameters.
_CHUNK = 500
#: A 64-bit key: in SQLite the rowid itself (INTEGER PRIMARY KEY), not a second index beside it.
_INT64 = sa.BigInteger().with_variant(sa.Integer, "sqlite")
#: Bytes of a stored part of a log body: four rows of one fill a 4 KB SQLite page.
BODY_PART = 1000
#: Part numbers per batch in ``log_parts`` ids (a body of 1 GB at most).
PARTS_PER_BATCH = 1 << 20
_NUMERIC_DTYPES: dict[str, type] = {"row": int, "ts": float, "latency_ms": float, "outcome_ts": float}


class Store:
    """Persistence for drift segments, the prediction log, outcomes and events.

    ``prefix`` is put before every table and index name, so several stores (or test runs) can
    share one database. A store written by an older guarded-serving is migrated when opened, once
    across processes (``migration``); with ``migrate=False`` it is refused (LegacyStoreError).

    >>> store = Store("sqlite:////tmp/gs.sqlite3", prefix="gs_")  # doctest: +SKIP
    >>> seg = store.add_segment("w1", 0.0, 1.0, 10, {"counts": [1, 2]})  # doctest: +SKIP
    >>> store.segments()[0]["state"]  # doctest: +SKIP
    {'counts': [1, 2]}
    """

    def __init__(self, url: str, prefix: str = "gs_", *, synchronous: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, migrate: bool = True) -> None:
        try:
            parsed = make_url(url)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad URL
            raise StoreError(f"invalid store URL: {e}") from e
        self._url_display = parsed.render_as_string(hide_password=True)
        self._password = parsed.password
        self.prefix = prefix
        self.dialect = parsed.get_backend_name()
        self.timeout_s = float(timeout_s)
        # A ping per checkout finds connections a database server dropped; a file has none to drop.
        kw: dict[str, Any] = {"pool_pre_ping": parsed.get_backend_name() != "sqlite",
                              "pool_timeout": self.timeout_s}
        if self.dialect == "postgresql":
            ms = max(1, int(self.timeout_s * 1000))
            # connect_timeout bounds the connection attempt; statement_timeout a query the server
            # runs; tcp_user_timeout a server that stops acknowledging what we send.
            kw["connect_args"] = {"connect_timeout": max(1, round(self.timeout_s)),
                                  "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
                                  "tcp_user_timeout": ms, "keepalives": 1, "keepalives_idle": 5,
                                  "keepalives_interval": 2, "keepalives_count": 2}
        sync = synchronous or parsed.query.get("synchronous") or "normal"
        if isinstance(sync, tuple):
            sync = sync[-1]
        if self.dialect == "sqlite":
            if sync.lower() not in _SYNCHRONOUS:
                raise StoreError(f"synchronous: must be one of {_SYNCHRONOUS}, got {sync!r}")
            parsed = parsed.difference_update_query(["synchronous"])
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                try:
                    Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StoreError(f"cannot create the directory of SQLite file {database}: {e}") from e
            else:
                kw["poolclass"] = StaticPool  # one connection: nothing to wait for in a pool
                kw["connect_args"] = {"check_same_thread": False}
                del kw["pool_timeout"]
        try:
            self.engine = sa.create_engine(parsed, **kw)
        except Exception as e:  # noqa: BLE001 - unknown driver, bad arguments
            raise StoreError(f"cannot open store {self._url_display}: {self._clean(e)}") from e
        if self.dialect == "sqlite":
            # Writers of one file queue on its lock for a moment: wait longer than for a server.
            _configure_sqlite(self.engine, sync.upper(), max(_SQLITE_BUSY_MS, int(self.timeout_s * 1000)))
        # A worker forked after the store was made must not reuse the parent's connections.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _dispose_in_child(ref))
        self.metadata = sa.MetaData()
        #: Log schemas known to be stored (id -> schema message): written and read once each.
        self._schemas: dict[int, bytes] = {}
        #: What opening migrated from an older guarded-serving's tables (None: nothing).
        self.migrated: Plan | None = None
        self._define_tables()
        self._open_tables(migrate)

    # -- setup ---------------------------------------------------------------------------------

    def _define_tables(self) -> None:
        p, md = self.prefix, self.metadata
        text, double = sa.Text, sa.Double
        self.t_segments = sa.Table(
            f"{p}drift_segments", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("worker", text, nullable=False),
            sa.Column("first_ts", double, nullable=False),
            sa.Column("last_ts", double, nullable=False),
            sa.Column("rows", sa.Integer, nullable=False),
            sa.Column("state", text, nullable=False),
            sa.Index(f"{p}drift_segments_last_ts", "last_ts"),
            # Never reuse an id: a compaction must not delete a newer segment by an old id.
            sqlite_autoincrement=True,
        )
        self.t_log_batches = sa.Table(
            f"{p}log_batches", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("first_ts", double, nullable=False),
            sa.Column("last_ts", double, nullable=False),
            sa.Column("rows", sa.Integer, nullable=False),
            sa.Column("body", sa.LargeBinary, nullable=False),
            sa.Index(f"{p}log_batches_last_ts", "last_ts"),
            sqlite_autoincrement=True,
        )
        # The leading whole parts of a body longer than ``BODY_PART`` bytes (the rest, under a part,
        # stays in its ``log_batches`` row), as PostgreSQL's TOAST cuts long values: a body of 2-4
        # KB in one row took a whole 4 KB SQLite page, as much as its bytes again; parts of one
        # size fill pages four to one. Keyed ``batch_id * PARTS_PER_BATCH + part``: a rowid in SQLite.
        self.t_log_parts = sa.Table(
            f"{p}log_parts", md,
            sa.Column("id", _INT64, primary_key=True, autoincrement=False),
            sa.Column("data", sa.LargeBinary, nullable=False),
        )
        # One row per run of a request's rows in a batch (one per request for the service),
        # keyed by ``request_key`` (16 bytes for a server-made id where its text takes 32: at one
        # row a request, the index is a third of the log). Named anew when the key became bytes
        # (it was text in ``log_index``).
        self.t_log_index = sa.Table(
            f"{p}log_keys", md,
            sa.Column("request_key", sa.LargeBinary, primary_key=True),
            sa.Column("first_row", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("n_rows", sa.Integer, nullable=False),
            sa.Column("batch_id", sa.Integer, nullable=False),
            # The fingerprint of a client-named request's rows (``idempotency``); null for ids
            # the server made (no bytes in SQLite).
            sa.Column("fingerprint", sa.BigInteger),
            # No index on batch_id: bodies carry their own request ids, so reads never need
            # one, and only the hourly purge scans this table by batch.
            sqlite_with_rowid=False,
        )
        # The Arrow schema of log bodies, each kept once (with the batch's constant columns):
        # at 50 rows a flush it was an eighth of a body.
        self.t_log_schemas = sa.Table(
            f"{p}log_schemas", md,
            sa.Column("id", _INT64, primary_key=True, autoincrement=False),
            sa.Column("body", sa.LargeBinary, nullable=False),
        )
        self.t_outcomes = sa.Table(
            f"{p}outcomes", md,
            sa.Column("request_id", text, primary_key=True),
            sa.Column("row", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("outcome", text),
            sa.Column("ts", double, nullable=False),
        )
        # What layout the store's tables are in (``migration.LAYOUT``): an opener reads it and
        # knows whether an older guarded-serving's tables need migrating.
        self.t_meta = sa.Table(
            f"{p}store_meta", md,
            sa.Column("name", text, primary_key=True),
            sa.Column("value", text, nullable=False),
        )
        self.t_events = sa.Table(
            f"{p}events", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("ts", double, nullable=False),
            sa.Column("kind", text, nullable=False),
            sa.Column("body", text),
            # For events that form a chain (drift status): the id of the event this one follows.
            # Unique per kind, so of several processes that see the same change only one records it.
            sa.Column("follows", sa.Integer),
            sa.Index(f"{p}events_kind_ts", "kind", "ts"),
            sa.UniqueConstraint("kind", "follows", name=f"{p}events_kind_follows"),
            sqlite_autoincrement=True,
        )

    def _open_tables(self, migrate: bool) -> None:
        """Create missing tables, or bring an older guarded-serving's tables to the current
        layout (``migration``), once across the processes that open the store at once."""
        from . import migration  # it builds on this module

        if migration.is_current(self):
            return
        deadline = time.monotonic() + migration.OPEN_WAIT_S
        attempt = 0
        while True:
            attempt += 1
            try:
                # BEGIN IMMEDIATE on SQLite: a deferred transaction that read the schema and then
                # wants to write fails at once with "database is locked" instead of waiting its turn.
                with self.engine.connect().execution_options(gs_begin_immediate=True) as conn, conn.begin():
                    self.migrated = migration.open_tables(self, conn, migrate)
                return
            except SQLAlchemyError as e:
                # The loser of a CREATE race with a process of an older version sees "already
                # exists"; a process migrating the store holds SQLite's write lock for a while.
                if time.monotonic() < deadline and (_is_duplicate_object(e) or "database is locked" in str(e)):
                    if attempt > 1:
                        log.warning("store %s: waiting for another process to finish creating or "
                                    "migrating its tables", self._url_display)
                    time.sleep(min(0.05 * attempt, 1.0))
                    continue
                raise StoreError(f"cannot create the tables of store {self._url_display}: "
                                 f"{self._clean(e)}") from e

    @property
    def url_display(self) -> str:
        """The store URL with its password hidden."""
        return self._url_display

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception as e:  # noqa: BLE001 - a health check says no rather than raising
            log.debug("store ping failed: %s", self._clean(e))
            return False

    # -- transactions ----------------------------------------------------------------------------

    @contextmanager
    def _write(self, what: str) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite), committed on exit."""
        try:
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn = conn.execution_options(gs_begin_immediate=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as e:
            raise StoreError(f"{what} failed on store {self._url_display}: {self._clean(e)}") from e

    @contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn
        except SQLAlchemyError as e:
            raise StoreError(f"{what} failed on store {self._url_display}: {self._clean(e)}") from e

    def _clean(self, e: BaseException) -> str:
        """A short error text: the driver's message without SQL or parameters, password hidden."""
        msg = str(e.orig) if isinstance(e, DBAPIError) and e.orig is not None else str(e)
        msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        if self._password:
            msg = msg.replace(str(self._password), "***")
        return f"{type(e.orig if isinstance(e, DBAPIError) and e.orig is not None else e).__name__}: {msg[:500]}"

    def _insert(self, table: sa.Table) -> Any:
        """INSERT that ignores rows whose primary key exists (ON CONFLICT DO NOTHING)."""
        mod = postgresql if self.dialect == "postgresql" else sqlite
        return mod.insert(table).on_conflict_do_nothing()

    # -- drift segments --------------------------------------------------------------------------

    def add_segment(self, worker: str, first_ts: float, last_ts: float, rows: int,
                    state: dict[str, Any]) -> int:
        """Store one worker's drift window state; returns its id."""
        t = self.t_segments
        with self._write("adding a drift segment") as conn:
            res = conn.execute(t.insert().values(
                worker=worker, first_ts=float(first_ts), last_ts=float(last_ts), rows=int(rows),
                state=dumps(state)))
            return _new_id(res)

    def segments(self, since: float | None = None) -> list[dict[str, Any]]:
        """Stored segments (last_ts >= since), ordered by last_ts then id."""
        t = self.t_segments
        q = sa.select(t).order_by(t.c.last_ts, t.c.id)
        if since is not None:
            q = q.where(t.c.last_ts >= float(since))
        with self._read("reading drift segments") as conn:
            rows = conn.execute(q).mappings().all()
        return [{**r, "state": json.loads(r["state"])} for r in rows]

    def replace_segments(self, old_ids: list[int], new: dict[str, Any]) -> int:
        """Delete ``old_ids`` and insert their merge ``new`` atomically; -1 (and no change) when
        one of them is already gone, i.e. another process compacted them first."""
        t = self.t_segments
        ids = sorted({int(i) for i in old_ids})
        with self._write("compacting drift segments") as conn:
            gone = conn.execute(t.delete().where(t.c.id.in_(ids))).rowcount if ids else 0
            if gone != len(ids):
                conn.rollback()
                return -1
            res = conn.execute(t.insert().values(
                worker=str(new["worker"]), first_ts=float(new["first_ts"]),
                last_ts=float(new["last_ts"]), rows=int(new["rows"]), state=dumps(new["state"])))
            return _new_id(res)

    # -- prediction log --------------------------------------------------------------------------

    def log_predictions(self, rows: list[dict[str, Any]]) -> int:
        """Log prediction rows given as mappings (``PREDICTION_COLUMNS``; JSON columns as Python
        objects, ``reasons`` as a list or a ';'-joined string); see ``append_log``."""
        if not rows:
            return 0
        for r in rows:
            if r.get("request_id") is None or r.get("row") is None or r.get("ts") is None:
                raise StoreError(f"a prediction row needs request_id, row and ts; got keys {sorted(r)}")
        return self.append_log(LogBatch.from_rows(rows))

    def append_log(self, batch: LogBatch) -> int:
        """Store a batch of log rows in one transaction: one body and its index rows. Rows whose
        (request_id, row) is already logged, or repeated in the batch, are left out. Returns how
        many rows were stored."""
        if not len(batch):
            return 0
        what = f"logging {len(batch)} prediction row(s)"
        runs = _runs(batch.request_id, batch.row)
        ids = runs.request_id.tolist()
        # Ids the server made (one run each, no client fingerprint) were never logged before,
        # but by a retried write whose commit did go through: that one breaks the index's primary
        # key, and the batch is written again with the lookup. Saves a query per batch.
        fresh = not batch.fingerprints and len(set(ids)) == len(ids) and all(map(is_hex_id, ids))
        try:
            with self._write(what) as conn:
                n, encoded = self._append(conn, batch, runs, look_up=not fresh)
        except StoreError as e:
            if not (fresh and isinstance(e.__cause__, IntegrityError)):
                raise
            with self._write(what) as conn:
                n, encoded = self._append(conn, batch, runs, look_up=True)
        if encoded is not None:
            self._schemas[encoded.schema_id] = encoded.schema  # committed
        return n

    def _append(self, conn: Connection, batch: LogBatch, runs: _Runs | None = None,
                look_up: bool = True) -> tuple[int, EncodedBatch | None]:
        """``append_log`` within the caller's transaction: (rows stored, the batch as encoded).
        ``look_up``: leave out rows already logged (False: the caller knows none are)."""
        t, ix = self.t_log_batches, self.t_log_index
        runs = _runs(batch.request_id, batch.row) if runs is None else runs
        keep = self._new_rows(conn, batch, runs) if look_up else None
        if keep is not None:
            batch = batch.take(keep)
            runs = _runs(batch.request_id, batch.row)
        if not len(batch):
            return 0, None
        encoded = encode(batch)
        if encoded.schema_id not in self._schemas:
            conn.execute(self._insert(self.t_log_schemas).values(id=encoded.schema_id, body=encoded.schema))
        ts = batch.columns["ts"]
        body = encoded.body
        whole = len(body) // BODY_PART * BODY_PART
        if whole // BODY_PART >= PARTS_PER_BATCH:
            raise StoreError(f"a log batch of {len(batch)} rows encodes to {len(body)} bytes, more "
                             f"than the {BODY_PART * PARTS_PER_BATCH} a batch can hold; flush more often")
        res = conn.execute(t.insert().values(
            first_ts=float(np.nanmin(ts)), last_ts=float(np.nanmax(ts)), rows=len(batch),
            body=body[whole:]))
        batch_id = _new_id(res)
        if whole:
            first = batch_id * PARTS_PER_BATCH
            conn.execute(self.t_log_parts.insert(), [
                {"id": first + i, "data": body[at:at + BODY_PART]}
                for i, at in enumerate(range(0, whole, BODY_PART))])
        fps = batch.fingerprints
        conn.execute(ix.insert(), [
            {"request_key": request_key(rid), "first_row": first, "n_rows": n, "batch_id": batch_id,
             "fingerprint": fps.get(rid)}
            for rid, first, n in runs.rows()])
        return len(batch), encoded

    def _new_rows(self, conn: Connection, batch: LogBatch, runs: _Runs) -> np.ndarray | None:
        """Mask of the batch's rows not logged yet (and first of their key within the batch);
        None when that is all of them: distinct requests, none logged before (the common case,
        checked a request at a time, not a row at a time)."""
        ids = runs.request_id.tolist()
        logged = self._coverage(conn, sorted(set(ids)))
        if batch.fingerprints and logged:
            self._warn_reused(conn, batch.fingerprints, logged)
        if not logged and len(set(ids)) == len(ids):
            return None
        keys = list(zip(batch.request_id.tolist(), batch.row.tolist(), strict=True))
        seen: set[tuple[str, int]] = set()
        keep = np.ones(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            covered = logged.get(key[0])
            if key in seen or (covered and any(a <= key[1] < a + n for a, n in covered)):
                keep[i] = False
            seen.add(key)
        return keep

    def _coverage(self, conn: Connection, request_ids: list[str]) -> dict[str, list[tuple[int, int]]]:
        """request id -> its logged runs (first_row, n_rows)."""
        ix = self.t_log_index
        out: dict[str, list[tuple[int, int]]] = {}
        for chunk in _chunks(request_ids):
            keys = [request_key(r) for r in chunk]
            q = sa.select(ix.c.request_key, ix.c.first_row, ix.c.n_rows).where(ix.c.request_key.in_(keys))
            for key, first, n in conn.execute(q):
                out.setdefault(request_id_of(bytes(key)), []).append((int(first), int(n)))
        return out

    def _warn_reused(self, conn: Connection, fingerprints: dict[str, int],
                     logged: dict[str, list[tuple[int, int]]]) -> None:
        # A client id reused for other rows on two workers within one flush interval passes
        # both workers' checks; the later rows are not logged (the key is taken): say so.
        for rid in sorted(set(fingerprints) & set(logged)):
            _, stored = self._fingerprint(conn, rid)
            if stored is not None and stored != fingerprints[rid]:
                log.warning("request id %r was used for other rows on another worker at the same "
                            "time; the later request's rows are not logged", rid)

    def _whole_bodies(self, conn: Connection, rows: Sequence[Any]) -> list[tuple[int, bytes]]:
        """(batch id, body) of ``log_batches`` rows (id, body), their parts put back in front."""
        ids = [int(r[0]) for r in rows]
        parts: dict[int, list[bytes]] = {}
        for cond in self._part_ranges(ids):
            pt = self.t_log_parts
            for pid, data in conn.execute(sa.select(pt.c.id, pt.c.data).where(cond).order_by(pt.c.id)):
                parts.setdefault(int(pid) // PARTS_PER_BATCH, []).append(bytes(data))
        return [(i, b"".join([*parts.get(i, ()), bytes(r[1])])) for i, r in zip(ids, rows, strict=True)]

    def _part_ranges(self, batch_ids: list[int]) -> Iterator[Any]:
        """Conditions on ``log_parts.id`` that cover the parts of ``batch_ids``, a query each."""
        ids = sorted(set(batch_ids))
        spans: list[tuple[int, int]] = []
        for i in ids:  # consecutive batch ids: one range
            if spans and spans[-1][1] == i:
                spans[-1] = (spans[-1][0], i + 1)
            else:
                spans.append((i, i + 1))
        pid = self.t_log_parts.c.id
        for at in range(0, len(spans), _CHUNK):
            yield sa.or_(*(sa.and_(pid >= a * PARTS_PER_BATCH, pid < b * PARTS_PER_BATCH)
                           for a, b in spans[at:at + _CHUNK]))

    def _load_schemas(self, conn: Connection, ids: set[int | None]) -> None:
        s = self.t_log_schemas
        missing = sorted(i for i in ids if i is not None and i not in self._schemas)
        if missing:
            for i, body in conn.execute(sa.select(s.c.id, s.c.body).where(s.c.id.in_(missing))):
                self._schemas[int(i)] = bytes(body)

    def request_fingerprint(self, request_id: str) -> tuple[bool, int | None]:
        """(whether ``request_id`` is logged, the fingerprint of its rows if it was client-named)."""
        with self._read("looking up a request id") as conn:
            return self._fingerprint(conn, str(request_id))

    def _fingerprint(self, conn: Connection, request_id: str) -> tuple[bool, int | None]:
        ix = self.t_log_index
        q = sa.select(ix.c.fingerprint).where(ix.c.request_key == request_key(request_id)).limit(1)
        found = conn.execute(q).first()
        return (False, None) if found is None else (True, None if found[0] is None else int(found[0]))

    def request_row_count(self, request_id: str) -> int:
        """How many rows of ``request_id`` are logged (0 if unknown)."""
        ix = self.t_log_index
        q = sa.select(sa.func.coalesce(sa.func.sum(ix.c.n_rows), 0)).where(
            ix.c.request_key == request_key(str(request_id)))
        with self._read("counting the rows of a request") as conn:
            return int(conn.execute(q).scalar_one())

    def log_size(self) -> dict[str, int]:
        """Rows logged, and bytes of their bodies and index entries (request ids and numbers)."""
        t, ix = self.t_log_batches, self.t_log_index
        with self._read("measuring the prediction log") as conn:
            rows, body = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.rows), 0),
                                                sa.func.coalesce(sa.func.sum(sa.func.length(t.c.body)), 0))).one()
            body += conn.execute(sa.select(sa.func.coalesce(
                sa.func.sum(sa.func.length(self.t_log_parts.c.data)), 0))).scalar_one()
            runs, ids = conn.execute(sa.select(sa.func.count(),
                                               sa.func.coalesce(sa.func.sum(sa.func.length(ix.c.request_key)), 0))).one()
        return {"rows": int(rows), "body_bytes": int(body), "index_entries": int(runs),
                "index_key_bytes": int(ids)}

    def purge_predictions(self, older_than_ts: float) -> int:
        """Delete log batches whose rows are all older than ``older_than_ts``, their index rows and
        the outcomes of their requests; returns how many logged rows went."""
        t, ix, o = self.t_log_batches, self.t_log_index, self.t_outcomes
        cut = float(older_than_ts)
        old = sa.select(t.c.id).where(t.c.last_ts < cut)
        with self._write("purging old predictions") as conn:
            n = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.rows), 0)).where(t.c.last_ts < cut)).scalar_one()
            gone = sorted({request_id_of(bytes(k)) for (k,) in conn.execute(
                sa.select(ix.c.request_key).where(ix.c.batch_id.in_(old)))})
            for chunk in _chunks(gone):
                conn.execute(o.delete().where(o.c.request_id.in_(chunk)))
            for cond in self._part_ranges([int(i) for (i,) in conn.execute(old)]):
                conn.execute(self.t_log_parts.delete().where(cond))
            conn.execute(ix.delete().where(ix.c.batch_id.in_(old)))
            conn.execute(t.delete().where(t.c.last_ts < cut))
            return int(n)

    # -- outcomes --------------------------------------------------------------------------------

    def add_outcomes(self, items: Sequence[tuple[str, int, Any]], overwrite: bool = False) -> dict[str, int]:
        """Record true outcomes of logged rows, all or nothing, durably.

        Raises NotFoundError (nothing written) when a request id or row was never logged, and
        ConflictError (nothing written) when a row already has a different outcome and
        ``overwrite`` is false. Returns ``{"stored", "unchanged", "overwritten"}`` counts.
        """
        wanted: dict[tuple[str, int], Any] = {}
        problems: list[Problem] = []
        for rid, row, outcome in items:
            key, value = (str(rid), int(row)), jsonable(outcome)
            if key in wanted and wanted[key] != value and not overwrite:
                problems.append(Problem(
                    problem=f"request {key[0]}: row {key[1]} is given two different outcomes",
                    row=key[1], expected=_text(wanted[key]), got=value))
            wanted[key] = value
        if problems:
            raise ConflictError(f"{len(problems)} outcome(s) contradict each other", problems)
        if not wanted:
            return {"stored": 0, "unchanged": 0, "overwritten": 0}
        o = self.t_outcomes
        now = time.time()
        with self._write(f"storing {len(wanted)} outcome(s)") as conn:
            runs = self._coverage(conn, sorted({k[0] for k in wanted}))
            for key in wanted:
                if any(a <= key[1] < a + n for a, n in runs.get(key[0], ())):
                    continue
                if key[0] in runs:
                    n = sum(n for _, n in runs[key[0]])
                    problems.append(Problem(
                        problem=f"unknown_row: request {key[0]} has {n} row(s); row {key[1]} was never logged",
                        row=key[1], expected=f"0 <= row < {n}", got=key[1]))
                else:
                    problems.append(Problem(
                        problem=f"unknown_request: request id {key[0]!r} is not in the prediction log",
                        row=key[1], got=key[0]))
            if problems:
                raise NotFoundError(f"{len(problems)} outcome(s) name a request or row that was never "
                                    "logged (or has been purged)", problems)
            # Insert first and compare only what was already there: on PostgreSQL a concurrent
            # insert of the same key makes ours wait for it, then skip, then see its value.
            params = [{"request_id": k[0], "row": k[1], "outcome": dumps(v), "ts": now}
                      for k, v in wanted.items()]
            ins = self._insert(o).returning(o.c.request_id, o.c.row)
            inserted = {(r, int(i)) for r, i in conn.execute(ins, params)}
            existing: dict[tuple[str, int], Any] = {}
            rest = [k for k in wanted if k not in inserted]
            for chunk in _chunks(sorted({k[0] for k in rest})):
                q = sa.select(o.c.request_id, o.c.row, o.c.outcome).where(o.c.request_id.in_(chunk))
                for rec in conn.execute(q):
                    existing[(rec[0], int(rec[1]))] = loads(rec[2])
            counts = {"stored": len(inserted), "unchanged": 0, "overwritten": 0}
            changed = []
            for key in rest:
                old, new = existing.get(key), wanted[key]
                if _json_equal(old, new):
                    counts["unchanged"] += 1
                elif overwrite:
                    changed.append({"k_rid": key[0], "k_row": key[1], "outcome": dumps(new), "ts": now})
                else:
                    problems.append(Problem(
                        problem=f"request {key[0]}: row {key[1]} already has a different outcome",
                        row=key[1], expected=_text(old), got=new))
            if problems:
                conn.rollback()
                raise ConflictError(f"{len(problems)} outcome(s) differ from the stored ones; "
                                    "nothing was written (overwrite to replace them)", problems)
            if changed:
                upd = (o.update()
                       .where(o.c.request_id == sa.bindparam("k_rid"), o.c.row == sa.bindparam("k_row"))
                       .values(outcome=sa.bindparam("outcome"), ts=sa.bindparam("ts")))
                conn.execute(upd, changed)
                counts["overwritten"] = len(changed)
            return counts

    def joined(self, since: float | None = None, with_outcomes_only: bool = False,
               limit: int | None = None, features: bool = True) -> pd.DataFrame:
        """Prediction rows with their outcomes (null when none), ordered by ts, request_id, row.

        ``limit`` keeps the most recent rows. JSON columns come back as Python objects.
        """
        return self._joined(since, with_outcomes_only, limit, features=features)

    def outcome_rows(self, since: float | None = None, limit: int | None = None) -> pd.DataFrame:
        """Like ``joined(with_outcomes_only=True)`` without the features column."""
        return self._joined(since, True, limit, features=False)

    def _joined(self, since: float | None, inner: bool, limit: int | None, features: bool) -> pd.DataFrame:
        t, ix, o = self.t_log_batches, self.t_log_index, self.t_outcomes
        with self._read("reading the prediction log") as conn:
            if inner:
                outcomes = conn.execute(sa.select(o.c.request_id, o.c.row, o.c.outcome, o.c.ts)).all()
                rids = sorted({r[0] for r in outcomes})
                ids: set[int] = set()
                for chunk in _chunks(rids):
                    keys = [request_key(r) for r in chunk]
                    ids.update(int(i) for (i,) in conn.execute(
                        sa.select(ix.c.batch_id).where(ix.c.request_key.in_(keys)).distinct()))
                q = sa.select(t.c.id, t.c.body).where(t.c.id.in_(sorted(ids))) if ids else None
            else:
                outcomes = None
                q = sa.select(t.c.id, t.c.body)
            if q is not None and since is not None:
                q = q.where(t.c.last_ts >= float(since))
            bodies = [] if q is None else self._whole_bodies(conn, conn.execute(q.order_by(t.c.id)).all())
            self._load_schemas(conn, {schema_id_of(b) for _, b in bodies} - {None})
            if outcomes is None:
                outcomes = conn.execute(sa.select(o.c.request_id, o.c.row, o.c.outcome, o.c.ts)).all()
        frame = _log_frame(bodies, features, self._schemas)
        if since is not None and len(frame):
            frame = frame[frame["ts"].to_numpy() >= float(since)]
        got = {(r[0], int(r[1])): (loads(r[2]), float(r[3])) for r in outcomes}
        row_keys = zip(frame["request_id"].tolist(), frame["row"].tolist(), strict=True)
        found = [got.get(k) for k in row_keys]
        frame = frame.assign(outcome=pd.Series([None if f is None else f[0] for f in found], dtype=object,
                                               index=frame.index),
                             outcome_ts=np.array([np.nan if f is None else f[1] for f in found], dtype=float))
        if inner:
            frame = frame.loc[np.array([f is not None for f in found], dtype=bool)]
        frame = frame.sort_values(["ts", "request_id", "row"], kind="stable").reset_index(drop=True)
        if limit is not None:
            frame = frame.tail(int(limit)).reset_index(drop=True)
        return frame

    # -- events ----------------------------------------------------------------------------------

    def add_event(self, kind: str, body: Any, ts: float | None = None) -> int:
        """Record an event (drift status change, alert); returns its id."""
        t = self.t_events
        with self._write("adding an event") as conn:
            res = conn.execute(t.insert().values(
                ts=time.time() if ts is None else float(ts), kind=str(kind), body=dumps(body)))
            return _new_id(res)

    def add_event_after(self, kind: str, follows: int, body: Any, ts: float | None = None) -> int | None:
        """Record an event that follows event ``follows`` (0 for the first) of its kind; None when
        another process recorded one after it first, so a change is recorded (and alerted) once."""
        t = self.t_events
        stmt = self._insert(t).values(ts=time.time() if ts is None else float(ts), kind=str(kind),
                                      body=dumps(body), follows=int(follows))
        with self._write("adding an event") as conn:
            res = conn.execute(stmt.returning(t.c.id))
            row = res.first()
            return None if row is None else int(row[0])

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The most recently recorded event of ``kind`` (by id, not by a host's clock)."""
        t = self.t_events
        q = sa.select(t).where(t.c.kind == kind).order_by(t.c.id.desc()).limit(1)
        with self._read("reading events") as conn:
            row = conn.execute(q).mappings().first()
        return None if row is None else {**row, "body": loads(row["body"])}

    def events(self, kind: str | None = None, since: float | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
        """The most recent events (newest first), optionally of one kind and from ``since``."""
        t = self.t_events
        q = sa.select(t).order_by(t.c.ts.desc(), t.c.id.desc()).limit(int(limit))
        if kind is not None:
            q = q.where(t.c.kind == kind)
        if since is not None:
            q = q.where(t.c.ts >= float(since))
        with self._read("reading events") as conn:
            rows = conn.execute(q).mappings().all()
        return [{**r, "body": loads(r["body"])} for r in rows]


class LazyStore:
    """A ``Store`` opened on first use and shared by a process's threads: call it for the store.

    Opening (which connects) holds no lock, so threads never queue behind a connection attempt;
    after a failed attempt, calls fail at once with the same StoreError for ``retry_s`` seconds,
    so a database that is down costs one timeout per few seconds, not one per call.

    >>> store = LazyStore("sqlite:///gs.sqlite3")  # doctest: +SKIP
    >>> store().segments()  # doctest: +SKIP
    """

    def __init__(self, url: str, prefix: str = "gs_", timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry_s: float = 2.0) -> None:
        self.url, self.prefix, self.timeout_s, self.retry_s = url, prefix, timeout_s, retry_s
        self._store: Store | None = None
        self._error: StoreError | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        try:
            self.url_display = make_url(url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - reported when opened
            self.url_display = "(invalid store URL)"

    def __call__(self) -> Store:
        store = self._store
        if store is not None:
            return store
        if self._error is not None and time.monotonic() < self._retry_at:
            raise StoreError(self._error.message)
        try:
            store = Store(self.url, prefix=self.prefix, timeout_s=self.timeout_s)
        except StoreError as e:
            self._error, self._retry_at = e, time.monotonic() + self.retry_s
            raise
        with self._lock:
            if self._store is None:
                self._store, self._error = store, None
                return store
        store.close()
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


# -- helpers -------------------------------------------------------------------------------------


def _configure_sqlite(engine: sa.Engine, synchronous: str, busy_timeout_ms: int) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook issue BEGIN itself: the driver's implicit transactions
        # would start after a SELECT, too late to make read-then-write atomic.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front so two of them queue on busy_timeout instead of
        # one failing when it upgrades a read lock.
        immediate = conn.get_execution_options().get("gs_begin_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _new_id(res: sa.CursorResult[Any]) -> int:
    key = res.inserted_primary_key
    assert key is not None
    return int(key[0])


def _dispose_in_child(ref: weakref.ref[Store]) -> None:
    store = ref()
    if store is not None:
        store.engine.dispose(close=False)


def _is_duplicate_object(e: BaseException) -> bool:
    text = str(getattr(e, "orig", None) or e).lower()
    return "already exists" in text or "duplicate" in text


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


def _json_equal(a: Any, b: Any) -> bool:
    return bool(json.loads(dumps(a)) == json.loads(dumps(b)))


def _text(v: Any) -> str:
    return json.dumps(v, default=str)


def request_key(request_id: str) -> bytes:
    """The index key of a request id: 16 bytes for 32 lowercase hex digits (a server-made id),
    else its ASCII bytes padded with 0xff to at least 17 (so no two ids share a key)."""
    if is_hex_id(request_id):
        return bytes.fromhex(request_id)
    raw = request_id.encode("utf-8")
    return raw + b"\xff" * (17 - len(raw))


def request_id_of(key: bytes) -> str:
    """The request id of an index key (``request_key`` reversed)."""
    return key.hex() if len(key) == 16 else key.rstrip(b"\xff").decode("utf-8")


@dataclass(frozen=True)
class _Runs:
    """Runs of consecutive rows of one request in a batch: its id, first row and length."""

    request_id: np.ndarray
    first_row: np.ndarray
    n_rows: np.ndarray

    def rows(self) -> Iterator[tuple[str, int, int]]:
        return zip(self.request_id.tolist(), self.first_row.tolist(), self.n_rows.tolist(), strict=True)


def _runs(request_id: np.ndarray, row: np.ndarray) -> _Runs:
    """The runs of a batch, found over whole columns."""
    n = len(row)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = (request_id[1:] != request_id[:-1]) | (row[1:] != row[:-1] + 1)
    first = np.flatnonzero(starts)
    return _Runs(request_id[first], np.asarray(row)[first], np.diff(np.append(first, n)))


#: Log columns present in a read only when some row has a value (a challenger was configured).
CHALLENGER_COLUMNS = ("challenger_prediction", "challenger_version")


def _log_frame(bodies: Sequence[Any], features: bool, schemas: dict[int, bytes]) -> pd.DataFrame:
    """The log rows of ``bodies`` as a DataFrame in ``PREDICTION_COLUMNS`` order."""
    parts: list[dict[str, Any]] = []
    for _batch_id, body in bodies:
        cols = decode(bytes(body), schemas)
        n = len(cols["ts"])
        part: dict[str, Any] = {"request_id": cols["request_id"], "row": cols["row"].astype(np.int64)}
        # Batches written before a column existed lack it: null there.
        part.update({c: cols[c] if c in cols else np.full(n, None, dtype=object) for c in LOG_COLUMNS})
        if features:
            names = [c for c in cols if c.startswith(FEATURE_PREFIX)]
            feats = pd.DataFrame({c[len(FEATURE_PREFIX):]: cols[c] for c in names}, index=range(n))
            part["features"] = np.array([jsonable(d) for d in feats.to_dict("records")] if names
                                        else [None] * n, dtype=object)
        parts.append(part)
    names = [c for c in PREDICTION_COLUMNS if features or c != "features"]
    if not parts:
        return pd.DataFrame({c: pd.Series([], dtype=_NUMERIC_DTYPES.get(c, object)) for c in names
                             if c not in CHALLENGER_COLUMNS})
    data = {c: np.concatenate([p[c] for p in parts]) for c in names}
    frame = pd.DataFrame({c: pd.Series(data[c], dtype=_NUMERIC_DTYPES.get(c, object)) for c in names})
    frame["reasons"] = frame["reasons"].map(lambda v: "" if v is None or v != v else v)
    # A challenger's columns only where one was scored (a service with no challenger has none).
    return frame.drop(columns=[c for c in CHALLENGER_COLUMNS if frame[c].isna().all()])
