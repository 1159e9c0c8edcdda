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

>>> store = Store("sqlite:///guarded-serving.sqlite3")  # doctest: +SKIP
>>> store.log_predictions([{"request_id": "r1", "row": 0, "ts": 1.0, "prediction": 2.5}])  # doctest: +SKIP
>>> store.add_outcomes([("r1", 0, 2.4)])  # doctest: +SKIP
{'stored': 1, 'unchanged': 0, 'overwritten': 0}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..errors import ConflictError, NotFoundError, Problem, StoreError

log = logging.getLogger(__name__)

#: Columns of the prediction log holding JSON (given and returned as Python objects).
JSON_COLUMNS = ("prediction", "primary_prediction", "fallback_prediction", "probabilities", "features")
PREDICTION_COLUMNS = (
    "request_id", "row", "ts", "model", "primary_model", "primary_version", "fallback_model",
    "fallback_version", "route", "reasons", "prediction", "primary_prediction", "fallback_prediction",
    "probabilities", "latency_ms", "features",
)
_BUSY_TIMEOUT_MS = 10_000
_SYNCHRONOUS = ("off", "normal", "full", "extra")
# Keeps IN (...) lists well under SQLite's and PostgreSQL's limits on bound parameters.
_CHUNK = 500
_NUMERIC_DTYPES: dict[str, type] = {"row": int, "ts": float, "latency_ms": float, "outcome_ts": float}


