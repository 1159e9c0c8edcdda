"""The prediction log's unit of storage: many served rows as columns, stored as one compressed
Arrow IPC record batch.

A flush of the recorder becomes one ``LogBatch``: one array per log column, the features as
typed columns (``float64`` or dictionary-encoded text, never JSON text per row), strings that
repeat (routes, reasons, model names, request ids) dictionary-encoded, request ids made by the
server (32 lowercase hex digits) as 16 bytes, and the whole stream compressed as one zstd frame
(per-buffer compression, Arrow's own option, costs more than the rows of a small batch in frame
headers and leaves the schema uncompressed). A body is self-contained (it holds its request ids
and row numbers); the store's index maps each request to its batch for lookups.

>>> b = LogBatch.from_rows([{"request_id": "r1", "row": 0, "ts": 1.0, "prediction": 2.5,
...                          "route": "primary", "features": {"carat": 0.5}}])
>>> decode(encode(b))["prediction"].tolist(), decode(encode(b))["f:carat"].tolist()
([2.5], [0.5])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..codec import dumps, loads

#: Log columns in the body, in order (after request_id and row).
LOG_COLUMNS = (
    "ts", "model", "primary_model", "primary_version", "fallback_model", "fallback_version",
    "route", "reasons", "prediction", "primary_prediction", "fallback_prediction",
    "probabilities", "latency_ms", "challenger_prediction", "challenger_version",
)
#: Columns whose values may be any JSON value (labels of a classifier, probabilities).
JSON_COLUMNS = ("prediction", "primary_prediction", "fallback_prediction", "probabilities", "features",
                "challenger_prediction")
FEATURE_PREFIX = "f:"
_JSON_META = b"json"
_COMPRESSION = "zstd"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class LogBatch:
    """Served rows as columns. ``request_id`` and ``row`` are per-row arrays; ``columns`` holds
    the ``LOG_COLUMNS`` (missing ones are null); ``features`` the checked inputs by column."""

    request_id: np.ndarray
    row: np.ndarray
    columns: dict[str, np.ndarray]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    #: Request id -> fingerprint of its rows, for client-named requests (``idempotency``): kept
    #: in the store's index, not in the body.
    fingerprints: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def take(self, idx: np.ndarray) -> LogBatch:
        """The rows at ``idx`` (indices or a boolean mask)."""
        return LogBatch(self.request_id[idx], self.row[idx],
                        {k: v[idx] for k, v in self.columns.items()},
                        {k: v[idx] for k, v in self.features.items()}, self.fingerprints)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> LogBatch:
        """A batch from row mappings (the store's row-at-a-time API; tests and tools)."""
        n = len(rows)
        cols: dict[str, np.ndarray] = {}
        for c in LOG_COLUMNS:
            values = [r.get(c) for r in rows]
            if c == "reasons":
                values = [v if v is None or isinstance(v, str) else ";".join(map(str, v)) for v in values]
            cols[c] = _array(values)
        names: list[str] = []
        for r in rows:
            for k in r.get("features") or {}:
                if k not in names:
                    names.append(k)
        feats = {k: _array([(r.get("features") or {}).get(k) for r in rows]) for k in names}
        rid = np.array([str(r["request_id"]) for r in rows], dtype=object)
        return cls(rid, np.array([int(r["row"]) for r in rows], dtype=np.int64).reshape(n), cols, feats)


def _array(values: list[Any]) -> np.ndarray:
    """Numbers as float64 (None as NaN), anything else as an object array."""
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values) \
            and any(v is not None for v in values):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(values, dtype=object)


def is_hex_id(request_id: str) -> bool:
    """Whether ``request_id`` is 32 lowercase hex digits (a server-made id): stored as 16 bytes."""
    return _HEX_ID.match(request_id) is not None


def encode(batch: LogBatch) -> bytes:
    """The batch body: an Arrow IPC stream, compressed as one zstd frame."""
    n = len(batch)
    ids = batch.request_id.tolist()
    distinct = dict.fromkeys(ids)  # a request's rows repeat its id: convert each id once
    if all(map(is_hex_id, distinct)):
        raw = {r: bytes.fromhex(r) for r in distinct}
        rid = pa.array([raw[r] for r in ids], type=pa.binary(16))
    else:
        rid = pa.array(batch.request_id, type=pa.string()).dictionary_encode()
    arrays = [rid, pa.array(batch.row, type=pa.int32())]
    fields = [pa.field("request_id", arrays[0].type), pa.field("row", pa.int32())]
    for name, values in [*((c, batch.columns.get(c)) for c in LOG_COLUMNS),
                         *((FEATURE_PREFIX + k, v) for k, v in batch.features.items())]:
        arr, meta = _to_arrow(values, n, as_json=name in JSON_COLUMNS)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=meta))
    table = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, _COMPRESSION) as out, pa.ipc.new_stream(out, table.schema) as w:
        w.write_batch(table)
    return sink.getvalue().to_pybytes()


def _to_arrow(values: np.ndarray | None, n: int, as_json: bool) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    if values is None:
        return pa.nulls(n, pa.float64()), None
    if values.dtype.kind == "f":
        return pa.array(values, type=pa.float64(), from_pandas=True), None
    if values.dtype.kind in "iub":
        return pa.array(values.astype(np.float64)), None
    if not as_json:
        try:  # text (with None or NaN for missing): typed and encoded by Arrow, no Python loop
            arr = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = None
        if arr is not None and pa.types.is_null(arr.type):
            return pa.nulls(n, pa.string()), None
        if arr is not None and pa.types.is_string(arr.type):
            return arr.dictionary_encode(), None
    texts = values.tolist()
    return pa.array([None if v is None else dumps(v) for v in texts], type=pa.string()).dictionary_encode(), \
        {_JSON_META: b"1"}


def decode(body: bytes) -> dict[str, np.ndarray]:
    """Column name -> numpy array (floats as float64 with NaN, text and JSON values as objects
    with None); feature columns keep their ``f:`` prefix."""
    source: Any = pa.py_buffer(body)
    if bytes(body[:4]) == _ZSTD_MAGIC:  # else a body of per-buffer compression (before 0.x)
        source = pa.input_stream(source, compression=_COMPRESSION)
    with pa.ipc.open_stream(source) as reader:
        table = reader.read_all()
    out: dict[str, np.ndarray] = {}
    for f, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_fixed_size_binary(f.type):  # request ids made by the server
            out[f.name] = np.array([None if v is None else v.hex() for v in col.to_pylist()] + [None],
                                   dtype=object)[:-1]
            continue
        if pa.types.is_integer(f.type):
            out[f.name] = col.to_numpy()
            continue
        if pa.types.is_floating(f.type) or pa.types.is_null(f.type):
            out[f.name] = col.to_numpy().astype(np.float64) if not pa.types.is_null(f.type) \
                else np.full(len(col), np.nan)
            continue
        chunks = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in col.chunks]
        values = np.concatenate([c.to_numpy(zero_copy_only=False).astype(object) for c in chunks]) \
            if chunks else np.array([], dtype=object)
        if f.metadata and f.metadata.get(_JSON_META):
            distinct = {v: loads(v) for v in set(values.tolist()) if v is not None}
            values = np.array([None if v is None else distinct[v] for v in values.tolist()], dtype=object) \
                if not _has_containers(distinct) else \
                np.array([None if v is None else loads(v) for v in values.tolist()] + [None], dtype=object)[:-1]
        out[f.name] = values
    return out


def _has_containers(distinct: dict[str, Any]) -> bool:
    # Lists and dicts must not be shared between rows (a caller may change one).
    return any(isinstance(v, (list, dict)) for v in distinct.values())
