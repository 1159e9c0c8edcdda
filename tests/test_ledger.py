"""The ledger of prediction-log rows: its arithmetic, claiming (once, only when the worker is
gone, also when killed), the recorder's hooks, and end to end: SIGKILL every worker of a real
server, restart it, and the count of lost rows is exactly what the log misses."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from guarded_serving.config import load_config
from guarded_serving.guard import GuardedModel
from guarded_serving.ledger import (
    _HEADER,
    DeadLedger,
    Ledger,
    claim_dead,
    count_lost,
    ledger_dir,
    open_ledger,
)
from guarded_serving.recorder import Recorder
from guarded_serving.store.sql import Store

from . import _data
from ._logged import logged_request_ids
from .conftest import wait_until
from .server import Server, kill_tree, worker_processes, write_config


def test_lost_is_accepted_minus_committed_minus_counted_drops(tmp_path: Path) -> None:
    led = Ledger(tmp_path, "host:1")
    led.accepted(10)
    led.accepted(5)
    led.committed(8)
    led.dropped(3)
    assert led.counts() == (15, 8, 3) and led.unaccounted == 4
    led.abandon()  # the file stays behind, unlocked, as after a SIGKILL
    (dead,) = claim_dead(tmp_path)
    assert (dead.worker_id, dead.pid, dead.accepted, dead.committed, dead.dropped, dead.lost) == (
        "host:1", os.getpid(), 15, 8, 3, 4)
    assert dead.same_boot and list(tmp_path.iterdir()) == []
    assert claim_dead(tmp_path) == [], "a claimed ledger is gone"


def test_a_live_workers_ledger_is_not_claimed(tmp_path: Path) -> None:
    led = Ledger(tmp_path, "alive")
    led.accepted(3)
    assert claim_dead(tmp_path) == []
    assert led.path.exists() and led.counts() == (3, 0, 0)
    led.committed(3)
    led.close()  # balanced: removed at a clean end
    assert not led.path.exists()


def test_a_clean_end_with_rows_unaccounted_leaves_them_to_be_counted(tmp_path: Path) -> None:
    led = Ledger(tmp_path, "w")
    led.accepted(6)
    led.committed(4)
    led.close()
    assert [d.lost for d in claim_dead(tmp_path)] == [2]


def test_a_ledger_from_before_a_reboot_is_removed_not_counted(tmp_path: Path, caplog) -> None:
    led = Ledger(tmp_path, "old-boot")
    led.accepted(9)
    led.abandon()
    with led.path.open("r+b") as f:  # the boot id of another boot
        f.seek(_HEADER.size - 64 - 16)
        f.write(b"\x01" * 16)
    cfg = load_config(write_config(tmp_path, store={"url": f"sqlite:///{tmp_path / 's.sqlite3'}"}))
    # count_lost looks in the store's ledger folder: put the file there.
    folder = ledger_dir(cfg.store.url, cfg.store.table_prefix)
    assert folder is not None
    folder.mkdir()
    led.path.rename(folder / led.path.name)
    with caplog.at_level(logging.WARNING, logger="guarded_serving.ledger"):
        assert count_lost(cfg) == 0
    assert "before this machine restarted" in caplog.text and not list(folder.iterdir())


def _kill_me_ledger(directory: str) -> None:
    led = Ledger(Path(directory), "child")
    led.accepted(7)
    led.committed(2)
    print("ready", flush=True)
    time.sleep(60)


def test_counters_outlive_a_sigkilled_process(tmp_path: Path) -> None:
    code = f"from tests.test_ledger import _kill_me_ledger; _kill_me_ledger({str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert claim_dead(tmp_path) == [], "locked while its process lives"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (dead,) = claim_dead(tmp_path)
    assert (dead.worker_id, dead.pid, dead.lost) == ("child", proc.pid, 5)


def _claim_count(directory: str) -> list[str]:
    return [d.path.name for d in claim_dead(Path(directory))]


def test_workers_claiming_at_once_count_each_ledger_once(tmp_path: Path) -> None:
    names = set()
    for i in range(200):
        led = Ledger(tmp_path, f"w{i}")
        led.accepted(1)
        led.abandon()
        names.add(led.path.name)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        claimed = pool.map(_claim_count, [str(tmp_path)] * 8)
    flat = [n for part in claimed for n in part]
    assert sorted(flat) == sorted(names), "every ledger claimed, none twice"


def test_a_forked_child_keeps_a_ledger_of_its_own(tmp_path: Path) -> None:
    led = Ledger(tmp_path, "parent")
    led.accepted(1)
    pid = os.fork()
    if pid == 0:  # the child: count, then die without any cleanup, as if killed
        led.accepted(5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert led.counts() == (1, 0, 0), "the child wrote into a file of its own"
    (dead,) = claim_dead(tmp_path)  # the child's; the parent's is still locked
    assert (dead.pid, dead.lost) == (pid, 5)
    assert led.path.exists()
    led.committed(1)
    led.close()


def test_where_ledgers_live() -> None:
    assert ledger_dir("sqlite:////data/gs.sqlite3", "gs_") == Path("/data/gs.sqlite3.gs_ledgers")
    assert ledger_dir("sqlite://", "gs_") is None
    pg = ledger_dir("postgresql://u:secret@db.example:5432/prod", "m1_")
    assert pg is not None and pg.name == "postgresql-db.example-5432-prod-m1_" and "secret" not in str(pg)


def test_a_ledger_killed_in_the_making_counts_nothing(tmp_path: Path) -> None:
    creating = tmp_path / "123-abc.creating"
    creating.write_bytes(b"")
    assert claim_dead(tmp_path) == [], "it may be about to be locked"
    os.utime(creating, (time.time() - 120, time.time() - 120))
    assert [d.lost for d in claim_dead(tmp_path)] == [0]
    assert DeadLedger.parse(tmp_path / "x.ledger", b"junk").lost == 0


# -- the recorder's hooks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard() -> GuardedModel:
    return GuardedModel.from_config(load_config(write_config(Path("/tmp"))))


def _recorder(tmp_path: Path, guard: GuardedModel, store, **log: object) -> Recorder:
    cfg = load_config(write_config(tmp_path, prediction_log=log))
    return Recorder(guard, cfg, store, ledger=open_ledger(cfg, "test"))


def test_the_recorder_accounts_for_every_row_it_accepts(tmp_path: Path, guard: GuardedModel) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    gate = threading.Event()

    def slow_store() -> Store:
        gate.wait(30)  # a write in progress, as when a worker is killed
        return store

    rec = _recorder(tmp_path, guard, slow_store)
    assert rec.ledger is not None
    X = _data.features(_data.serve())
    for i in range(5):
        rec.submit(f"r{i}", guard.predict(X.iloc[i * 4:i * 4 + 4].reset_index(drop=True)))
    assert rec.ledger.counts() == (20, 0, 0) and rec.ledger.unaccounted == 20
    gate.set()
    assert rec.flush(10)
    assert rec.ledger.counts() == (20, 20, 0) and len(store.joined()) == 20
    rec.close()


def test_drops_the_recorder_counts_are_not_lost(tmp_path: Path, guard: GuardedModel) -> None:
    def down() -> Store:
        from guarded_serving.errors import StoreError

        raise StoreError("down")

    rec = _recorder(tmp_path, guard, down)
    assert rec.ledger is not None
    rec.submit("r1", guard.predict(_data.features(_data.serve()).head(3)))
    assert rec.flush(10)
    assert rec.ledger.counts() == (3, 0, 3) and rec.ledger.unaccounted == 0
    rec.close()


def test_sampled_out_rows_are_not_acknowledged_log_rows(tmp_path: Path, guard: GuardedModel) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    rec = _recorder(tmp_path, guard, lambda: store, sample_rate=0.5)
    assert rec.ledger is not None
    X = _data.features(_data.serve())
    for i in range(40):
        rec.submit(f"r{i}", guard.predict(X.iloc[i:i + 1].reset_index(drop=True)))
    assert rec.flush(10)
    accepted, committed, dropped = rec.ledger.counts()
    assert accepted == committed == len(store.joined()) == rec.counts.logged and 0 < accepted < 40
    rec.close()


def test_no_ledger_where_nothing_can_be_lost_uncounted(tmp_path: Path) -> None:
    durable = load_config(write_config(tmp_path, prediction_log={"durable": True}))
    off = load_config(write_config(tmp_path, prediction_log={"enabled": False}))
    memory = load_config(write_config(tmp_path, store={"url": "sqlite://"}))
    assert open_ledger(durable, "w") is None and open_ledger(off, "w") is None
    assert open_ledger(memory, "w") is None


def test_count_lost_warns_per_dead_worker_and_reports_the_total(tmp_path: Path, caplog) -> None:
    cfg = load_config(write_config(tmp_path))
    for wid, (a, c) in {"h:1": (10, 4), "h:2": (3, 3), "h:3": (8, 0)}.items():
        led = open_ledger(cfg, wid)
        assert led is not None
        led.accepted(a)
        led.committed(c)
        led.abandon()
    alive = open_ledger(cfg, "h:4")
    assert alive is not None
    alive.accepted(100)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="guarded_serving.ledger"):
        assert count_lost(cfg, seen.append) == 14
    assert seen == [14]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and any("h:1" in w and "6 acknowledged row(s)" in w for w in warnings)
    assert alive.path.exists() and count_lost(cfg, seen.append) == 0 and seen == [14]
    alive.committed(100)
    alive.close()


# -- end to end --------------------------------------------------------------------------------


LOST = "guarded_serving_prediction_log_lost_rows_total"


def _metric(srv: Server, name: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=30.0).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def _load(srv: Server, requests: int) -> tuple[dict[str, int], dict[str, float]]:
    """/predict from 8 clients until ``requests`` are answered, then stop them: the rows of each
    acknowledged request and when it was acknowledged. Every request sent is answered before
    this returns, so the server acknowledged exactly the requests seen here."""
    rows = _data.json_rows(_data.features(_data.holdout()).head(200))
    acked: dict[str, int] = {}
    at: dict[str, float] = {}
    stop = threading.Event()
    failures: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            for i in range(k, 100_000, 8):
                if stop.is_set():
                    return
                batch = rows[i % 190:i % 190 + 1 + i % 5]
                r = c.post("/predict", json={"rows": batch})
                if r.status_code != 200:
                    failures.append(r.text)
                    return
                acked[r.json()["request_id"]] = len(batch)
                at[r.json()["request_id"]] = time.time()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= requests or failures, 120, interval=0.005)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:1]
    return acked, at


def _serve_then_kill(cfg: Path, requests: int) -> tuple[dict[str, int], dict[str, float], float]:
    """Load a 2-worker server, then SIGKILL every process at once (rows of the last flush
    interval still waiting to be written): ``_load``'s figures and the kill time."""
    srv = Server(cfg, workers=2).start()
    acked, at = _load(srv, requests)
    killed_at = time.time()
    srv.kill()
    return acked, at, killed_at


