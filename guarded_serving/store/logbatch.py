"""The prediction log's unit of storage: many served rows as columns, stored as one compressed
Arrow IPC record batch.

A flush of the recorder becomes one ``LogBatch``: one array per log column, the features as
typed columns (``float64`` or dictionary-encoded text, never JSON text per row), strings that
repeat (routes, reasons, request ids) dictionary-encoded, request ids made by the server (32
lowercase hex digits) as 16 bytes, and the stream compressed as one zstd frame. What is the same
for every row of a batch is not stored per row: the schema (kept once by the store, named by its
id in the body), the model names and versions (in that schema), the served prediction when it is
the primary's or the fallback's (a one-byte source instead), and the time (an offset from the
batch's first). A body holds its request ids and row numbers; the store's index maps each
request to its batch for lookups. Bodies of the earlier, self-contained formats still decode.

>>> b = LogBatch.from_rows([{"request_id": "r1", "row": 0, "ts": 1.0, "prediction": 2.5,
...                          "route": "primary", "features": {"carat": 0.5}}])
>>> e = encode(b)
>>> cols = decode(e.body, {e.schema_id: e.schema})
>>> cols["prediction"].tolist(), cols["f:carat"].tolist()
([2.5], [0.5])
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
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
#: Bodies of the current format start with this, then the schema id, the batch's base time, the
#: uncompressed size and the decimal digits of each column stored as integers (``_decimal``);
#: then one zstd frame of the IPC stream without its schema message.
_V2 = b"GSL2"
_V2_FORMAT = "<qdIB"
_V2_HEAD = len(_V2) + struct.calcsize(_V2_FORMAT)
_CODEC = pa.Codec(_COMPRESSION, compression_level=3)
#: Text columns stored once in the schema when all rows of a batch share one value.
CONSTANT_COLUMNS = ("model", "primary_model", "primary_version", "fallback_model", "fallback_version",
                    "challenger_version")
_CONSTANTS_META = b"constants"
_DECIMAL_META = b"decimal"
#: ``latency_ms`` is logged to the microsecond: the nanoseconds of a timer's float cost 7 bytes a
#: row and mean nothing at that scale.
LATENCY_DIGITS = 3
#: Most decimal digits tried, and the largest integer stored (exact in float64).
_MAX_DIGITS = 9
_MAX_SCALED = 2.0**53
_SCALES = 10.0 ** np.arange(_MAX_DIGITS + 1)
_SCALES_PY = _SCALES.tolist()
#: Where the served prediction came from (``_prediction_source``).
_SOURCE = "prediction_source"
_SCALAR_KINDS = ("string", "integer", "floating", "boolean", "empty")
_NIBBLE = np.full(256, 255, dtype=np.uint16)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)


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
    #: Text columns with one value for every row (the model names and versions), given once
    #: rather than as per-row arrays; stored like ``CONSTANT_COLUMNS`` that turn out constant.
    constants: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def take(self, idx: np.ndarray) -> LogBatch:
        """The rows at ``idx`` (indices or a boolean mask)."""
        return LogBatch(self.request_id[idx], self.row[idx],
                        {k: v[idx] for k, v in self.columns.items()},
                        {k: v[idx] for k, v in self.features.items()}, self.fingerprints, self.constants)

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


@dataclass(frozen=True)
class EncodedBatch:
    """A batch as stored: its ``body`` and the ``schema`` (an Arrow IPC schema message) the body
    names by ``schema_id``; the store keeps each schema once."""

    body: bytes
    schema: bytes
    schema_id: int


def encode(batch: LogBatch) -> EncodedBatch:
    """The batch as a body of the current format (``_V2``) and the schema it refers to."""
    n = len(batch)
    rid = _hex_ids(batch.request_id)
    if rid is None:
        rid = pa.array(batch.request_id, type=pa.string()).dictionary_encode()
    arrays = [rid, pa.array(batch.row, type=pa.int32())]
    fields = [pa.field("request_id", rid.type), pa.field("row", pa.int32())]
    columns = dict(batch.columns)
    constants = {k: v for k, v in batch.constants.items() if n and k not in columns}
    for c in CONSTANT_COLUMNS:  # model names and versions: in the schema (kept once), not per row
        v = columns.get(c)
        if v is not None and n and v.dtype.kind in "OU" and isinstance(v[0], str) and bool((v == v[0]).all()):
            constants[c] = str(v[0])
            del columns[c]
    ts = np.asarray(columns["ts"], dtype=np.float64) if columns.get("ts") is not None else np.full(n, np.nan)
    base = float(ts[0]) if n and np.isfinite(ts[0]) else 0.0
    delta = ts - base  # exact (Sterbenz) for times of one batch; checked, else stored whole
    if not np.array_equal(base + delta, ts, equal_nan=True):
        base, delta = 0.0, ts
    columns["ts"] = delta
    digits: list[int] = []
    if columns.get("latency_ms") is not None and columns["latency_ms"].dtype.kind == "f":
        columns["latency_ms"] = np.round(columns["latency_ms"], LATENCY_DIGITS)
    source = _prediction_source(columns)
    if source is not None:
        columns["prediction"] = np.where(source == 0, columns["prediction"], np.nan)
        columns[_SOURCE] = source
    for name, values in [*((c, columns.get(c)) for c in (*LOG_COLUMNS, _SOURCE) if c not in constants),
                         *((FEATURE_PREFIX + k, v) for k, v in batch.features.items())]:
        if name == _SOURCE and values is None:
            continue
        scaled = _decimal(values) if values is not None and values.dtype == np.float64 else None
        field_meta: dict[bytes, bytes] | None
        if values is not None and scaled is not None:  # decimals as integers: a third of the bytes
            digits.append(scaled[1])
            arr, field_meta = pa.array(scaled[0], type=pa.int64(), mask=np.isnan(values)), {_DECIMAL_META: b"1"}
        else:
            arr, field_meta = _to_arrow(values, n, as_json=name in JSON_COLUMNS)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=field_meta))
    schema_meta = {_CONSTANTS_META: dumps(constants).encode()} if constants else None
    table = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=schema_meta))
    schema = table.schema.serialize().to_pybytes()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_batch(table)
    stream = sink.getvalue()  # Arrow's buffer: sliced and compressed, never copied
    assert stream.slice(0, len(schema)).equals(pa.py_buffer(schema))
    schema_id = int.from_bytes(hashlib.sha256(schema).digest()[:8], "big", signed=True)
    rest = stream.slice(len(schema))
    head = _V2 + struct.pack(_V2_FORMAT, schema_id, base, rest.size, len(digits)) + bytes(digits)
    return EncodedBatch(head + _CODEC.compress(rest, asbytes=True), schema, schema_id)


def schema_id_of(body: bytes) -> int | None:
    """The id of the schema a body refers to; None for a self-contained body (older formats)."""
    if bytes(body[:len(_V2)]) != _V2:
        return None
    return int(struct.unpack_from(_V2_FORMAT, body, len(_V2))[0])


def _hex_ids(request_id: np.ndarray) -> pa.Array | None:
    """Server-made ids (32 lowercase hex digits each) as 16-byte values, converted as arrays, an
    id per run of equal ids (a request's rows); None when any id is something else."""
    n = len(request_id)
    if not n:
        return pa.array([], type=pa.binary(16))
    starts = np.flatnonzero(np.append(True, request_id[1:] != request_id[:-1]))
    try:
        text = np.asarray(request_id[starts], dtype=str)
    except (TypeError, ValueError):
        return None
    if text.dtype.itemsize != 32 * 4:  # UCS-4: some id is not 32 characters long
        return None
    nibbles = _NIBBLE[np.minimum(text.view(np.uint32).reshape(len(starts), 32), 255)]
    if (nibbles > 15).any():  # not a lowercase hex digit, or shorter than 32 (padded with NUL)
        return None
    raw = (nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).astype(np.uint8)
    raw = np.repeat(raw, np.diff(np.append(starts, n)), axis=0)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw.tobytes())])


