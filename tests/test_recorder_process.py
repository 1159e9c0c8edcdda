"""The recorder in a process of its own (a real child process, a real SQLite store): what the
serving side hands over is logged and counted as in process, durable waiters hear of their
commit, and a recording process that dies costs counted rows, never the serving side."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guarded_serving.config import load_config
from guarded_serving.errors import StoreError
from guarded_serving.guard import GuardedModel
from guarded_serving.ledger import Ledger
from guarded_serving.recorder_process import RecorderProcess, WireText, slim, unslim
from guarded_serving.store.sql import Store

from ._data import features, holdout, serve
from .server import write_config


@pytest.fixture(scope="module")
def guard() -> GuardedModel:
    return GuardedModel.from_config(load_config(write_config(Path("/tmp"))))


def _recorder(tmp_path: Path, ledger: Ledger | None = None, max_rows: int = 1000, **log: object) -> RecorderProcess:
    cfg = load_config(write_config(tmp_path, prediction_log=log, max_rows=max_rows))
    calls: dict[str, list[tuple[int, object]]] = {"dropped": [], "logged": []}
    rec = RecorderProcess(cfg, "test:1", on_drop=lambda n, stage: calls["dropped"].append((n, stage)),
                          on_logged=lambda a, b: calls["logged"].append((a, b)), ledger=ledger)
    rec.calls = calls  # type: ignore[attr-defined]
    rec.start()
    return rec


def _store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'store.sqlite3'}")


def test_a_hand_off_is_logged_and_counted_by_the_child(tmp_path: Path, guard: GuardedModel) -> None:
    ledger = Ledger(tmp_path / "ledgers", "test:1")
    rec = _recorder(tmp_path, ledger)
    X = features(serve()).head(60)
    results = [guard.predict(X.iloc[i:i + 15].reset_index(drop=True)) for i in range(0, 60, 15)]
    for i, r in enumerate(results):
        rec.submit(f"r{i}", r)
    assert rec.flush(60)
    df = _store(tmp_path).joined()
    assert len(df) == 60 and sorted(df["request_id"].unique()) == ["r0", "r1", "r2", "r3"]
    assert df["fallback_prediction"].notna().all() and df["primary_prediction"].notna().all()
    logged = df.sort_values(["request_id", "row"])["reasons"].tolist()
    assert logged == [";".join(x) for r in results for x in r.reasons] and any(logged)
    assert rec.counts.submitted == 60 and rec.counts.logged == 60
    assert sum(a for a, _ in rec.calls["logged"]) == 60  # type: ignore[attr-defined]
    state, _ = rec.take_monitoring()
    assert state is not None and state.rows == 60
    again, _ = rec.take_monitoring()
    assert again is not None and again.rows == 0, "a take starts the counts again"
    rec.give_back_drift(state)
    back, _ = rec.take_monitoring()
    assert back is not None and back.rows == 60
    assert ledger.counts() == (60, 60, 0), "the child counts its commits into the worker's ledger"
    proc = rec._proc
    assert rec.close(30) and proc is not None and proc.poll() is not None, "close stops the child"
    ledger.close()


def test_durable_waiters_hear_of_their_commit(tmp_path: Path, guard: GuardedModel) -> None:
    rec = _recorder(tmp_path, durable=True)
    X = features(serve())
    done = [rec.submit(f"d{i}", guard.predict(X.iloc[i * 5:(i + 1) * 5].reset_index(drop=True)))
            for i in range(6)]
    assert all(d is not None for d in done)
    assert [d.result(60) for d in done if d is not None] and all(d.exception() is None for d in done if d)
    assert set(_store(tmp_path).joined()["request_id"]) == {f"d{i}" for i in range(6)}
    rec.close(30)


def test_a_killed_child_costs_counted_rows_and_a_new_child_takes_over(tmp_path: Path, guard: GuardedModel) -> None:
    ledger = Ledger(tmp_path / "ledgers", "test:1")
    rec = _recorder(tmp_path, ledger)
    X = features(serve())
    rec.submit("before", guard.predict(X.head(10)))
    assert rec.flush(60)
    first = rec._proc
    assert first is not None
    # Stop the child between two lots, then hand it a batch it will never take.
    os.kill(first.pid, signal.SIGSTOP)
    rec.submit("lost", guard.predict(X.head(7)))
    time.sleep(0.5)
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (rec._proc is None or rec._proc is first) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rec._proc is not None and rec._proc is not first and rec.restarts == 1
    assert (7, "log") in rec.calls["dropped"]  # type: ignore[attr-defined]
    rec.submit("after", guard.predict(X.head(3)))
    assert rec.flush(60)
    assert set(_store(tmp_path).joined()["request_id"]) == {"before", "after"}
    accepted, committed, dropped = ledger.counts()
    assert (accepted, committed, dropped) == (20, 13, 7), "every accepted row is committed or counted"
    rec.close(30)
    ledger.close()


def test_durable_waiters_are_told_when_the_child_dies(tmp_path: Path, guard: GuardedModel) -> None:
    rec = _recorder(tmp_path, durable=True)
    X = features(serve())
    assert rec.flush(60)
    child = rec._proc
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    done = rec.submit("d", guard.predict(X.head(4)))
    assert done is not None
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(StoreError, match="recording process stopped"):
        done.result(30)
    rec.close(30)


def test_a_full_hand_off_drops_and_counts_instead_of_waiting(tmp_path: Path, guard: GuardedModel) -> None:
    rec = _recorder(tmp_path, queue_size=10, max_rows=10)
    X = features(serve())
    assert rec.flush(60)
    child = rec._proc
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)  # a child that takes nothing
    try:
        for i in range(3):
            rec.submit(f"r{i}", guard.predict(X.head(6)))
        assert rec.counts.dropped["monitoring"] >= 6, "beyond queue_size, batches are dropped and counted"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert rec.flush(60)
    rec.close(30)


def test_the_hand_off_carries_only_what_recording_reads(guard: GuardedModel) -> None:
    r = guard.predict(features(serve()).head(20))
    s = slim(r)
    assert s.verdicts is not None and r.verdicts is not None
    assert s.verdicts.columns is r.verdicts.columns and s.verdicts.flags.size == 0
    assert set(s.timing_ms) == {"total"} and s.routes is r.routes and s.reasons is r.reasons
    assert any(r.reasons), "the serve rows: some flagged"
    quiet = guard.predict(features(holdout()).head(20))
    assert not any(quiet.reasons) and slim(quiet).reasons == [], "no reasons: none sent"


def test_categorical_columns_travel_as_the_checks_codes_and_arrive_as_text(guard: GuardedModel) -> None:
    rows = features(serve()).head(200).astype(object).to_dict("records")
    rows[3]["cut"], rows[5]["color"], rows[7]["clarity"] = None, "Chartreuse", "Flawless"
    r = guard.predict(rows)
    assert r.verdicts is not None and set(r.verdicts.codes) == {"cut", "color", "clarity"}
    s = slim(r)
    assert s.verdicts is not None
    sent = s.verdicts.columns["color"]
    assert isinstance(sent, WireText) and sent.codes.dtype == np.int8 and sent.at.tolist() == [5]
    arrived = unslim(pickle.loads(pickle.dumps(s, protocol=5)))
    assert arrived.verdicts is not None
    for name, values in r.verdicts.columns.items():
        got = arrived.verdicts.columns[name]
        assert type(got) is np.ndarray and got.dtype == values.dtype, name
        assert [None if v is None else v for v in got.tolist()] == values.tolist(), name
    assert arrived.verdicts.columns["cut"][3] is None and arrived.verdicts.columns["color"][5] == "Chartreuse"
    # A column replaced after the checks is not described by their codes: it goes as text.
    r.verdicts.columns["cut"] = r.verdicts.columns["cut"].copy()
    assert type(slim(r).verdicts.columns["cut"]) is np.ndarray  # type: ignore[union-attr]


def test_drift_counts_answered_too_late_are_kept_for_the_next_take(tmp_path: Path, guard: GuardedModel) -> None:
    cfg = load_config(write_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 'store.sqlite3'}",
                                                    "timeout_seconds": 0.5}))
    rec = RecorderProcess(cfg, "test:1")
    rec.start()
    rec.submit("r", guard.predict(features(serve()).head(12)))
    assert rec.flush(60)
    child = rec._proc
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    try:
        assert rec.take_monitoring() == (None, None), "a child that does not answer in time: nothing"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    time.sleep(1.0)  # its late answer arrives and is given back
    state, _ = rec.take_monitoring()
    assert state is not None and state.rows == 12
    rec.close(30)


def test_a_recording_process_that_cannot_start_leaves_recording_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that dies at once (here: a command that exits) must neither hold the worker's
    start for the whole start timeout nor leave it unmonitored: it records in a thread."""
    from guarded_serving.recorder import Recorder
    from guarded_serving.runtime import ServingRuntime

    monkeypatch.setattr(RecorderProcess, "command", (sys.executable, "-c", "import sys; sys.exit(3)"))
    cfg = load_config(write_config(tmp_path))
    began = time.monotonic()
    rt = ServingRuntime(cfg, recorder_process=True)
    assert time.monotonic() - began < 30
    assert isinstance(rt.recorder, Recorder)
    rows = features(serve()).head(8)
    rt.predict(rows, request_id="r1")
    assert rt.recorder.flush(30)
    assert len(_store(tmp_path).joined()) == 8
    rt.close()


