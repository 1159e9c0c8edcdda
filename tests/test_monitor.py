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
from .conftest import wait_until
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


def test_a_retrain_recommendation_runs_the_retrain_command_once(tmp_path: Path) -> None:
    """When retraining first becomes recommended, the config's retrain command runs (once across
    monitors) in a process of its own, on a fresh export."""
    runs = tmp_path / "runs"
    script = tmp_path / "train.py"
    script.write_text("import pathlib, sys\npathlib.Path(sys.argv[2]).write_text(open(sys.argv[1], 'rb').read()[:4].hex())\n")
    cfg = load_config(write_config(tmp_path, drift={"window_rows": 200, "min_rows": 100,
                                                    "consecutive_windows_for_retrain": 1},
                                   retrain={"command": ["{python}", str(script), "{export}", "{candidate}"],
                                            "workdir": str(runs)}))
    gm = GuardedModel.from_config(cfg)
    store = Store(cfg.store.url)
    a = DriftMonitor(cfg, gm.profile, lambda: store)
    b = DriftMonitor(cfg, gm.profile, lambda: store)
    _segment(store, gm, features(holdout()).head(200), "w1")
    assert not a.view()["retrain_recommended"] and not runs.exists()
    shifted = features(serve())
    _segment(store, gm, shifted[shifted["carat"] > 1.5].head(200), "w1")
    _segment(store, gm, features(holdout()).iloc[200:210], "w1")  # closes the drifting window
    assert a.view()["retrain_recommended"]
    b.view()
    candidates = wait_until(lambda: list(runs.glob("*/candidate.onnx")), 60)
    assert len(candidates) == 1, "recommended once, retrained once"
    assert candidates[0].read_text() == b"PAR1".hex(), "the script got the Parquet export"
    # The run ends by itself, with its JSON summary (no outcomes logged here: nothing to replay on).
    wait_until(lambda: '"replay": null' in (runs / "auto-retrain.log").read_text(), 60)
    store.close()
