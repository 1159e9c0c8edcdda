"""Stores written by an older guarded-serving, brought to the current layout when opened.

The prediction log's tables changed twice without a migration; a store of an earlier layout is
recognised by its tables:

- ``{p}predictions``: one SQL row per served row (before the log was stored in batches);
- ``{p}log_index``: the first batched log's index, keyed by the request id as text; in its first
  version with each run's ``offset`` in a body whose rows had no request ids of their own;
- ``{p}log_keys`` without ``fingerprint`` (before client request ids were checked);
- ``{p}log_parts`` numbered 65,536 to a batch (the current numbering gives each batch 2**20);
- ``{p}events`` without ``follows`` (before a drift status change was recorded once), which gets
  the column and its unique index in place.

Opening such a store migrates it in the transaction that opens it: the old rows are appended
through ``Store._append``, the path every new batch takes, so they read back like new rows
(``joined``, ``/feedback``, ``export``, the report). Outcomes need no change: their table is the
same in every layout, and they join again because the rows keep their request ids and row
numbers. The old tables are kept, renamed ``{p}legacy_<name>``, in the same transaction: nothing
is lost if the copy is wrong, and a process of the old version fails to write instead of writing
rows nobody reads. Drop them once the migrated log has been checked.

One process migrates: on SQLite the opening transaction holds the write lock (``BEGIN
IMMEDIATE``), on PostgreSQL an advisory lock named after the table prefix; the others wait for it
(``OPEN_WAIT_S``), then find the layout in ``{p}store_meta`` and go on. A store already marked
with the current layout is opened with one read and no lock.

>>> Plan(found=("gs_predictions: 3 logged row(s)",), tables=("gs_predictions",), rows=3).describe()
'1 part of an older layout (3 row(s) to migrate):\\n  - gs_predictions: 3 logged row(s)'
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..codec import loads
from ..errors import StoreError
from .logbatch import FEATURE_PREFIX, LOG_COLUMNS, LogBatch, decode, schema_id_of
from .sql import PARTS_PER_BATCH, Store, request_id_of

log = logging.getLogger(__name__)

#: The layout this version writes, kept in ``{prefix}store_meta``; 1 is the first one marked.
LAYOUT = 1
#: How long an opener waits (s) for another process to create or migrate the tables.
OPEN_WAIT_S = 120.0
#: What old tables are renamed to, after the prefix.
LEGACY = "legacy_"
#: Rows of the row-per-row table appended at a time (one log batch each).
COPY_ROWS = 5000
#: Part numbers per batch in ``log_parts`` ids before they were 2**20.
_OLD_PARTS_PER_BATCH = 1 << 16
#: JSON text columns of the row-per-row table.
_ROW_TABLE_JSON = ("prediction", "primary_prediction", "fallback_prediction", "probabilities", "features")


class LegacyStoreError(StoreError):
    """The store holds an older guarded-serving's tables and was opened without migrating."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Plan:
    """What of an older layout a store holds, and what migrating it does: ``tables`` are copied
    into the current log and renamed ``legacy_``; ``rebuild`` when the log tables themselves are
    of an older layout (then every logged row is copied); ``events_follows`` when the events table
    lacks its ``follows`` column; ``copied`` once migrated."""

    found: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    rows: int = 0
    rebuild: bool = False
    events_follows: bool = False
    copied: int = 0

    def __bool__(self) -> bool:
        return bool(self.found)

    def describe(self) -> str:
        """What was found, a line each."""
        head = f"{len(self.found)} part(s) of an older layout" if len(self.found) != 1 else \
            "1 part of an older layout"
        return f"{head} ({self.rows} row(s) to migrate):\n" + "\n".join(f"  - {f}" for f in self.found)


def is_current(store: Store) -> bool:
    """Whether the store is marked with the current layout (one read, no lock)."""
    with store._read("opening the store") as conn:
        return _layout(store, conn) == LAYOUT