def test_interpreter_tune_freezes_the_heap_and_sets_the_collector() -> None:
    import gc
    import sys

    from guarded_serving import interpreter

    before = gc.get_threshold(), sys.getswitchinterval()
    try:
        interpreter.tune()
        assert gc.get_threshold() == interpreter.GC_THRESHOLDS
        assert sys.getswitchinterval() == pytest.approx(interpreter.GIL_SWITCH_S)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before[0])
        sys.setswitchinterval(before[1])


def test_frames_carry_arrays_out_of_band_whole_and_aligned() -> None:
    """The serving process's frames: arrays written from their own memory beside the pickle
    (more buffers than one writev takes, more bytes than the socket holds), read back whole,
    aligned and writable."""
    from guarded_serving.recorder_process import _IOV_MAX, _read_frame, _write_frame

    a, b = socket.socketpair()
    rng = np.random.default_rng(0)
    big = rng.random(3_000_000)  # 24 MB: many partial writes
    many = [np.arange(i % 7 + 1, dtype=np.int8) for i in range(_IOV_MAX + 100)]
    obj = [("item", big, np.asfortranarray(rng.random((5, 3))), np.array(["x", None], dtype=object)), many]
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(_read_frame(b)))
    reader.start()
    _write_frame(a.fileno(), obj)
    reader.join(30)
    a.close()
    b.close()
    (kind, big2, fortran, text), many2 = got[0]
    assert kind == "item" and np.array_equal(big2, big) and big2.flags.aligned and big2.flags.writeable
    assert np.array_equal(fortran, obj[0][2]) and text.tolist() == ["x", None]
    assert all(np.array_equal(x, y) for x, y in zip(many, many2, strict=True))
