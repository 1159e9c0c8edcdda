"""The one small interface every model adapter implements, and the contract of its output.

Whatever the model kind, a prediction is one ``labels`` value per row; for classification also
``probabilities`` (one row per input row, one column per class, rows summing to 1) and
``classes``, the column order, as plain Python values (``int``, ``str`` or ``bool``, never numpy
scalars), so a class is the same JSON value on every route and in every log row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

TASKS = ("regression", "classification")


@dataclass
class Prediction:
    """What a model says about a batch of rows.

    ``labels`` holds one value per row: the regression value, or the class label. Classification
    adapters also fill ``probabilities`` (n_rows x n_classes) and ``classes`` (its column order).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    classes: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            self.classes = native_classes(self.classes)

    def __len__(self) -> int:
        return int(len(self.labels))

    def take(self, index: np.ndarray) -> Prediction:
        """The rows at ``index``."""
        return Prediction(
            self.labels[index],
            None if self.probabilities is None else self.probabilities[index],
            self.classes,
        )


def native_classes(classes: Any) -> list[Any]:
    """Class labels as plain Python values: numpy scalars (``np.int64(1)``) become ``1``.

    >>> native_classes(np.array([0, 1]))
    [0, 1]
    """
    return [c.item() if isinstance(c, np.generic) else c for c in list(classes)]


def sorted_classes(labels: Any) -> list[Any]:
    """The distinct labels in order: numbers by value, then text.

    >>> sorted_classes(np.array([10, 2, 10]))
    [2, 10]
    """
    distinct = set(native_classes(labels))
    return sorted(distinct, key=lambda c: (0, c, "") if isinstance(c, (int, float)) else (1, 0, str(c)))


def one_hot(labels: np.ndarray, classes: list[Any]) -> np.ndarray:
    """Probabilities of a model that only gives labels: 1.0 for its label's class.

    >>> one_hot(np.array(["b", "a"]), ["a", "b"]).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    index = {str(c): j for j, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)))
    for i, label in enumerate(labels.tolist()):
        j = index.get(str(label))
        if j is not None:
            out[i, j] = 1.0
    return out


@runtime_checkable
class Model(Protocol):
    """Predict a DataFrame whose columns are the profile's features; say what kind of output.

    ``classes`` is the classifier's class order when it is known before a call (None otherwise,
    and for regression)."""

    name: str
    version: str
    task: str
    classes: list[Any] | None

    def predict(self, data: pd.DataFrame) -> Prediction: ...