def open_tables(store: Store, conn: Connection, migrate: bool) -> Plan | None:
    """Within the opening transaction: create missing tables, migrate an older layout (unless
    ``migrate`` is false: then LegacyStoreError and nothing changed), mark the layout. Returns
    what was migrated, None when nothing was."""
    _lock(store, conn)
    version = _layout(store, conn)
    if version == LAYOUT:
        return None  # another process got here first
    plan = find(store, conn) if version is None else Plan()
    if plan and not migrate:
        raise LegacyStoreError(
            f"store {store.url_display} holds tables of an older guarded-serving that this version "
            f"does not read; nothing was changed. {plan.describe()}\nMigrate it with "
            "`guarded-serving migrate-store CONFIG` (or open it with migrating on, as serving does).",
            plan)
    for name in plan.tables:
        _rename(store, conn, name)
    store.metadata.create_all(conn, checkfirst=True)
    if plan.events_follows:
        _add_follows(store, conn)
    if plan:
        plan = replace(plan, copied=_copy(store, conn, plan))
        log.warning("store %s: migrated from an older layout (%d logged row(s) copied; old tables kept "
                    "as: %s)", store.url_display, plan.copied,
                    ", ".join(legacy_name(store, t) for t in plan.tables) or "none")
    m = store.t_meta
    conn.execute(m.delete().where(m.c.name == "layout"))
    conn.execute(m.insert().values(name="layout", value=str(LAYOUT)))
    return plan or None


def legacy_name(store: Store, table: str) -> str:
    """What migrating renames ``table`` to: ``{prefix}legacy_<name>``."""
    return f"{store.prefix}{LEGACY}{table[len(store.prefix):]}"


def find(store: Store, conn: Connection) -> Plan:
    """The parts of an older layout the store holds."""
    insp = sa.inspect(conn)
    have = set(insp.get_table_names())
    p = store.prefix
    found: list[str] = []
    tables: list[str] = []
    rows = 0
    row_table = f"{p}predictions"
    if row_table in have:
        n = int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(row_table))).scalar_one())
        found.append(f"{row_table}: {n} logged row(s), an SQL row each (the log before it was stored in batches)")
        tables.append(row_table)
        rows += n
    rebuild = False
    index = f"{p}log_index"
    if index in have:
        offsets = "offset" in {c["name"] for c in insp.get_columns(index)}
        found.append(f"{index}: the first batched log's index, keyed by the request id as text"
                     + ("; its bodies hold no request ids" if offsets else ""))
        rebuild = True
    keys = store.t_log_index.name
    if keys in have and "fingerprint" not in {c["name"] for c in insp.get_columns(keys)}:
        found.append(f"{keys} without fingerprints (before client request ids were checked)")
        rebuild = True
    parts = store.t_log_parts.name
    if parts in have and store.t_log_batches.name in have and _misnumbered(store, conn):
        found.append(f"{parts} numbered {_OLD_PARTS_PER_BATCH} to a batch, not {PARTS_PER_BATCH}")
        rebuild = True
    events = store.t_events.name
    events_follows = events in have and "follows" not in {c["name"] for c in insp.get_columns(events)}
    if events_follows:
        found.append(f"{events} without follows (before a drift status change was recorded once)")
    if rebuild:
        log_tables = (store.t_log_batches.name, parts, index, keys)
        tables += [t for t in log_tables if t in have]
        if store.t_log_batches.name in have:
            b = store.t_log_batches
            rows += int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(b.c.rows), 0))).scalar_one())
    return Plan(tuple(found), tuple(tables), rows, rebuild, events_follows)


# -- steps -----------------------------------------------------------------------------------------


def _layout(store: Store, conn: Connection) -> int | None:
    """The layout the store is marked with, None when unmarked; a StoreError for a newer one."""
    m = store.t_meta
    if not sa.inspect(conn).has_table(m.name):
        return None
    value = conn.execute(sa.select(m.c.value).where(m.c.name == "layout")).scalar()
    if value is None:
        return None
    if int(value) > LAYOUT:
        raise StoreError(f"store {store.url_display} was written by a newer guarded-serving (layout "
                         f"{value}; this version reads {LAYOUT}): upgrade this process")
    return int(value)