class Store:
    """Persistence for drift segments, the prediction log, outcomes and events.

    ``prefix`` is put before every table and index name, so several stores (or test runs) can
    share one database.

    >>> store = Store("sqlite:////tmp/gs.sqlite3", prefix="gs_")  # doctest: +SKIP
    >>> seg = store.add_segment("w1", 0.0, 1.0, 10, {"counts": [1, 2]})  # doctest: +SKIP
    >>> store.segments()[0]["state"]  # doctest: +SKIP
    {'counts': [1, 2]}
    """

    def __init__(self, url: str, prefix: str = "gs_", *, synchronous: str | None = None) -> None:
        try:
            parsed = make_url(url)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad URL
            raise StoreError(f"invalid store URL: {e}") from e
        self._url_display = parsed.render_as_string(hide_password=True)
        self._password = parsed.password
        self.prefix = prefix
        self.dialect = parsed.get_backend_name()
        self._log_sql_cache: dict[int, str] = {}
        # A ping per checkout finds connections a database server dropped; a file has none to drop.
        kw: dict[str, Any] = {"pool_pre_ping": parsed.get_backend_name() != "sqlite"}
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
                kw["poolclass"] = StaticPool
                kw["connect_args"] = {"check_same_thread": False}
        try:
            self.engine = sa.create_engine(parsed, **kw)
        except Exception as e:  # noqa: BLE001 - unknown driver, bad arguments
            raise StoreError(f"cannot open store {self._url_display}: {self._clean(e)}") from e
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine, sync.upper())
        # A worker forked after the store was made must not reuse the parent's connections.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _dispose_in_child(ref))
        self.metadata = sa.MetaData()
        self._define_tables()
        self._create_tables()

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
        self.t_predictions = sa.Table(
            f"{p}predictions", md,
            sa.Column("request_id", text, primary_key=True),
            sa.Column("row", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("ts", double, nullable=False),
            sa.Column("model", text),
            sa.Column("primary_model", text),
            sa.Column("primary_version", text),
            sa.Column("fallback_model", text),
            sa.Column("fallback_version", text),
            sa.Column("route", text),
            sa.Column("reasons", text),
            sa.Column("prediction", text),
            sa.Column("primary_prediction", text),
            sa.Column("fallback_prediction", text),
            sa.Column("probabilities", text),
            sa.Column("latency_ms", double),
            sa.Column("features", text),
            sa.Index(f"{p}predictions_ts", "ts"),
        )
        self.t_outcomes = sa.Table(
            f"{p}outcomes", md,
            sa.Column("request_id", text, primary_key=True),
            sa.Column("row", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("outcome", text),
            sa.Column("ts", double, nullable=False),
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

    def _create_tables(self) -> None:
        # Several workers may start at once: the loser of a CREATE race sees "already exists",
        # and the next checkfirst pass finds the tables.
        for attempt in range(5):
            try:
                # BEGIN IMMEDIATE on SQLite: a deferred transaction that read the schema and then
                # wants to write fails at once with "database is locked" instead of waiting its turn.
                with self.engine.connect().execution_options(gs_begin_immediate=True) as conn, conn.begin():
                    self.metadata.create_all(conn, checkfirst=True)
                return
            except SQLAlchemyError as e:
                if attempt < 4 and (_is_duplicate_object(e) or "database is locked" in str(e)):
                    time.sleep(0.05 * (attempt + 1))
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

    def log_predictions(self, rows: list[dict[str, Any]]) -> None:
        """Insert prediction rows in one transaction; rows whose (request_id, row) is already
        logged are ignored. JSON columns are given as Python objects; ``reasons`` as a list or
        a ';'-joined string. A row may also be a tuple in ``PREDICTION_COLUMNS`` order with the
        JSON columns already encoded as JSON text."""
        if not rows:
            return
        # Tuples come ready (PREDICTION_COLUMNS order, JSON columns as JSON text): the service's
        # own fast path. Mappings are checked and encoded here.
        params = [r if isinstance(r, tuple) else tuple(_prediction_params(r).values()) for r in rows]
        step = self._log_rows_per_statement
        with self._write(f"logging {len(params)} prediction row(s)") as conn:
            # Many rows per INSERT, straight to the driver. Not executemany: sqlite3 releases and
            # retakes the GIL around every row's step, and while the serving threads keep the
            # GIL busy each retake waits for a switch interval (a 2 s test: 251 rows/s against a
            # busy thread, 26,000 with a statement per 500 rows).
            for i in range(0, len(params), step):
                chunk = params[i:i + step]
                conn.exec_driver_sql(self._log_sql(len(chunk)), tuple(v for row in chunk for v in row))

    @cached_property
    def _log_rows_per_statement(self) -> int:
        if self.dialect == "sqlite":
            import sqlite3

            # Bound parameters per statement: 32766 since SQLite 3.32, 999 before.
            limit = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
        else:
            limit = 65535  # PostgreSQL's wire protocol
        return max(1, min(500, limit // len(PREDICTION_COLUMNS)))

    def _log_sql(self, n_rows: int) -> str:
        sql = self._log_sql_cache.get(n_rows)
        if sql is None:
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            cols = ", ".join(f'"{c}"' for c in PREDICTION_COLUMNS)
            row = "(" + ", ".join([mark] * len(PREDICTION_COLUMNS)) + ")"
            sql = (f'INSERT INTO "{self.t_predictions.name}" ({cols}) VALUES {", ".join([row] * n_rows)} '
                   "ON CONFLICT (request_id, \"row\") DO NOTHING")
            if len(self._log_sql_cache) < 64:
                self._log_sql_cache[n_rows] = sql
        return sql

    def request_row_count(self, request_id: str) -> int:
        """How many rows of ``request_id`` are logged (0 if unknown)."""
        t = self.t_predictions
        q = sa.select(sa.func.count()).select_from(t).where(t.c.request_id == str(request_id))
        with self._read("counting the rows of a request") as conn:
            return int(conn.execute(q).scalar_one())

    def purge_predictions(self, older_than_ts: float) -> int:
        """Delete predictions with ts < ``older_than_ts`` and their outcomes; returns how many
        predictions went."""
        p, o = self.t_predictions, self.t_outcomes
        cut = float(older_than_ts)
        old = sa.select(p.c.request_id).where(
            p.c.request_id == o.c.request_id, p.c.row == o.c.row, p.c.ts < cut)
        with self._write("purging old predictions") as conn:
            conn.execute(o.delete().where(sa.exists(old)))
            return int(conn.execute(p.delete().where(p.c.ts < cut)).rowcount)

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
            key, value = (str(rid), int(row)), _plain(outcome)
            if key in wanted and wanted[key] != value and not overwrite:
                problems.append(Problem(
                    problem=f"request {key[0]}: row {key[1]} is given two different outcomes",
                    row=key[1], expected=_text(wanted[key]), got=value))
            wanted[key] = value
        if problems:
            raise ConflictError(f"{len(problems)} outcome(s) contradict each other", problems)
        if not wanted:
            return {"stored": 0, "unchanged": 0, "overwritten": 0}
        p, o = self.t_predictions, self.t_outcomes
        now = time.time()
        with self._write(f"storing {len(wanted)} outcome(s)") as conn:
            rids = sorted({k[0] for k in wanted})
            logged: set[tuple[str, int]] = set()
            for chunk in _chunks(rids):
                q = sa.select(p.c.request_id, p.c.row).where(p.c.request_id.in_(chunk))
                logged.update((r, int(i)) for r, i in conn.execute(q))
            rows_of = Counter(k[0] for k in logged)
            for key in wanted:
                if key in logged:
                    continue
                if key[0] in rows_of:
                    n = rows_of[key[0]]
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
                    existing[(rec[0], int(rec[1]))] = _loads(rec[2])
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
        p, o = self.t_predictions, self.t_outcomes
        cols = [c for c in p.c if features or c.name != "features"]
        on = sa.and_(p.c.request_id == o.c.request_id, p.c.row == o.c.row)
        q = sa.select(*cols, o.c.outcome, o.c.ts.label("outcome_ts")).select_from(
            p.join(o, on) if inner else p.outerjoin(o, on))
        if since is not None:
            q = q.where(p.c.ts >= float(since))
        if limit is not None:
            q = q.order_by(p.c.ts.desc(), p.c.request_id.desc(), p.c.row.desc()).limit(int(limit))
        else:
            q = q.order_by(p.c.ts, p.c.request_id, p.c.row)
        with self._read("reading the prediction log") as conn:
            res = conn.execute(q)
            names = list(res.keys())
            rows = list(res.all())
        if limit is not None:
            rows.reverse()
        decode = {i for i, n in enumerate(names) if n in JSON_COLUMNS or n == "outcome"}
        data: dict[str, pd.Series] = {}
        for i, n in enumerate(names):
            values = [_loads(r[i]) if i in decode else r[i] for r in rows]
            # Text and JSON columns stay object so None stays None; numbers get numeric dtypes.
            dtype = _NUMERIC_DTYPES.get(n, object)
            data[n] = pd.Series([np.nan if v is None else v for v in values] if dtype is float else values,
                                dtype=dtype)
        return pd.DataFrame(data, columns=names)

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
        return None if row is None else {**row, "body": _loads(row["body"])}

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
        return [{**r, "body": _loads(r["body"])} for r in rows]


# -- helpers -------------------------------------------------------------------------------------


def _configure_sqlite(engine: sa.Engine, synchronous: str) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook issue BEGIN itself: the driver's implicit transactions
        # would start after a SELECT, too late to make read-then-write atomic.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
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


def _plain(v: Any) -> Any:
    """numpy scalars and arrays to Python values; NaN to None (JSON has no NaN)."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def dumps(v: Any) -> str:
    """JSON text of ``v`` (numpy values converted, NaN as null)."""
    try:  # plain Python values without NaN, the common case: no walk over the value
        return json.dumps(v, separators=(",", ":"), allow_nan=False, default=_no_default)
    except (ValueError, TypeError):
        return json.dumps(_plain(v), separators=(",", ":"), default=str)


def _no_default(v: Any) -> Any:
    raise TypeError(type(v).__name__)


def _loads(v: Any) -> Any:
    return None if v is None else json.loads(v)


def _json_equal(a: Any, b: Any) -> bool:
    return bool(json.loads(dumps(a)) == json.loads(dumps(b)))


def _text(v: Any) -> str:
    return json.dumps(v, default=str)


def _prediction_params(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("request_id") is None or r.get("row") is None or r.get("ts") is None:
        raise StoreError(f"a prediction row needs request_id, row and ts; got keys {sorted(r)}")
    out: dict[str, Any] = {}
    for c in PREDICTION_COLUMNS:
        v = r.get(c)
        if v is None:
            out[c] = None
            continue
        if c in JSON_COLUMNS:
            v = dumps(v)
        elif c == "reasons" and v is not None and not isinstance(v, str):
            v = ";".join(str(x) for x in _iter(v))
        elif c in ("ts", "latency_ms") and v is not None:
            v = float(v)
        elif c == "row":
            v = int(v)  # type: ignore[arg-type]
        elif v is not None:
            v = str(v)
        out[c] = v
    return out


def _iter(v: Any) -> Iterable[Any]:
    return v if isinstance(v, (list, tuple)) else list(v)
