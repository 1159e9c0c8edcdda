"""The drift monitor in process on SQLite: views from stored segments, one event per change."""

from __future__ import annotations

from pathlib import Path

from guarded_serving.config import load_config
from guarded_serving.drift.state import DriftState
from guarded_serving.guard import GuardedModel
from guarded_serving.monitor import DRIFT_STATUS_EVENT, DriftMonitor, evaluate, segments
from guarded_serving.recorder import fill_shadows
from guarded_serving.store.sql import Store

from ._data import features, holdout, serve
from .server import write_config


def _segment(store: Store, gm: GuardedModel, df, worker: str) -> None:
    r = gm.predict(df)
    fill_shadows(gm, r)
    state = DriftState.empty(gm.profile)
    state.update(r.verdicts.columns, r.primary_predictions)
    store.add_segment(worker, state.first_ts, state.last_ts, state.rows, state.to_dict())


def test_views_merge_workers_and_each_status_change_is_recorded_once(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, drift={"window_rows": 400, "min_rows": 100}))
    gm = GuardedModel.from_config(cfg)
    store = Store(cfg.store.url)
    _segment(store, gm, features(holdout()).head(200), "w1")
    _segment(store, gm, features(holdout()).iloc[200:400], "w2")
    a = DriftMonitor(cfg, gm.profile, lambda: store)
    b = DriftMonitor(cfg, gm.profile, lambda: store)
    first = a.view()
    assert first["cumulative"]["rows"] == 400 and first["model"] == cfg.name
    assert b.view()["current"]["status"] == first["current"]["status"]
    assert len(store.events(DRIFT_STATUS_EVENT)) == 1, "an unchanged status is not recorded again"
    shifted = features(serve())
    _segment(store, gm, shifted[shifted["carat"] > 1.5].head(400), "w1")
    view = a.view()
    assert view["current"]["status"] == "drift"
    b.view()
    events = store.events(DRIFT_STATUS_EVENT)
    assert len(events) == 2 and events[0]["body"]["changes"], "the change is recorded once"
    report_view, windows = evaluate(segments(store), gm.profile, cfg.drift)
    assert report_view["current"]["status"] == "drift" and windows
    store.close()
