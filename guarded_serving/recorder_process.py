"""The recorder in a process of its own beside each serving process, so that monitoring does not
share the serving process's interpreter (its GIL) with the requests.

Why. Shadow predictions, drift counts, live-estimate tallies and the log's encoding and commit
cost about three times the model's own CPU on a 1,000-row batch (README, Benchmarks). In a thread
of the serving process all of it holds the one GIL the event loop and the request threads need, so
throughput fell to about half of plain BentoML's at 100 and 1,000 rows a request. Here it runs on
another core.

How. ``RecorderProcess`` (in the serving process) has the ``Recorder``'s interface. ``submit``
decides the sample and enters logged rows in this process's ledger, then queues the result, slimmed
to what recording reads (``slim``); one sender thread pickles what waits over a socket pair to the
child, ``python -m guarded_serving.recorder_process``, which loads the same config (models,
profile, estimation artefacts, store) and runs an ordinary ``Recorder`` on what it receives.
Control messages (flush, take the drift counts, follow a model switch, close) travel in the same
order as the results, so "flush" means everything submitted before it. The child reports back
what the serving process counts in its metrics (rows logged, sampled out, dropped), what it has
processed (the bound on rows in flight), and each durable request's commit.

Bounds and faults. Rows queued here plus rows in flight in the child stay within
``prediction_log.queue_size`` (beyond it a batch is dropped and counted, as in process). The
child counts commits and drops straight into the serving process's ledger (``SharedLedger``), so
crash losses stay exactly counted whichever process is killed. If the child dies, what it held is
counted as dropped, durable waiters are told, and a new child starts (with a growing pause). When
the serving process dies, the child finishes what it received, then exits: it watches both its
socket and its parent's pid.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import interpreter
from .checks import Coded, Verdicts
from .config import ServingConfig
from .drift.state import DriftState
from .errors import StoreError
from .estimation import WindowTally
from .guard import GuardedResult
from .ledger import Ledger
from .recorder import HandOff, Recorder, _Item

log = logging.getLogger(__name__)

#: How long the child may take to load its models before it is given up on (and restarted).
START_TIMEOUT_S = 120.0
#: Pauses before restarting a child that died: the first, and the most.
RESTART_PAUSE_S = (1.0, 30.0)
#: The most messages the serving side sends in one frame.
FRAME_MESSAGES = 64
#: How often the child looks for its parent when nothing arrives.
PARENT_POLL_S = 1.0


class WireText(NamedTuple):
    """A categorical column on the wire: the codes the checks found (``Verdicts.codes``), the
    categories they index, and the rows holding anything else (null, unseen text) with their
    values. A 1,000-row batch of three such columns pickles in 39 instead of 123 us and
    unpickles in 49 instead of 115 us (3,000 strings are not pickled one by one), and the child's
    strings are the profile's own objects, their hashes already known."""

    codes: np.ndarray
    categories: tuple[str, ...]
    at: np.ndarray
    others: np.ndarray

    @classmethod
    def of(cls, coded: Coded) -> WireText:
        at = np.flatnonzero(coded.codes < 0)
        return cls(coded.codes, coded.categories, at, coded.values[at])

    def text(self) -> np.ndarray:
        """The column as the checks gave it: an object array of str (None for null)."""
        out: np.ndarray = np.array((*self.categories, None), dtype=object)[self.codes]
        if self.at.size:
            out[self.at] = self.others
        return out


