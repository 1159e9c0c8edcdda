"""Misbehaving primary models, importable by `module:function` from serving configs in tests."""

from __future__ import annotations

import time

import pandas as pd


def raising_primary(data: pd.DataFrame):  # noqa: ANN201
    raise RuntimeError("primary model is down")


def slow_primary(data: pd.DataFrame):  # noqa: ANN201
    time.sleep(0.5)
    return data["carat"].to_numpy() * 0.0 + 1.0
