"""The one small interface every model adapter implements."""

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

    def __len__(self) -> int:
        return int(len(self.labels))

    def take(self, index: np.ndarray) -> Prediction:
        """The rows at ``index``."""
        return Prediction(
            self.labels[index],
            None if self.probabilities is None else self.probabilities[index],
            self.classes,
        )


@runtime_checkable
class Model(Protocol):
    """Predict a DataFrame whose columns are the profile's features; say what kind of output."""

    name: str
    version: str
    task: str

    def predict(self, data: pd.DataFrame) -> Prediction: ...