def _lock(store: Store, conn: Connection) -> None:
    """Make concurrent openers wait for this transaction. SQLite: BEGIN IMMEDIATE did. PostgreSQL:
    an advisory lock for the prefix, and room in the timeouts for a migration and for waiting."""
    if store.dialect != "postgresql":
        return
    ms = int(OPEN_WAIT_S * 1000)
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
    key = int.from_bytes(hashlib.sha256(f"guarded-serving:{store.prefix}".encode()).digest()[:8], "big",
                         signed=True)
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _rename(store: Store, conn: Connection, table: str) -> None:
    new = legacy_name(store, table)
    insp = sa.inspect(conn)
    if insp.has_table(new):
        raise StoreError(f"cannot migrate store {store.url_display}: {new} exists already (from an "
                         f"earlier migration?); rename or drop it, then open the store again")
    quote = conn.dialect.identifier_preparer.quote
    # Index names are per database: one the current tables use goes with the old table.
    current = {ix.name for t in store.metadata.tables.values() for ix in t.indexes}
    for name in [ix["name"] for ix in insp.get_indexes(table)]:
        if name is not None and name in current:
            conn.exec_driver_sql(f"DROP INDEX {quote(name)}")
    conn.exec_driver_sql(f"ALTER TABLE {quote(table)} RENAME TO {quote(new)}")


def _add_follows(store: Store, conn: Connection) -> None:
    """The events table's ``follows`` and, as a unique index (SQLite adds no constraint to a
    table), what makes a chained event recorded once; older events follow none (null)."""
    quote = conn.dialect.identifier_preparer.quote
    t = store.t_events
    conn.exec_driver_sql(f"ALTER TABLE {quote(t.name)} ADD COLUMN follows INTEGER")
    unique = next(c for c in t.constraints if isinstance(c, sa.UniqueConstraint))
    conn.exec_driver_sql(f"CREATE UNIQUE INDEX {quote(str(unique.name))} ON {quote(t.name)} (kind, follows)")


def _copy(store: Store, conn: Connection, plan: Plan) -> int:
    legacy = {t: sa.Table(legacy_name(store, t), sa.MetaData(), autoload_with=conn) for t in plan.tables}
    copied = 0
    row_table = legacy.get(f"{store.prefix}predictions")
    if row_table is not None:
        copied += _copy_rows(store, conn, row_table)
    if plan.rebuild:
        copied += _copy_batches(store, conn, legacy)
    return copied


def _copy_rows(store: Store, conn: Connection, t: sa.Table) -> int:
    """The row-per-row table, in time order, ``COPY_ROWS`` rows a batch."""
    key = (t.c.ts, t.c.request_id, t.c.row)
    copied, last = 0, None
    while True:
        q = sa.select(t).order_by(*key).limit(COPY_ROWS)
        if last is not None:
            q = q.where(sa.tuple_(*key) > sa.tuple_(*(sa.literal(v) for v in last)))
        rows = conn.execute(q).mappings().all()
        if not rows:
            return copied
        copied += store._append(conn, LogBatch.from_rows([
            {c: loads(v) if c in _ROW_TABLE_JSON else v for c, v in r.items()} for r in rows]))[0]
        last = (rows[-1]["ts"], rows[-1]["request_id"], rows[-1]["row"])


def _copy_batches(store: Store, conn: Connection, legacy: dict[str, sa.Table]) -> int:
    """Every batch of the old log tables, a new batch each (their rows keep their times together)."""
    p = store.prefix
    batches = legacy[store.t_log_batches.name]
    parts = legacy.get(store.t_log_parts.name)
    index = legacy.get(f"{p}log_index")
    keys = legacy.get(store.t_log_index.name)
    runs: dict[int, list[tuple[int, int, str, int]]] = {}
    if index is not None and "offset" in index.c:
        for batch_id, offset, n, rid, first in conn.execute(sa.select(
                index.c.batch_id, index.c.offset, index.c.n_rows, index.c.request_id, index.c.first_row)):
            runs.setdefault(int(batch_id), []).append((int(offset), int(n), str(rid), int(first)))
    fingerprints: dict[str, int] = {}
    if keys is not None and "fingerprint" in keys.c:
        q = sa.select(keys.c.request_key, keys.c.fingerprint).where(keys.c.fingerprint.is_not(None))
        fingerprints = {request_id_of(bytes(k)): int(fp) for k, fp in conn.execute(q)}
    copied = 0
    for batch_id in [int(i) for (i,) in conn.execute(sa.select(batches.c.id).order_by(batches.c.id))]:
        cols = _old_body(store, conn, batches, parts, batch_id)
        if "request_id" in cols:
            rid, row = cols["request_id"], np.asarray(cols["row"], dtype=np.int64)
        else:
            rid, row, cols = _with_ids(cols, runs.get(batch_id, []))
        fps = {r: fingerprints[r] for r in set(rid.tolist()) if r in fingerprints}
        columns = {c: cols[c] for c in LOG_COLUMNS if c in cols}
        features = {c[len(FEATURE_PREFIX):]: v for c, v in cols.items() if c.startswith(FEATURE_PREFIX)}
        copied += store._append(conn, LogBatch(rid, row, columns, features, fps))[0]
    return copied


