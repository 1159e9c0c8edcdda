"""The recorder in process: one hand-off to shadows, drift counts and log batches; failures are
counted, durable waiters are told."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from guarded_serving.config import load_config
from guarded_serving.errors import StoreError
from guarded_serving.guard import GuardedModel
from guarded_serving.recorder import Recorder, fill_shadows
from guarded_serving.store.sql import Store

from ._data import features, holdout, serve
from .server import write_config


@pytest.fixture(scope="module")
def guard() -> GuardedModel:
    return GuardedModel.from_config(load_config(write_config(Path("/tmp"))))


def _recorder(tmp_path: Path, guard: GuardedModel, store, **log: object) -> Recorder:
    cfg = load_config(write_config(tmp_path, prediction_log=log))
    dropped: list[tuple[int, str]] = []
    rec = Recorder(guard, cfg, store, on_drop=lambda n, stage: dropped.append((n, stage)))
    rec.dropped_calls = dropped  # type: ignore[attr-defined]
    return rec


def test_one_hand_off_feeds_shadows_drift_and_one_log_batch(tmp_path: Path, guard: GuardedModel) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    rec = _recorder(tmp_path, guard, lambda: store)
    X = features(serve()).head(40)
    results = [guard.predict(X.iloc[i:i + 10].reset_index(drop=True)) for i in range(0, 30, 10)]
    results.append(guard.predict(features(holdout()).head(10)))  # in range: no reasons at all
    for i, r in enumerate(results):
        rec.submit(f"r{i}", r)
    assert rec.flush(10)
    df = store.joined()
    assert len(df) == 40 and store.log_size()["index_entries"] == 4
    served = np.concatenate([r.predictions for r in results])
    np.testing.assert_allclose(df.sort_values(["request_id", "row"])["prediction"].to_numpy(dtype=float), served)
    assert df["fallback_prediction"].notna().all() and df["primary_prediction"].notna().all()
    reasons = [";".join(r) for res in results for r in res.reasons]
    assert any(reasons) and not all(reasons), "the serve rows: some flagged, some not"
    assert df.sort_values(["request_id", "row"])["reasons"].tolist() == reasons
    drift = rec.take_drift()
    assert drift is not None and drift.rows == 40
    # The same shadows outside a server.
    r = guard.predict(X.head(10))
    fill_shadows(guard, r)
    assert not np.isnan(r.fallback_predictions).any() and not np.isnan(r.primary_predictions).any()
    rec.close()


def test_a_store_that_keeps_failing_drops_counted_rows_and_fails_durable_waiters(
        tmp_path: Path, guard: GuardedModel) -> None:
    def down() -> Store:
        raise StoreError("down")

    rec = _recorder(tmp_path, guard, down, durable=True)
    r = guard.predict(features(serve()).head(3))
    done = rec.submit("r1", r)
    assert done is not None
    with pytest.raises(StoreError, match="could not be written"):
        done.result(10)
    assert rec.counts.dropped["log"] == 3 and (3, "log") in rec.dropped_calls  # type: ignore[attr-defined]
    drift = rec.take_drift()
    assert drift is not None and drift.rows == 3, "drift counts do not depend on the store"
    rec.close()


def test_a_lot_that_fails_to_record_counts_its_rows_as_dropped(tmp_path: Path, guard: GuardedModel) -> None:
    """A bug in the consumer (here: the fallback's shadow raising past its guard) must not make
    rows vanish uncounted: they are drops like a store failure's, and the lot after it is logged."""
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    rec = _recorder(tmp_path, guard, lambda: store)
    real = rec._process
    calls = [0]

    def broken_once(items):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("a bug in recording")
        real(items)

    rec._process = broken_once  # type: ignore[method-assign]
    X = features(serve())
    rec.submit("r1", guard.predict(X.head(4)))
    assert rec.flush(10)
    rec.submit("r2", guard.predict(X.head(2)))
    assert rec.flush(10)
    assert rec.counts.dropped["log"] == 4 and (4, "log") in rec.dropped_calls  # type: ignore[attr-defined]
    assert rec.counts.logged == 2 and len(store.joined()) == 2
    rec.close()


def test_the_default_lot_fits_a_small_queue_and_a_set_batch_size_is_kept(tmp_path: Path, guard: GuardedModel) -> None:
    """Lots of 5,000 rows by default (the per-lot cost is spread over more rows), but never more
    than half a smaller queue: waiting for a lot the queue cannot hold would drop rows."""
    assert _recorder(tmp_path, guard, None).batch_rows == 5000
    assert _recorder(tmp_path, guard, None, queue_size=2000).batch_rows == 1000
    assert _recorder(tmp_path, guard, None, queue_size=2000, batch_size=1500).batch_rows == 1500