def _restart_and_read(cfg: Path) -> tuple[float, str, set[str]]:
    """Start the server again on the same store: (lost rows counted, its log, request ids in
    the prediction log)."""
    srv = Server(cfg, workers=2).start()
    try:
        lost = _metric(srv, LOST)
    finally:
        srv.stop()
    return lost, srv.logs(tail=None), logged_request_ids(cfg)


@pytest.mark.e2e
def test_a_sigkilled_workers_lost_rows_are_counted_exactly(tmp_path: Path) -> None:
    flush = 1.0
    cfg = write_config(tmp_path, prediction_log={"flush_seconds": flush})
    acked, at, killed_at = _serve_then_kill(cfg, requests=1500)
    lost, logs, logged = _restart_and_read(cfg)
    missing = set(acked) - logged
    assert lost == sum(acked[rid] for rid in missing), (lost, len(missing))
    assert len(missing) < len(acked), "most rows were stored before the kill"
    # Within the documented bound: only the last flush interval (and the write in progress).
    assert all(at[rid] >= killed_at - 2 * flush for rid in missing)
    assert ("ended without storing" in logs) == (lost > 0)
    # The killed workers' ledgers were claimed at the restart (a left-over one would show their
    # loss here); the restarted workers, stopped by SIGTERM, leave theirs (no exit handler runs),
    # each with every row accounted for. A worker stopped before it opened one leaves none.
    folder = ledger_dir(load_config(cfg).store.url, "gs_")
    assert folder is not None
    left = claim_dead(folder)
    assert len(left) <= 2 and all(d.lost == 0 for d in left), left
    print(f"acknowledged {sum(acked.values())} rows in {len(acked)} requests; lost {lost:.0f} rows "
          f"of {len(missing)} requests")


