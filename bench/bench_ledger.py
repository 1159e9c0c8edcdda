"""What the ledger (``guarded_serving/ledger.py``) costs a request.

    python bench/bench_ledger.py

Two figures, medians over alternating rounds:

1. the hook alone: the recorder's ``if logged and self.ledger is not None:
   self.ledger.accepted(n)`` with a ledger against the same line with none (``timeit``);
2. ``Recorder.submit`` of a one-row ``GuardedResult`` (the whole request-path hand-off: queue
   lock, deque append, counters) on a recorder with a ledger and on one without, 5,000 submits
   a round; the queue is emptied between rounds, untimed (the consumer is told to write only
   then, so its work does not land inside the timed loop).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.guard import GuardedModel  # noqa: E402
from guarded_serving.ledger import Ledger  # noqa: E402
from guarded_serving.recorder import Recorder  # noqa: E402
from guarded_serving.store.sql import Store  # noqa: E402

CONFIG = ROOT / "models" / "diamonds" / "serving.yaml"
ROUNDS, SUBMITS = 9, 5000


def hook_ns(ledger: Ledger | None, number: int = 1_000_000) -> float:
    rec = SimpleNamespace(ledger=ledger)
    n, logged = 1, True

    def hook() -> None:
        if logged and rec.ledger is not None:
            rec.ledger.accepted(n)

    return min(timeit.repeat(hook, number=number, repeat=3)) / number * 1e9


def submit_ns(rec: Recorder, result: object) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(SUBMITS):
        rec.submit("r", result)  # type: ignore[arg-type]
    ns = (time.perf_counter_ns() - t0) / SUBMITS
    rec.flush(60)
    return ns


def main() -> None:
    base = load_config(CONFIG)
    pl = base.prediction_log.model_copy(update={"flush_seconds": 3600.0, "batch_size": 10**6,
                                                "queue_size": 10**6})
    config = base.model_copy(update={"prediction_log": pl})
    guard = GuardedModel.from_config(config)
    data = pd.read_parquet(ROOT / "models" / "diamonds" / "data" / "holdout.parquet")
    result = guard.predict(data.drop(columns=[guard.profile.target]).head(1), on_reject="mark")
    with tempfile.TemporaryDirectory(prefix="gs-ledger-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'log.sqlite3'}")
        ledger = Ledger(Path(tmp) / "ledgers", "bench")
        hook_ledger = Ledger(Path(tmp) / "ledgers", "bench-hook")  # counts only the hook's calls
        recs = {"without": Recorder(guard, config, lambda: store),
                "with": Recorder(guard, config, lambda: store, ledger=ledger)}
        hook: dict[str, list[float]] = {"without": [], "with": []}
        submit: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(ROUNDS):
            for name, rec in recs.items():
                hook[name].append(hook_ns(hook_ledger if rec.ledger is not None else None))
                submit[name].append(submit_ns(rec, result))
        print(f"{ROUNDS} alternating rounds, medians (ns per request)")
        print("| | no ledger | ledger | difference |")
        print("|---|---|---|---|")
        for label, d in (("the hook alone", hook), (f"Recorder.submit, {SUBMITS} a round", submit)):
            a, b = statistics.median(d["without"]), statistics.median(d["with"])
            print(f"| {label} | {a:.0f} | {b:.0f} | {b - a:+.0f} |")
        assert ledger.unaccounted == 0, ledger.counts()
        for rec in recs.values():
            rec.close()
        ledger.close()
        hook_ledger.abandon()
        store.close()


if __name__ == "__main__":
    main()
