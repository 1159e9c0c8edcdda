"""A per-worker ledger of prediction-log rows that outlives its process, so that the rows a
killed worker had acknowledged but not yet stored are counted after all.

By default ``/predict`` answers before its rows are stored (``recorder.py``); a process killed
with SIGKILL (or by the OOM killer) cannot count what it loses. Its ledger can: a small file per
worker process, mapped shared into memory, with three counters the recorder updates with plain
memory stores (no system call, no lock on the request path):

- ``accepted``: rows taken into the recorder's queue for the log, the request not waiting;
- ``committed``: rows of those the store committed;
- ``dropped``: rows of those dropped and counted by the process (``stage=log``).

The kernel keeps a shared file mapping's pages when its process dies, so the counters stay as the
process left them. A worker holds an exclusive ``flock`` on its ledger while it lives, which the
kernel releases at its death. When a worker starts it claims every ledger it can lock (their
workers are gone: liveness is the lock, so a reused pid does not matter), counts
``lost = accepted - committed - dropped``, logs one warning per worker that lost rows, adds them
to ``guarded_serving_prediction_log_lost_rows_total`` and removes the file. Workers that claim at
the same time are serialized by the lock, and the later one finds the file gone (its inode is no
longer linked), so each ledger is counted once. A ledger whose rows are all accounted for is
removed at interpreter exit (where that runs: BentoML's workers may end before) or counts 0 when
the next worker claims it.

What it cannot count: rows lost when the machine itself goes down (the page cache that holds the
counters goes with the rows; a ledger from an earlier boot is removed with a warning, not
counted), and ledgers in a data directory that does not outlive the process (a container's own
filesystem: mount a volume). In durable mode there is nothing to count: a row is acknowledged only
once committed.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> led = Ledger(d, "host:123")
>>> led.accepted(5); led.committed(3)
>>> led.abandon()  # as if the process had been killed: the file stays, unlocked
>>> [(dead.worker_id, dead.lost) for dead in claim_dead(d)]
[('host:123', 2)]
>>> list(d.iterdir())
[]
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sqlalchemy.engine import make_url

from .config import ServingConfig, data_dir

log = logging.getLogger(__name__)

_MAGIC = b"GSLEDG01"
#: magic, pid, start time (Unix s), boot id, worker id (UTF-8, cut to 64 bytes)
_HEADER = struct.Struct("<8sqd16s64s")
#: Where the counters start (8-byte aligned, after the header) and the file's size.
_COUNTS_AT, _SIZE = 128, 256
_COUNTS = struct.Struct("@3Q")  # native: written and read on the same machine
ACCEPTED, COMMITTED, DROPPED = range(3)
SUFFIX = ".ledger"
_CREATING = ".creating"
_CREATING_GRACE_S = 60.0


def _boot_id() -> bytes:
    try:
        return uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip()).bytes
    except (OSError, ValueError):  # not Linux: every ledger then counts as this boot's
        return bytes(16)


BOOT_ID = _boot_id()


class _Outcomes:
    """The counts a recorder keeps of accepted rows' fates, into a ledger's mapped memory."""

    _counts: memoryview
    _drop_lock: threading.Lock

    def committed(self, n: int) -> None:
        """``n`` accepted rows the store committed."""
        self._counts[COMMITTED] += n

    def dropped(self, n: int) -> None:
        """``n`` accepted rows dropped, and counted, by this process."""
        with self._drop_lock:
            self._counts[DROPPED] += n


class Ledger(_Outcomes):
    """This process's ledger in ``directory`` (created, locked and mapped here).

    The request path calls ``accepted`` under the recorder's queue lock and the recorder's
    consumer thread calls ``committed``: each counter has one writer at a time, so a plain
    read-modify-write of the mapped memory is enough. ``dropped`` may come from two threads
    (the consumer, and ``close`` when a flush timed out) and takes a lock; drops are rare.

    >>> import tempfile
    >>> led = Ledger(Path(tempfile.mkdtemp()), "host:1")
    >>> led.accepted(4); led.committed(4)
    >>> led.counts(), led.unaccounted
    ((4, 4, 0), 0)
    >>> led.close()  # balanced: the file is removed
    >>> led.path.exists()
    False
    """

    def __init__(self, directory: Path, worker_id: str) -> None:
        self.worker_id = worker_id
        self.directory = directory
        self._drop_lock = threading.Lock()
        self._open()
        os.register_at_fork(after_in_child=partial(_reopen_in_child, weakref.ref(self)))

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path = self.directory / (name + SUFFIX)
        creating = self.directory / (name + _CREATING)
        fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mm = mmap.mmap(fd, _SIZE)  # MAP_SHARED: the page cache keeps what we store
            mm[: _HEADER.size] = _HEADER.pack(_MAGIC, os.getpid(), time.time(), BOOT_ID,
                                              self.worker_id.encode()[:64])
            # Claimers look at *.ledger only, so they never see one before it is locked.
            os.rename(creating, self.path)
        except BaseException:
            os.close(fd)
            creating.unlink(missing_ok=True)
            raise
        self._fd, self._mm = fd, mm
        self._counts = memoryview(mm)[_COUNTS_AT : _COUNTS_AT + _COUNTS.size].cast("Q")
        self._finalizer = weakref.finalize(self, _close, fd, mm, self._counts, self.path)

    def _reopen(self) -> None:
        # A forked child must not write into its parent's ledger, nor keep its lock (the lock
        # belongs to the open file both now share): it gets a ledger of its own.
        if not self._finalizer.alive:  # closed before the fork
            return
        self._finalizer.detach()
        self._counts.release()
        self._mm.close()
        os.close(self._fd)
        self._drop_lock = threading.Lock()  # another thread may have held it at the fork
        self._open()

    # -- the recorder's hooks ----------------------------------------------------------------

    def accepted(self, n: int) -> None:
        """``n`` rows taken for the log before they are stored (the request is acknowledged)."""
        self._counts[ACCEPTED] += n

    # -- reading and ending ------------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        """(accepted, committed, dropped) so far."""
        c = self._counts
        return c[ACCEPTED], c[COMMITTED], c[DROPPED]

    @property
    def unaccounted(self) -> int:
        """Accepted rows neither committed nor counted as dropped (yet)."""
        a, c, d = self.counts()
        return a - c - d

    def close(self) -> None:
        """Unlock and unmap; the file is removed if every accepted row is accounted for, and
        otherwise left for the next worker to count. Also run at exit."""
        self._finalizer()

    def abandon(self) -> None:
        """Unlock and unmap, leaving the file as a killed process would (for tests)."""
        if self._finalizer.detach() is not None:
            _close(self._fd, self._mm, self._counts, None)


class SharedLedger(_Outcomes):
    """Another process's view of a live ledger (``recorder_process.py``): the serving process
    owns the file, holds its lock and counts ``accepted``; its recording process, which commits
    or drops those rows, counts ``committed`` and ``dropped`` here, straight into the same mapped
    memory, so the counts stay exact whichever of the two is killed. Takes no lock (the owner's
    lock is what tells claimers the worker lives); never removes the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._drop_lock = threading.Lock()
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._mm = mm
        self._counts = memoryview(mm)[_COUNTS_AT : _COUNTS_AT + _COUNTS.size].cast("Q")

    def accepted(self, n: int) -> None:  # pragma: no cover - the owner counts these
        raise RuntimeError("rows are accepted by the ledger's owner")

    def close(self) -> None:
        self._counts.release()
        self._mm.close()