@pytest.mark.e2e
def test_durable_mode_counts_no_loss(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, prediction_log={"durable": True, "flush_seconds": 2.0})
    acked, _, _ = _serve_then_kill(cfg, requests=300)
    lost, logs, logged = _restart_and_read(cfg)
    assert lost == 0 and "ended without storing" not in logs
    assert not set(acked) - logged


@pytest.mark.e2e
def test_the_worker_started_in_place_of_a_killed_one_counts_its_loss(tmp_path: Path) -> None:
    # Nothing is written before the kill (long flush intervals, big batches; the background drift
    # evaluation, which flushes the log first, also waits): the victim loses every row it
    # acknowledged, for certain, and the test need not guess whether it lost any.
    cfg = write_config(tmp_path, prediction_log={"flush_seconds": 60.0, "batch_size": 5000},
                       store={"flush_seconds": 600.0})
    folder = ledger_dir(load_config(cfg).store.url, "gs_")
    assert folder is not None
    srv = Server(cfg, workers=2).start()
    try:
        acked, _ = _load(srv, requests=1000)
        assert srv.proc is not None
        victim = worker_processes(srv.proc.pid)[0]
        # The worker and its recording process (an OOM kill of both): BentoML starts another
        # worker in its place, which claims its ledger.
        kill_tree(victim.pid)
        wait_until(lambda: not list(folder.glob(f"{victim.pid}-*")), 90)
        lost = wait_until(lambda: _metric(srv, LOST) or None, 10)
    finally:
        srv.stop()  # the other worker stores everything it acknowledged
    missing = set(acked) - logged_request_ids(cfg)
    assert lost == sum(acked[rid] for rid in missing) > 0
    print(f"one of two workers killed: lost {lost:.0f} of {sum(acked.values())} rows acknowledged")
    assert f":{victim.pid} (pid {victim.pid}, started" in srv.logs(tail=None)


@pytest.mark.e2e
def test_a_killed_workers_recording_process_stores_what_it_was_handed(tmp_path: Path) -> None:
    """SIGKILL of a worker alone: its recording process, which has every row the worker
    acknowledged, stores them and exits, so nothing is lost and nothing is counted lost."""
    cfg = write_config(tmp_path, prediction_log={"flush_seconds": 60.0, "batch_size": 5000})
    srv = Server(cfg, workers=2).start()
    try:
        acked, _ = _load(srv, requests=600)
        assert srv.proc is not None
        victim = worker_processes(srv.proc.pid)[0]
        recorder = victim.children()
        assert len(recorder) == 1, "one recording process per worker"
        victim.kill()
        recorder[0].wait(30)  # it stores what it holds, then exits
        folder = ledger_dir(load_config(cfg).store.url, "gs_")
        assert folder is not None
        wait_until(lambda: not list(folder.glob(f"{victim.pid}-*")), 90)  # claimed by its successor
        lost = _metric(srv, LOST)
    finally:
        srv.stop()
    assert lost == 0
    assert not set(acked) - logged_request_ids(cfg), "every acknowledged request is in the log"
