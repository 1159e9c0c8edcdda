"""Logged production traffic with outcomes, made in-process: a ServingRuntime on a temporary
SQLite store serves the rows and takes their true outcomes back (no HTTP)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd

from guarded_serving.config import load_config
from guarded_serving.runtime import ServingRuntime
from guarded_serving.store.sql import Store

from ._data import TARGET, features


def log_traffic(config_path: Path, rows: pd.DataFrame, batch: int = 100) -> None:
    """Serve ``rows`` (features and ``price``) in requests of ``batch`` rows, then send every
    row's outcome back, through the runtime's public methods only."""
    config = load_config(config_path)
    rt = ServingRuntime(config)
    try:
        items = []
        for start in range(0, len(rows), batch):
            chunk = rows.iloc[start : start + batch]
            rid = uuid.uuid4().hex
            rt.predict(features(chunk), request_id=rid)
            items += [(rid, i, float(v)) for i, v in enumerate(chunk[TARGET])]
        rt.feedback(items)
    finally:
        rt.close()


def logged_request_ids(config_path: Path) -> set[str]:
    """The request ids in the prediction log of the store ``config_path`` names."""
    config = load_config(config_path)
    store = Store(config.store.url, prefix=config.store.table_prefix)
    try:
        return set(store.joined(features=False)["request_id"])
    finally:
        store.close()
