"""The prediction log's body format: what goes in comes back, bit for bit, and stays small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from guarded_serving.store.logbatch import LogBatch, decode, encode, schema_id_of

SERVE = Path(__file__).resolve().parents[1] / "models" / "diamonds" / "data" / "serve.parquet"


def _roundtrip(batch: LogBatch) -> dict[str, np.ndarray]:
    e = encode(batch)
    assert schema_id_of(e.body) == e.schema_id
    return decode(e.body, {e.schema_id: e.schema})


def _served(n: int, seed: int = 0) -> LogBatch:
    """``n`` one-row requests as the recorder hands them over for the diamonds example: server-made
    ids, a second of timestamps, the served value from the primary or the fallback."""
    rng = np.random.default_rng(seed)
    data = pd.read_parquet(SERVE).iloc[: n]
    ms = 1_795_787_700_000 + np.sort(rng.integers(0, 1000, n))
    ids = [f"{m:012x}7{r[:3]}{8 + int(r[3], 16) % 4:x}{r[4:19]}" for m, r in
           zip(ms.tolist(), (rng.bytes(10).hex() for _ in range(n)), strict=True)]
    primary = np.float32(rng.uniform(300, 15000, n)).astype(np.float64)
    fallback = np.round(rng.uniform(300, 15000, n), 4) + rng.uniform(0, 1e-3, n)
    to_fallback = rng.random(n) < 0.3
    route = np.where(to_fallback, "fallback", "primary").astype(object)
    cols = {
        "ts": ms / 1000 + rng.uniform(0, 0.002, n),
        "model": np.full(n, "diamonds-price", dtype=object),
        "primary_model": np.full(n, "diamonds-gbr", dtype=object),
        "primary_version": np.full(n, "1", dtype=object),
        "fallback_model": np.full(n, "diamonds-ridge", dtype=object),
        "fallback_version": np.full(n, "1", dtype=object),
        "route": route,
        "reasons": np.where(to_fallback, "out_of_range:carat;outlier", "").astype(object),
        "prediction": np.where(to_fallback, fallback, primary),
        "primary_prediction": primary,
        "fallback_prediction": fallback,
        "latency_ms": rng.uniform(0.2, 3.0, n),
    }
    feats = {c: data[c].to_numpy(dtype=object if data[c].dtype == object or str(data[c].dtype) == "str"
                                 or isinstance(data[c].dtype, pd.StringDtype) else np.float64)
             for c in data.columns if c != "price"}
    return LogBatch(np.array(ids, dtype=object), np.zeros(n, dtype=np.int64), cols, feats)


def test_every_column_comes_back_bit_for_bit() -> None:
    batch = _served(50)
    cols = _roundtrip(batch)
    assert cols["request_id"].tolist() == batch.request_id.tolist()
    for c in ("ts", "prediction", "primary_prediction", "fallback_prediction"):
        assert cols[c].tobytes() == batch.columns[c].tobytes(), c
    assert np.array_equal(cols["latency_ms"], np.round(batch.columns["latency_ms"], 3)), "to the microsecond"
    for c in ("model", "primary_version", "route", "reasons"):
        assert cols[c].tolist() == batch.columns[c].tolist(), c
    for k, v in batch.features.items():
        assert cols["f:" + k].tolist() == v.tolist(), k
    assert "prediction_source" not in cols


def test_numbers_that_are_not_short_decimals_are_kept_exactly() -> None:
    x = np.array([0.1, -0.0, np.nan, 1e300, 1 / 3, 2.5, 0.0, -7.25])
    for values in (x, x[[0, 5, 7]], x[[1, 6]], np.array([np.nan, np.nan]), np.array([1.5, np.inf])):
        n = len(values)
        batch = LogBatch(np.array([f"c{i}" for i in range(n)], dtype=object), np.arange(n),
                         {"ts": np.full(n, 5.0), "prediction": values, "primary_prediction": values[::-1].copy(),
                          "fallback_prediction": values}, {"v": values})
        cols = _roundtrip(batch)
        assert cols["f:v"].tobytes() == values.tobytes()
        assert cols["prediction"].tobytes() == values.tobytes()
        assert cols["primary_prediction"].tobytes() == values[::-1].tobytes()


def test_ids_labels_and_constants_of_every_kind() -> None:
    server = "0190a1b2c3d47e5f8a6b7c8d9e0f1a2b"
    ids = np.array([server, server, "client-1", "0190A1B2C3D47E5F8A6B7C8D9E0F1A2B", server[:-1]], dtype=object)
    labels = np.array(["a", "b", None, "a", "c"], dtype=object)
    mixed = np.array([1, True, "1", None, 1.0], dtype=object)
    probs = np.array([{"classes": ["a", "b"], "served": [0.5, 0.5]}, None, None, None, None], dtype=object)
    batch = LogBatch(ids, np.array([0, 1, 0, 0, 0]), {
        "ts": np.array([1.0, 2.0, 3.0, 4.0, 5.0]), "prediction": labels, "primary_prediction": mixed,
        "probabilities": probs, "model": np.array(["m", "m", "m", "n", "m"], dtype=object),
        "primary_version": np.full(5, "7", dtype=object)})
    cols = _roundtrip(batch)
    assert cols["request_id"].tolist() == ids.tolist()
    assert cols["prediction"].tolist() == labels.tolist()
    got = cols["primary_prediction"].tolist()
    assert got == [1, True, "1", None, 1.0] and [type(v) for v in got[:3]] == [int, bool, str]
    assert cols["probabilities"][0] == probs[0] and cols["probabilities"][1] is None
    assert cols["model"].tolist() == ["m", "m", "m", "n", "m"] and cols["primary_version"].tolist() == ["7"] * 5
    only_hex = _roundtrip(LogBatch(ids[:2], np.array([0, 1]), {"ts": np.array([1.0, 2.0])}))
    assert only_hex["request_id"].tolist() == [server, server]


def test_constants_given_once_come_back_on_every_row() -> None:
    batch = _served(4)
    for c in ("model", "primary_model", "fallback_model"):
        del batch.columns[c]
    batch.constants.update({"model": "diamonds-price", "primary_model": "gbr", "fallback_model": "ridge",
                            "primary_version": "ignored: the column is given"})
    cols = _roundtrip(batch)
    assert cols["model"].tolist() == ["diamonds-price"] * 4 and cols["fallback_model"].tolist() == ["ridge"] * 4
    assert cols["primary_version"].tolist() == ["1"] * 4, "a column given per row wins"
    assert len(encode(batch).body) <= len(encode(_served(4)).body) + 8
    picked = _roundtrip(batch.take(np.array([1, 3])))
    assert picked["primary_model"].tolist() == ["gbr", "gbr"]


def test_a_body_needs_its_schema() -> None:
    e = encode(_served(3))
    with pytest.raises(KeyError, match="schema"):
        decode(e.body)
    assert encode(_served(3, seed=1)).schema_id == e.schema_id, "one schema for batches of one service"


def test_a_batch_of_fifty_one_row_requests_stays_small() -> None:
    # The body of the bench_logsize example at its default flush (50 one-row requests) was 89.9
    # bytes a row before the schema table, 57 after; the store keeps the index beside it.
    size = len(encode(_served(50)).body)
    assert size < 50 * 62, f"{size / 50:.1f} bytes a row"


def test_text_columns_come_back_whatever_their_values() -> None:
    """Text is coded through pandas' hash table when every distinct value is a string; anything
    else (numbers or booleans beside text, all missing, lists or objects) takes Arrow's path or
    the JSON one. All decode alike."""
    n = 6
    feats = {
        "cut": np.array(["Ideal", None, "Fair", "Ideal", np.nan, "Fair"], dtype=object),
        "mixed": np.array(["a", 1, True, None, "b", 1.5], dtype=object),
        "empty": np.array([None] * n, dtype=object),
        "nested": np.array(["a", ["a"], None, "b", {"x": 1}, "a"] + [None], dtype=object)[:-1],
    }
    cols = {"ts": np.full(n, 1.0), "route": np.array(["primary", "fallback", "rejected"] * 2, dtype=object),
            "reasons": np.array([""] * 5 + ["out_of_range:carat"], dtype=object)}
    b = LogBatch(np.array([f"{i:032x}" for i in range(n)], dtype=object), np.zeros(n, dtype=np.int64), cols, feats)
    e = encode(b)
    out = decode(e.body, {e.schema_id: e.schema})
    assert out["f:cut"].tolist() == ["Ideal", None, "Fair", "Ideal", None, "Fair"]
    assert out["route"].tolist() == cols["route"].tolist() and out["reasons"].tolist() == cols["reasons"].tolist()
    assert out["f:empty"].tolist() == [None] * n
    assert [str(v) for v in out["f:mixed"].tolist()] == ["a", "1", "True", "None", "b", "1.5"]
    assert out["f:nested"].tolist() == ["a", ["a"], None, "b", {"x": 1}, "a"], "unhashable values too"
