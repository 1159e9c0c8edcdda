"""Any Python callable as a model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ModelLoadError
from .base import TASKS, Prediction, native_classes, one_hot, sorted_classes


class CallableModel:
    """Wrap ``fn(DataFrame) -> predictions``.

    ``fn`` receives a pandas DataFrame with one column per profile feature, in the profile's
    order, of the rows the guard sends it (checked values: numbers as float64, categories as
    text, missing values as NaN/None). What it may return:

    - regression: one number per row (a list, array, Series, or an ``[N, 1]`` array);
    - classification, labels only: one label per row (probability 1.0 for that label);
    - classification, probabilities only: an ``[N, n_classes]`` array (labels are the most
      probable class) or a DataFrame whose columns are the classes;
    - classification, both: a ``(labels, probabilities)`` pair;
    - a ``Prediction``.

    A classifier's classes (the probability columns' order) are, first, ``classes=`` given here;
    else a ``classes`` or ``classes_`` attribute of ``fn``; else a DataFrame's columns; for a
    probability matrix alone, ``0 .. n_classes-1``; for labels alone, the sorted labels; for a
    pair, the label of each column's most probable rows (a batch that does not show every class
    then fails, and its rows go to the fallback: declare the classes).

    >>> import pandas as pd
    >>> m = CallableModel(lambda df: df["x"] * 2, task="regression")
    >>> m.predict(pd.DataFrame({"x": [1.0, 2.0]})).labels.tolist()
    [2.0, 4.0]
    >>> c = CallableModel(lambda df: [[0.2, 0.8], [0.9, 0.1]], task="classification", classes=["no", "yes"])
    >>> c.predict(pd.DataFrame({"x": [1.0, 2.0]})).labels.tolist()
    ['yes', 'no']
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
        declared = classes if classes is not None else getattr(fn, "classes", getattr(fn, "classes_", None))
        self.classes: list[Any] | None = (native_classes(declared)
                                          if task == "classification" and declared is not None else None)

    @classmethod
    def from_import(cls, ref: str, **kw: Any) -> CallableModel:
        """``module:attribute``; importing a module runs its code, so this is for your own code.
        A class is instantiated with no arguments."""
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ModelLoadError(f"a callable is named as 'module:function', got {ref!r}")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot import {ref}: {e} (the module must be importable from the "
                                 "working directory or PYTHONPATH)") from e
        if isinstance(fn, type):
            fn = fn()
        return cls(fn, name=kw.pop("name", None) or attr, **kw)

    def predict(self, data: pd.DataFrame) -> Prediction:
        out = self.fn(data)
        if isinstance(out, Prediction):
            if self.task == "classification" and out.probabilities is None:
                classes = out.classes or self._classes_of(out.labels, None)
                return Prediction(out.labels, one_hot(out.labels, classes), classes)
            return out
        if self.task == "regression":
            values = np.asarray(out, dtype=np.float64)
            if values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            if values.ndim != 1:
                raise ValueError(f"a regression callable must return one number per row, got shape {values.shape}")
            return Prediction(values)
        return self._classification(out)

    def _classification(self, out: Any) -> Prediction:
        if isinstance(out, tuple) and len(out) == 2:
            labels = np.asarray(out[0]).reshape(-1)
            probs = np.asarray(out[1], dtype=np.float64)
            return Prediction(labels, probs, self.classes or _columns_by_label(labels, probs))
        if isinstance(out, pd.DataFrame):
            probs = out.to_numpy(dtype=np.float64)
            classes = self.classes or native_classes(out.columns)
            return Prediction(_argmax(probs, classes), probs, classes)
        arr = np.asarray(out)
        if arr.ndim == 2 and arr.shape[1] > 1:
            probs = arr.astype(np.float64)
            classes = self._classes_of(None, probs)
            return Prediction(_argmax(probs, classes), probs, classes)
        labels = arr.reshape(-1)
        classes = self._classes_of(labels, None)
        return Prediction(labels, one_hot(labels, classes), classes)

    def _classes_of(self, labels: np.ndarray | None, probs: np.ndarray | None) -> list[Any]:
        if self.classes is not None:
            return self.classes
        seen = sorted_classes(labels) if labels is not None else []
        if probs is None or len(seen) == probs.shape[1]:
            return seen
        return list(range(probs.shape[1]))


def _columns_by_label(labels: np.ndarray, probs: np.ndarray) -> list[Any]:
    """The class of each probability column, read off rows whose label is their most probable
    column; a ValueError (the call counts as failed) when a batch does not show every column,
    rather than probabilities silently put under the wrong classes."""
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise ValueError(f"probabilities of shape {probs.shape} for {labels.size} labels")
    by_column: dict[int, Any] = {}
    for label, j in zip(native_classes(labels), probs.argmax(axis=1).tolist(), strict=True):
        by_column.setdefault(j, label)
    if len(by_column) < probs.shape[1]:
        raise ValueError("a classifier callable that returns (labels, probabilities) must declare its "
                         "classes (a `classes` attribute) unless every batch shows every class")
    return [by_column[j] for j in range(probs.shape[1])]


def _argmax(probs: np.ndarray, classes: list[Any]) -> np.ndarray:
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(classes)} classes")
    return np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
