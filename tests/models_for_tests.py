"""Misbehaving primary models, importable by `module:function` from serving configs in tests."""

from __future__ import annotations

import time

import pandas as pd


def raising_primary(data: pd.DataFrame):  # noqa: ANN201
    raise RuntimeError("primary model is down")


def slow_primary(data: pd.DataFrame):  # noqa: ANN201
    time.sleep(0.5)
    return data["carat"].to_numpy() * 0.0 + 1.0


_FALLBACK = None


def fragile_fallback(data: pd.DataFrame):  # noqa: ANN201
    """The example's fallback, except that it fails on stones over 3 carats."""
    global _FALLBACK
    if (data["carat"] > 3.0).any():
        raise RuntimeError("fallback cannot price stones over 3 carats")
    if _FALLBACK is None:
        from guarded_serving.adapters import load_model

        from ._data import EXAMPLE

        _FALLBACK = load_model(EXAMPLE / "fallback.onnx", task="regression")
    return _FALLBACK.predict(data).labels