def slim(result: GuardedResult) -> GuardedResult:
    """The parts of a served result that recording reads (not the flags, problems or frames),
    categorical columns as codes where the checks made them (``WireText``). Reasons are sent as
    ``[]`` when no row has any (most batches): the recorder reads them only to log them, and a
    list of 1,000 empty lists costs more to pickle and unpickle than all the routes."""
    v = result.verdicts
    assert v is not None
    columns: dict[str, Any] = v.columns
    if v.codes:
        # Only codes of the very arrays the result holds (nothing replaced them since the checks).
        coded = {k: WireText.of(c) for k, c in v.codes.items() if columns.get(k) is c.values}
        columns = {k: coded.get(k, c) for k, c in columns.items()}
    verdicts = Verdicts(status=v.status, flags=np.zeros((0, 0), dtype=bool), flag_names=[], columns=columns)
    total = result.timing_ms.get("total")
    return replace(result, verdicts=verdicts, reason_counts={}, extra_columns=[],
                   timing_ms={} if total is None else {"total": total},
                   reasons=result.reasons if any(result.reasons) else [])


class RecorderProcess(HandOff):
    """The serving side of the recorder run in a child process; see the module docstring.
    ``on_drop(n, stage)`` and ``on_logged(logged, sampled_out)`` are called from a thread of
    this process and must not raise."""

    #: How the child is started (its socket's descriptor is added).
    command: tuple[str, ...] = (sys.executable, "-m", "guarded_serving.recorder_process")

    def __init__(self, config: ServingConfig, worker_id: str,
                 on_drop: Callable[[int, str], None] | None = None,
                 on_logged: Callable[[int, int], None] | None = None,
                 ledger: Ledger | None = None, challenger: Any = None) -> None:
        super().__init__(config, on_drop, on_logged, ledger)
        self.worker_id = worker_id
        self.drift_enabled = config.drift.enabled
        #: The challenger scored in shadow (the child loads its own; this one is for the drift view).
        self.challenger = challenger
        self._pid = -1
        self._running = threading.Event()  # a child has said it is ready (cleared when it is gone)
        self._tried = threading.Event()  # a first start has been tried, whatever came of it
        self._seq = count()
        self._tokens = count()
        self.restarts = 0

    @property
    def active(self) -> bool:
        return self.drift_enabled or self.log_enabled

    # -- the Recorder's interface ------------------------------------------------------------

    def submit(self, request_id: str, result: GuardedResult, wait_s: float = 0.0) -> Future[int] | None:
        """As ``Recorder.submit``: never blocks on the child beyond ``wait_s`` for room."""
        if result.verdicts is None or not self.active:
            return None
        n = result.n_rows
        fingerprint, logged, done = self._terms(request_id)
        cond = self._ensure()
        with cond:
            if wait_s > 0 and not self._closing and self._held + n > self.queue_rows:
                cond.wait_for(lambda: self._closing or self._held + n <= self.queue_rows, wait_s)
            accepted = not self._closing and self._held + n <= self.queue_rows
            if accepted:
                seq = next(self._seq)
                self._out.append(("item", seq, request_id, time.time(), result, logged, fingerprint,
                                  done is not None))
                self._held += n
                if done is not None:
                    self._durable[seq] = done
                self.counts.submitted += n
                if logged and self.ledger is not None:
                    self.ledger.accepted(n)
                cond.notify_all()
        if not accepted:
            self._count_drop(n, "monitoring")
            self._refused(done)
        return done

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before this call is processed; False on timeout."""
        return bool(self._call("flush", timeout, default=False, args=(timeout,)))

    def take_monitoring(self) -> tuple[DriftState | None, WindowTally | None]:
        """The child's drift counts and estimation tally since the last take (None, None when
        drift is off or the child does not answer within the store timeout)."""
        if not self.drift_enabled:
            return None, None
        got = self._call("take", self.config.store.timeout_seconds, default=None)
        return (None, None) if got is None else got  # type: ignore[no-any-return]

    def give_back_drift(self, state: DriftState, tally: WindowTally | None = None) -> None:
        self._control(("give_back", state, tally))

    def follow(self, primary_model: Any, challenger: Any, event: Any = None) -> None:
        """The serving model set changed: the child loads ``event``'s primary for its shadows
        (the config's when None) and scores the challenger only if one is given."""
        self.challenger = challenger
        self._control(("follow", event, challenger is not None))

    def close(self, timeout: float = 5.0) -> bool:
        """Hand everything over, let the child flush it (at most ``timeout`` s) and exit; what
        could not be stored is counted as dropped."""
        if self._pid != os.getpid():
            return True
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._out.append(("close",))
            self._cond.notify_all()
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(max(1.0, timeout * 0.5))
            except subprocess.TimeoutExpired:
                log.warning("the recording process did not stop in time; killing it")
                proc.kill()
                proc.wait(5)
        self._child_gone(closing=True)
        return flushed

    # -- the serving side's threads -------------------------------------------------------------

    def _ensure(self) -> threading.Condition:
        if self._pid != os.getpid():  # first use in this process (or after a fork)
            self._pid = os.getpid()
            self._cond = threading.Condition()
            self._out: deque[tuple[Any, ...]] = deque()
            self._held = 0  # rows queued here or in flight in the child
            self._durable: dict[int, Future[int]] = {}
            self._pending: dict[int, tuple[Future[Any], Any, str]] = {}
            self._closing = False
            self._proc: subprocess.Popen[bytes] | None = None
            self._conn: Connection | None = None
            threading.Thread(target=self._send_loop, name="guarded-recorder-send", daemon=True).start()
        return self._cond

    def start(self) -> None:
        """Start the child now (it takes a second or two to load the models) instead of on the
        first request."""
        self._ensure()

    def wait_ready(self, timeout: float) -> bool:
        """Whether a recording process runs, waiting up to ``timeout`` s for the first start to
        succeed or fail."""
        self._ensure()
        self._tried.wait(timeout)
        return self._running.is_set()

    def _control(self, message: tuple[Any, ...]) -> None:
        cond = self._ensure()
        with cond:
            self._out.append(message)
            cond.notify_all()

    def _call(self, kind: str, timeout: float, default: Any, args: tuple[Any, ...] = ()) -> Any:
        cond = self._ensure()
        fut: Future[Any] = Future()
        with cond:
            if self._closing:
                return default
            token = next(self._tokens)
            self._pending[token] = (fut, default, kind)
            self._out.append((kind, token, *args))
            cond.notify_all()
        try:
            return fut.result(timeout)
        except TimeoutError:
            # Given up on: a late answer is not lost (drift counts taken go back to the child).
            return default if fut.cancel() else fut.result()

    def _send_loop(self) -> None:
        pause = RESTART_PAUSE_S[0]
        while True:
            if self._conn is None:
                if self._closing:
                    return
                started = self._start_child()
                self._tried.set()
                if not started:
                    time.sleep(pause)
                    pause = min(pause * 2, RESTART_PAUSE_S[1])
                    continue
                pause = RESTART_PAUSE_S[0]
            with self._cond:
                while not self._out and self._conn is not None:
                    self._cond.wait()
                conn = self._conn
                if conn is None or not self._out:
                    continue
                # Everything waiting goes in one frame: one wake-up and one write for many
                # small requests.
                frame = [self._out.popleft() for _ in range(min(len(self._out), FRAME_MESSAGES))]
            try:
                _write_frame(conn.fileno(), [_wire(m) for m in frame])
            except OSError as e:
                # Items that never reached the child are counted with what the child held.
                if not self._closing:
                    log.warning("the recording process is gone (%s)", e)
                self._child_gone()
            if frame[-1][0] == "close":
                return

    def _start_child(self) -> bool:
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [*self.command, str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            log.error("could not start the recording process: %s", e)
            parent_end.close()
            child_end.close()
            return False
        finally:
            child_end.close()
        conn = Connection(parent_end.detach())
        ledger = None if self.ledger is None else str(self.ledger.path)
        try:
            conn.send_bytes(pickle.dumps(("init", self.config, self.worker_id, ledger), protocol=5))
            if not conn.poll(START_TIMEOUT_S):
                raise OSError(f"no answer within {START_TIMEOUT_S:.0f} s")
            if pickle.loads(conn.recv_bytes())[0] != "ready":
                raise OSError("it answered something else than ready")
        except (OSError, EOFError) as e:
            log.error("the recording process did not start: %s", e)
            proc.kill()
            proc.wait()
            conn.close()
            return False
        self._proc, self._conn = proc, conn
        self._running.set()
        threading.Thread(target=self._receive_loop, args=(conn,), name="guarded-recorder-receive",
                         daemon=True).start()
        log.info("recording process %d started", proc.pid)
        return True

    def _receive_loop(self, conn: Connection) -> None:
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                if conn is self._conn:
                    self._child_gone()
                return
            kind = message[0]
            if kind == "processed":
                with self._cond:
                    self._held -= message[1]
                    for seq in message[3]:
                        self._durable.pop(seq, None)
                    self._cond.notify_all()
            elif kind == "done":
                _, seq, written, error = message
                with self._cond:
                    fut = self._durable.pop(seq, None)
                if fut is not None and not fut.done():
                    if error is None:
                        fut.set_result(written)
                    else:
                        fut.set_exception(StoreError(error))
            elif kind == "logged":
                self.counts.logged += message[1]
                self.counts.sampled_out += message[2]
                _call_back(self.on_logged, message[1], message[2])
            elif kind == "dropped":
                self._count_drop(message[1], message[2], child=True)
            elif kind == "reply":
                with self._cond:
                    fut, _, asked = self._pending.pop(message[1], (None, None, ""))
                if fut is None:
                    continue
                if fut.set_running_or_notify_cancel():
                    fut.set_result(message[2])
                elif asked == "take" and message[2] is not None and message[2][0] is not None:
                    self.give_back_drift(*message[2])  # the caller gave up waiting: keep the counts

    def _child_gone(self, closing: bool = False) -> None:
        """The child exited or its socket broke: what it held is dropped and counted, waiters
        are told, and (unless closing) the sender starts another."""
        with self._cond:
            closing = closing or self._closing
            conn, proc = self._conn, self._proc
            if conn is None and not closing:
                return
            self._conn, self._proc = None, None
            self._running.clear()
            if closing:  # nothing more is sent: what is still queued here is lost too
                self._out = deque(m for m in self._out if m[0] != "item")
            queued = [m for m in self._out if m[0] == "item"]
            in_child = self._held - sum(m[4].n_rows for m in queued)
            queued_logged = sum(m[4].n_rows for m in queued if m[5])
            self._held -= in_child
            waiting = {m[1] for m in queued}
            lost = {s: f for s, f in self._durable.items() if s not in waiting}
            for s in lost:
                del self._durable[s]
            pending = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if not closing:
                self.restarts += 1
                log.error("the recording process %d exited (code %s); %d row(s) it held are "
                          "dropped; starting another", proc.pid, proc.returncode, in_child)
        if in_child > 0:
            self._count_drop(in_child, "log", child=False, ledger_exact=queued_logged)
        for f in lost.values():
            if not f.done():
                f.set_exception(StoreError("the recording process stopped before the rows were committed"))
        for fut, default, _ in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_result(default)

    def _count_drop(self, n: int, stage: str, child: bool = False, ledger_exact: int | None = None) -> None:
        self.counts.dropped[stage] = self.counts.dropped.get(stage, 0) + n
        # The child counts its own drops in the ledger; here only what a dead child left: every
        # accepted row neither committed nor dropped, but for those still queued here.
        if not child and ledger_exact is not None and self.ledger is not None:
            lost = self.ledger.unaccounted - ledger_exact
            if lost > 0:
                self.ledger.dropped(lost)
        _call_back(self.on_drop, n, stage)


def _wire(message: tuple[Any, ...]) -> tuple[Any, ...]:
    if message[0] == "item":
        return (*message[:4], slim(message[4]), *message[5:])
    return message


def unslim(result: GuardedResult) -> GuardedResult:
    """A result as ``slim`` sent it, with its categorical columns as text again (in place)."""
    v = result.verdicts
    if v is not None:
        for k, c in v.columns.items():
            if type(c) is WireText:
                v.columns[k] = c.text()
    return result


# -- frames from the serving process to the child ------------------------------------------------
#
# A frame is a pickle (protocol 5) whose arrays travel beside it, out of band: the header (the
# pickle's length, the number of buffers, each buffer's length), then the pickle, then each
# buffer at an offset aligned to _ALIGN. The serving process writes the arrays' own memory with
# one writev (no copy into the pickle: 237 instead of 325 us for a 1,000-row result); the child
# reads the frame into one buffer with one wait-for-all read per part and unpickles arrays that
# are views of it. (``Connection.recv_bytes`` read a 128 kB frame in many partial reads into a
# BytesIO and copied it out.)

_HEAD = struct.Struct("!IH")
_ALIGN = 64
#: At most this many buffers in one writev (the system's limit is usually 1,024).
_IOV_MAX = 512


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _write_frame(fd: int, obj: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    parts: list[Any] = [_HEAD.pack(len(data), len(raws)) + struct.pack(f"!{len(raws)}Q", *(r.nbytes for r in raws)),
                        data]
    at = len(data)
    for r in raws:
        pad = _aligned(at) - at
        if pad:
            parts.append(bytes(pad))
        parts.append(r)
        at += pad + r.nbytes
    _write_all(fd, parts)


def _write_all(fd: int, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i:i + _IOV_MAX])
        while i < len(views) and written >= views[i].nbytes:  # whole parts written
            written -= views[i].nbytes
            i += 1
        if written:  # a part written in part: the rest of it next
            views[i] = views[i][written:]


def _read_frame(sock: socket.socket) -> Any:
    """The object of one frame that ``_write_frame`` wrote."""
    size, count = _HEAD.unpack(_read_exactly(sock, _HEAD.size))
    lengths = struct.unpack(f"!{count}Q", _read_exactly(sock, 8 * count)) if count else ()
    offsets, at = [], size
    for n in lengths:
        at = _aligned(at)
        offsets.append(at)
        at += n
    body = memoryview(_read_exactly(sock, at))
    return pickle.loads(body[:size], buffers=[body[o:o + n] for o, n in zip(offsets, lengths, strict=True)])


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise EOFError("the serving process closed the socket")
        got += k
    return buf


def _call_back(fn: Callable[..., None] | None, *args: Any) -> None:
    if fn is not None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("recorder process: callback failed")


# -- the child -------------------------------------------------------------------------------


class _Child:
    """The recording process: an ordinary Recorder fed from the socket."""

    def __init__(self, conn: Connection, config: ServingConfig, worker_id: str, ledger_path: str | None) -> None:
        from .challenger import load_challenger
        from .estimates import LiveEstimates
        from .guard import GuardedModel
        from .ledger import SharedLedger
        from .store.sql import LazyStore

        self.conn = conn
        #: The same socket, for reading frames whole (``_read_frame``); sends go through ``conn``.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.config = config
        self._send_lock = threading.Lock()
        self.guard = GuardedModel.from_config(config)
        self.store = LazyStore(config.store.url, config.store.table_prefix, config.store.timeout_seconds)
        self.estimates = LiveEstimates.for_config(config, self.guard.profile)
        self.ledger = SharedLedger(Path(ledger_path)) if ledger_path else None
        self.rec = Recorder(self.guard, config, self.store,
                            on_drop=lambda n, stage: self.send(("dropped", n, stage)),
                            on_logged=lambda a, b: self.send(("logged", a, b)),
                            estimates=self.estimates, ledger=self.ledger)  # type: ignore[arg-type]
        self.rec.on_processed = self._processed
        try:
            self.challenger = load_challenger(config)
        except Exception as e:  # noqa: BLE001 - the serving process reports it
            log.warning("recording process: no challenger: %s", e)
            self.challenger = None
        self.rec.challenger = self.challenger
        self._switch: Any = None

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=5)
        with self._send_lock:
            try:
                self.conn.send_bytes(data)
            except OSError:  # the parent is gone; the log is what matters now
                pass

    def _committed(self, seq: int, done: Future[int]) -> None:
        error = done.exception()
        self.send(("done", seq, None if error else done.result(), None if error is None else str(error)))

    def _processed(self, items: list[_Item]) -> None:
        rows = sum(it.result.n_rows for it in items)
        logged = sum(it.result.n_rows for it in items if it.logged)
        self.send(("processed", rows, logged, [it.seq for it in items if it.done is not None]))

    def run(self) -> None:
        parent = os.getppid()
        self.send(("ready",))
        while True:
            try:
                if not self.conn.poll(PARENT_POLL_S):
                    if os.getppid() != parent:
                        log.warning("recording process: the serving process is gone; finishing")
                        break
                    continue
                frame = _read_frame(self.sock)
            except (EOFError, OSError):
                break
            if not all(self.handle(m) for m in frame):
                break
        self.rec.close(self.config.store.timeout_seconds * 2)

    def handle(self, message: tuple[Any, ...]) -> bool:
        kind = message[0]
        if kind == "item":
            _, seq, request_id, ts, result, logged, fingerprint, durable = message
            done: Future[int] | None = Future() if durable else None
            item = _Item(request_id, ts, unslim(result), logged, done, fingerprint, seq=seq)
            if done is not None:
                done.add_done_callback(partial(self._committed, seq))
            # The serving process keeps the rows in flight within the queue's size; waiting here
            # (rather than dropping) is its backpressure.
            if not self.rec.take_over(item, 3600.0):
                n = result.n_rows
                self.rec._dropped(n, "log" if logged else "monitoring")
                self.send(("processed", n, n if logged else 0, []))
                if done is not None:
                    done.set_exception(StoreError("the recorder is closing"))
        elif kind == "flush":
            _, token, timeout = message
            threading.Thread(target=lambda: self.send(("reply", token, self.rec.flush(timeout))),
                             daemon=True).start()
        elif kind == "take":
            self.send(("reply", message[1], self.rec.take_monitoring()))
        elif kind == "give_back":
            if message[1] is not None:
                self.rec.give_back_drift(message[1], message[2])
        elif kind == "follow":
            self.follow(message[1], message[2])
        elif kind == "close":
            return False
        return True

    def follow(self, event: Any, with_challenger: bool) -> None:
        from .promotion import build_guard

        guard = self.guard
        if event is not None:
            try:
                guard = build_guard(self.config, event.to, self.guard)
            except Exception as e:  # noqa: BLE001 - the serving process keeps the old set too
                log.error("recording process: switch %s could not be loaded: %s", event.id, e)
                return
        if self.estimates is not None:
            self.estimates.follow(event.to.profile if event is not None else self.config.profile,
                                  guard.profile)
        self.rec.follow(guard.primary, self.challenger if with_challenger else None)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s guarded-recorder[%(process)d] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server: finish via EOF
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # likewise when the server's group is stopped
    conn = Connection(int(argv[0]))
    try:
        kind, config, worker_id, ledger_path = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return 0
    child = _Child(conn, config, worker_id, ledger_path)
    # The models, pandas and numpy live as long as the process: full collections need not walk them.
    interpreter.tune(switch_interval=False)
    child.run()
    if child.ledger is not None:
        child.ledger.close()
    return 0


if __name__ == "__main__":
    # Run as the package's module, not as __main__: what arrives pickled (WireText, say) is of
    # the package module's classes, which are other objects than __main__'s copies.
    from guarded_serving.recorder_process import main as package_main

    sys.exit(package_main(sys.argv[1:]))