def _with_ids(cols: dict[str, np.ndarray], runs: list[tuple[int, int, str, int]]
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Request ids and rows of a body of the first batched format, from its index runs (offset in
    the body, rows, request id, first row); rows no run covers are left out."""
    n = len(cols["ts"])
    rid = np.full(n, None, dtype=object)
    row = np.zeros(n, dtype=np.int64)
    for offset, k, request_id, first in runs:
        rid[offset:offset + k] = request_id
        row[offset:offset + k] = np.arange(first, first + k)
    covered = np.array([r is not None for r in rid.tolist()], dtype=bool)
    if not covered.all():
        log.warning("migrating the log: %d row(s) of a batch are in no index run and are left out",
                    int((~covered).sum()))
    return rid[covered], row[covered], {c: v[covered] for c, v in cols.items()}


def _old_body(store: Store, conn: Connection, batches: sa.Table, parts: sa.Table | None,
              batch_id: int) -> dict[str, np.ndarray]:
    """The columns of an old batch, its parts found under either numbering."""
    tail = conn.execute(sa.select(batches.c.body).where(batches.c.id == batch_id)).scalar_one()
    for per_batch in (PARTS_PER_BATCH, _OLD_PARTS_PER_BATCH) if parts is not None else (0,):
        cols = _decoded(store, conn, b"".join(_parts(conn, parts, batch_id, per_batch)) + bytes(tail))
        if cols is not None:
            return cols
    raise StoreError(f"cannot migrate store {store.url_display}: log batch {batch_id} does not "
                     "decode; nothing was changed")


def _parts(conn: Connection, parts: sa.Table | None, batch_id: int, per_batch: int) -> Iterator[bytes]:
    """A batch's parts under a numbering; none unless they run from its first part on."""
    if parts is None or not per_batch:
        return iter(())
    first, pid = batch_id * per_batch, parts.c.id
    found = conn.execute(sa.select(pid, parts.c.data).where(pid >= first, pid < first + per_batch)
                         .order_by(pid)).all()
    if [int(i) - first for i, _ in found] != list(range(len(found))):
        return iter(())
    return (bytes(d) for _, d in found)


def _decoded(store: Store, conn: Connection, body: bytes) -> dict[str, np.ndarray] | None:
    store._load_schemas(conn, {schema_id_of(body)})
    try:
        return decode(body, store._schemas)
    except Exception:  # noqa: BLE001 - parts of another batch, or none: not this body
        return None


def _misnumbered(store: Store, conn: Connection) -> bool:
    """Whether the log's parts are numbered the old way: the lowest part must be the first of a
    batch under the current numbering and that batch must decode (one batch read)."""
    first = conn.execute(sa.select(sa.func.min(store.t_log_parts.c.id))).scalar()
    if first is None:
        return False
    if int(first) % PARTS_PER_BATCH:
        return True
    batch_id = int(first) // PARTS_PER_BATCH
    t = store.t_log_batches
    tail: Any = conn.execute(sa.select(t.c.body).where(t.c.id == batch_id)).scalar()
    if tail is None:
        return True
    body = b"".join(_parts(conn, store.t_log_parts, batch_id, PARTS_PER_BATCH)) + bytes(tail)
    return _decoded(store, conn, body) is None
