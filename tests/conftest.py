"""Shared test helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

# What the service keeps in its data directory (the ledgers of a PostgreSQL store's workers, a
# default SQLite store) goes to a temporary one, never the developer's home; servers the tests
# start inherit it.
if "GUARDED_SERVING_DATA_DIR" not in os.environ:
    os.environ["GUARDED_SERVING_DATA_DIR"] = _data_dir = tempfile.mkdtemp(prefix="gs-test-data-")
    atexit.register(shutil.rmtree, _data_dir, True)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError
    naming the predicate when ``timeout`` seconds pass first. The one deadline loop of the tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(interval)


def released_together(target: Callable[..., None], args: list[tuple[Any, ...]], timeout: float) -> list[Any]:
    """Run ``target(*a, start, results)`` for each ``a`` in a spawned process of its own, all
    released at once by the ``start`` event, and return what each put on ``results`` (in the
    order they arrived); processes still alive at the end are killed."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, results)) for a in args]
    try:
        for p in procs:
            p.start()
        start.set()
        outs = [results.get(timeout=timeout) for _ in procs]
        for p in procs:
            p.join(30)
        return outs
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