def _decimal(values: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(integers, digits)`` with ``integers / 10.0**digits`` equal to ``values`` bit for bit
    (NaN where ``values`` is NaN), for the digits the first values need: numbers typed with a few
    decimals (prices, sizes, milliseconds) then take a third of the bytes of float64 (the idea of
    ALP, Afroozeh et al., SIGMOD 2024). None for other numbers."""
    digits = _digits(values[:8].tolist())
    if digits is None:
        return None
    scale = _SCALES[digits]
    ints = np.rint(values * scale)
    missing = np.isnan(values)
    exact = (ints / scale == values) | missing
    if not exact.all() or np.signbit(values[values == 0]).any():
        return None
    ints[missing] = 0
    if np.abs(ints).max(initial=0) >= _MAX_SCALED:
        return None
    return ints.astype(np.int64), digits


def _digits(head: list[float]) -> int | None:
    """The decimal digits the values of ``head`` need (NaN aside), None if some need more than
    ``_MAX_DIGITS`` or are not finite; plain Python: a few values, no array overhead."""
    most = 0
    for v in head:
        if v != v:
            continue
        if not -_MAX_SCALED < v < _MAX_SCALED:
            return None
        for k, scale in enumerate(_SCALES_PY):
            if round(v * scale) / scale == v:
                most = max(most, k)
                break
        else:
            return None
    return most


def _prediction_source(columns: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per row, which model's prediction was served (1 primary, 2 fallback, 0 another value), so
    the served value is not stored a second time; None unless all three are numbers."""
    pred, primary, fallback = (columns.get(c) for c in ("prediction", "primary_prediction", "fallback_prediction"))
    if pred is None or primary is None or fallback is None or not all(
            v.dtype == np.float64 for v in (pred, primary, fallback)):
        return None
    bits = pred.view(np.int64)  # bit for bit: NaN and -0.0 come back exactly
    return np.where(bits == primary.view(np.int64), 1, np.where(bits == fallback.view(np.int64), 2, 0)).astype(np.int8)


def _to_arrow(values: np.ndarray | None, n: int, as_json: bool) -> tuple[pa.Array, dict[bytes, bytes] | None]:
    if values is None:
        return pa.nulls(n, pa.float64()), None
    if values.dtype.kind == "f":
        return pa.array(values, type=pa.float64(), from_pandas=True), None
    if values.dtype == np.int8:
        return pa.array(values, type=pa.int8()), None
    if values.dtype.kind in "iub":
        return pa.array(values.astype(np.float64)), None
    if not as_json:
        coded = _coded_text(values)
        if coded is not None:
            return coded, None
        try:  # text (with None or NaN for missing): typed and encoded by Arrow, no Python loop
            arr = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = None
        if arr is not None and pa.types.is_null(arr.type):
            return pa.nulls(n, pa.string()), None
        if arr is not None and pa.types.is_string(arr.type):
            return arr.dictionary_encode(), None
    if pd.api.types.infer_dtype(values, skipna=True) in _SCALAR_KINDS:
        # Labels of one type: JSON text of each distinct value, not of each row.
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        return _dictionary(codes, [dumps(v) for v in uniques.tolist()]), {_JSON_META: b"1"}
    texts = values.tolist()
    return pa.array([None if v is None else dumps(v) for v in texts], type=pa.string()).dictionary_encode(), \
        {_JSON_META: b"1"}


def _coded_text(values: np.ndarray) -> pa.DictionaryArray | None:
    """An object array of text (None or NaN for missing) as a dictionary array, its codes found by
    pandas' hash table: 2-3 times faster than Arrow's conversion of every string, then its
    dictionary encoding (the same array: distinct values in order of first appearance). None
    when a value is not text (Arrow's path and the JSON one take it then)."""
    if values.dtype != object:
        return None
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
    except TypeError:  # an unhashable value (a list, an object)
        return None
    if not len(uniques) or not all(type(u) is str for u in uniques):
        return None  # no text at all; or numbers or booleans beside text (1 and True share a code)
    return _dictionary(codes, uniques.tolist())


def _dictionary(codes: np.ndarray, texts: list[str]) -> pa.DictionaryArray:
    """Codes from ``pd.factorize`` (-1: missing) and the text of each distinct value, as Arrow."""
    indices = pa.array(codes.astype(np.int32), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(texts, type=pa.string()))


def decode(body: bytes, schemas: Mapping[int, bytes] | None = None) -> dict[str, np.ndarray]:
    """Column name -> numpy array (floats as float64 with NaN, text and JSON values as objects
    with None); feature columns keep their ``f:`` prefix. ``schemas`` (schema id -> schema, as
    ``EncodedBatch`` gives them) is needed for bodies of the current format; older bodies carry
    their schema."""
    head = bytes(body[:_V2_HEAD])
    base, digits = 0.0, b""
    if head[:len(_V2)] == _V2:
        schema_id, base, size, n_digits = struct.unpack_from(_V2_FORMAT, head, len(_V2))
        if schemas is None or schema_id not in schemas:
            raise KeyError(f"log batch schema {schema_id} is not known")
        digits = bytes(body[_V2_HEAD:_V2_HEAD + n_digits])
        source: Any = pa.py_buffer(schemas[schema_id] + _CODEC.decompress(
            memoryview(body)[_V2_HEAD + n_digits:], decompressed_size=size, asbytes=True))
    else:
        source = pa.py_buffer(body)
        if head[:4] == _ZSTD_MAGIC:  # whole-stream zstd with the schema (before the schema table)
            source = pa.input_stream(source, compression=_COMPRESSION)
        # else a body of per-buffer compression (the first format)
    with pa.ipc.open_stream(source) as reader:
        table = reader.read_all()
    out: dict[str, np.ndarray] = {}
    scales = iter(digits)
    for f, col in zip(table.schema, table.columns, strict=True):
        if f.metadata and f.metadata.get(_DECIMAL_META):
            ints = col.to_numpy().astype(np.float64)  # nulls come as NaN
            out[f.name] = ints / _SCALES[next(scales)]  # the division _decimal checked
            continue
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
    if base:
        out["ts"] = base + out["ts"]
    source_of = out.pop(_SOURCE, None)
    if source_of is not None:
        out["prediction"] = np.where(source_of == 1, out["primary_prediction"],
                                     np.where(source_of == 2, out["fallback_prediction"], out["prediction"]))
    meta = table.schema.metadata or {}
    if _CONSTANTS_META in meta:
        n = table.num_rows
        for c, v in loads(meta[_CONSTANTS_META].decode()).items():
            out[c] = np.full(n, v, dtype=object)
    return out


def _has_containers(distinct: dict[str, Any]) -> bool:
    # Lists and dicts must not be shared between rows (a caller may change one).
    return any(isinstance(v, (list, dict)) for v in distinct.values())