def _reopen_in_child(ref: weakref.ref[Ledger]) -> None:
    led = ref()
    if led is not None:
        led._reopen()


def _close(fd: int, mm: mmap.mmap, counts: memoryview, path: Path | None) -> None:
    if path is not None and counts[ACCEPTED] - counts[COMMITTED] - counts[DROPPED] <= 0:
        path.unlink(missing_ok=True)
    counts.release()
    mm.close()
    os.close(fd)  # releases the lock


@dataclass(frozen=True)
class DeadLedger:
    """The counters a worker left behind, as claimed."""

    path: Path
    pid: int
    started_at: float
    worker_id: str
    accepted: int
    committed: int
    dropped: int
    #: False when the ledger is from before this machine last booted.
    same_boot: bool

    @property
    def lost(self) -> int | None:
        """Acknowledged rows that were neither stored nor counted as dropped; None when the
        machine went down in between (the counters are then as it last wrote them to disk)."""
        if not self.same_boot:
            return None
        # A close that timed out counts every queued row as dropped, sampled-out ones too.
        return max(0, self.accepted - self.committed - self.dropped)

    @classmethod
    def parse(cls, path: Path, data: bytes) -> DeadLedger:
        if len(data) < _SIZE or data[:8] != _MAGIC:  # killed while it was being created
            return cls(path, 0, 0.0, "", 0, 0, 0, True)
        _, pid, started, boot, wid = _HEADER.unpack_from(data)
        a, c, d = _COUNTS.unpack_from(data, _COUNTS_AT)
        return cls(path, pid, started, wid.rstrip(b"\0").decode(errors="replace"), a, c, d,
                   boot == BOOT_ID)


