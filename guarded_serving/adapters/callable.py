"""Any Python callable as a model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ModelLoadError
from .base import TASKS, Prediction


class CallableModel:
    """Wrap ``fn(DataFrame) -> predictions``.

    ``fn`` may return an array of values/labels, a (labels, probabilities) pair, or a Prediction.

    >>> import pandas as pd
    >>> m = CallableModel(lambda df: df["x"] * 2, task="regression")
    >>> m.predict(pd.DataFrame({"x": [1.0, 2.0]})).labels.tolist()
    [2.0, 4.0]
    """

    def __init__(self, fn: Callable[[pd.DataFrame], Any], task: str = "regression",
                 name: str | None = None, version: str = "0",
                 classes: list[Any] | None = None) -> None:
        if task not in TASKS:
            raise ModelLoadError(f"task must be one of {TASKS}, got {task!r}")
        self.fn = fn
        self.task = task
        self.name: str = name or str(getattr(fn, "__name__", "callable"))
        self.version = version
        self.classes = classes

    @classmethod
    def from_import(cls, ref: str, **kw: Any) -> CallableModel:
        """``module:attribute``; importing a module runs its code, so this is for your own code."""
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ModelLoadError(f"a callable is named as 'module:function', got {ref!r}")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot import {ref}: {e}") from e
        if isinstance(fn, type):
            fn = fn()
        return cls(fn, name=kw.pop("name", None) or attr, **kw)

    def predict(self, data: pd.DataFrame) -> Prediction:
        out = self.fn(data)
        if isinstance(out, Prediction):
            return out
        if isinstance(out, tuple) and len(out) == 2:
            labels, probs = out
            return Prediction(np.asarray(labels).reshape(-1), np.asarray(probs, dtype=np.float64), self.classes)
        labels = np.asarray(out).reshape(-1)
        return Prediction(labels.astype(np.float64) if self.task == "regression" else labels)
