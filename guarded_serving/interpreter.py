"""The interpreter settings of a long-lived serving process: its garbage collector and its GIL.

``tune`` is called once a process has loaded everything it keeps (BentoML, pandas, the models):
by the service's worker (service.py), by its recording process (recorder_process.py), and by
the benchmark's tuned plain peer (bench/plain_service.py, ``PLAIN_TUNED=1``).

- ``gc.freeze()``: the objects alive then (about 150,000 in a worker) live as long as the
  process; without it, each full collection walks all of them, a pause of tens of milliseconds
  on whichever requests are in flight (the p99).
- ``GC_THRESHOLDS``: a 1,000-row body parses into about 12,000 objects, so at Python's default
  (700, 10, 10) a young collection ran several times per request and promoted the objects of the
  requests in flight, which then waited for full collections. At 10,000 (bench_service.py's load,
  one worker, 15 s, with traffic_timeout.py's fix): 63 young, 5 middle and 0 full collections
  instead of 6,132, 557 and 50 (0.15 s of collection instead of 0.84 s), 5.9 instead of 6.9 ms of
  worker CPU a request, 177 instead of 152 requests/s. Garbage cycles wait for at most 10,000 new
  objects.
- ``GIL_SWITCH_S``: a thread waiting for the GIL waits up to this long for the holder to let go
  (Python's default is 5 ms). Measured with the recorder in a thread of the worker, which holds
  the GIL for most of its work: 0.5 ms gave 77-78 instead of 64-71 requests/s at 1,000 rows a
  request (bench_service.py, alternating runs). With the recorder in its own process the event
  loop, the request threads and the hand-off's sender still share the GIL; the setting stays.
  Measured again so (alternating rounds against the same code at 5 ms, Python's default): 5 ms
  gave 2.6% more requests/s at 1,000 rows a request but 2% fewer at 1 row and 10% fewer at 100.
"""

from __future__ import annotations

import gc
import sys

GC_THRESHOLDS = (10_000, 10, 10)
GIL_SWITCH_S = 0.0005


def tune(switch_interval: bool = True) -> None:
    """Freeze what is alive now and set the collector's thresholds (and the GIL switch interval)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if switch_interval:
        sys.setswitchinterval(GIL_SWITCH_S)