def claim_dead(directory: Path) -> list[DeadLedger]:
    """Claim and remove the ledgers in ``directory`` whose processes are gone (unlocked)."""
    try:
        paths = sorted(p for p in directory.iterdir() if p.suffix in (SUFFIX, _CREATING))
    except FileNotFoundError:
        return []
    # A file still being created is not locked yet for an instant: left alone while recent.
    paths = [p for p in paths if p.suffix == SUFFIX or _age_s(p) > _CREATING_GRACE_S]
    out = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # claimed by another worker meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process lives (or another worker is claiming it)
                continue
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue
            except FileNotFoundError:  # another worker claimed it while we waited for the lock
                continue
            data = os.pread(fd, _SIZE, 0)
            os.unlink(path)  # while locked: no one else can claim it now
        finally:
            os.close(fd)
        out.append(DeadLedger.parse(path, data))
    return out


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def ledger_dir(store_url: str, prefix: str) -> Path | None:
    """Where the ledgers of the workers logging to this store (and table prefix) live: beside a
    SQLite file, else in the local data directory, one folder per database; None for an
    in-memory SQLite store, whose log dies with its process anyway."""
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db in ("", ":memory:") or db.startswith("file:"):
            return None
        p = Path(db)
        return p.parent / f"{p.name}.{prefix}ledgers"
    key = f"{url.get_backend_name()}-{url.host}-{url.port}-{url.database}-{prefix}"
    return data_dir() / "ledgers" / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def open_ledger(config: ServingConfig, worker_id: str) -> Ledger | None:
    """This worker's ledger, or None where it would have nothing to count (the log is off, or
    durable) or cannot be kept (in-memory store, a directory we cannot write: warned)."""
    pl = config.prediction_log
    directory = ledger_dir(config.store.url, config.store.table_prefix)
    if not pl.enabled or pl.durable or directory is None:
        return None
    try:
        return Ledger(directory, worker_id)
    except OSError as e:
        log.warning("prediction log: no ledger in %s, so rows lost if this worker is killed will "
                    "not be counted: %s", directory, e)
        return None


def count_lost(config: ServingConfig, on_lost: Callable[[int], None] | None = None) -> int:
    """Claim the ledgers of this store's dead workers, warn once per worker that lost rows,
    report the total to ``on_lost`` and return it. Never raises (startup must go on)."""
    directory = ledger_dir(config.store.url, config.store.table_prefix)
    if directory is None:
        return 0
    try:
        dead = claim_dead(directory)
    except OSError as e:
        log.warning("prediction log: could not claim the ledgers of dead workers in %s: %s", directory, e)
        return 0
    total = 0
    for d in dead:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.started_at))
        if d.lost is None:
            if d.accepted != d.committed + d.dropped:
                log.warning("prediction log: worker %s (pid %d, started %s) ran before this machine "
                            "restarted; rows lost when a machine goes down cannot be counted",
                            d.worker_id, d.pid, started)
        elif d.lost:
            total += d.lost
            log.warning("prediction log: worker %s (pid %d, started %s) ended without storing %d "
                        "acknowledged row(s) (accepted %d, committed %d, dropped and counted %d)",
                        d.worker_id, d.pid, started, d.lost, d.accepted, d.committed, d.dropped)
    if total and on_lost is not None:
        on_lost(total)
    return total
