"""scikit-learn estimators (or anything with predict / predict_proba)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ModelLoadError
from .base import TASKS, Prediction, native_classes


class SklearnModel:
    """A fitted estimator, called with a DataFrame of the profile's feature columns: regressors
    through ``predict``; classifiers through ``predict`` (labels) and ``predict_proba``, whose
    columns follow ``classes_``.

    >>> from sklearn.linear_model import LinearRegression
    >>> import pandas as pd
    >>> X = pd.DataFrame({"x": [0.0, 1.0, 2.0]})
    >>> m = SklearnModel(LinearRegression().fit(X, [0.0, 2.0, 4.0]))
    >>> m.predict(pd.DataFrame({"x": [3.0]})).labels.round(6).tolist()
    [6.0]
    """

    def __init__(self, estimator: Any, task: str | None = None, name: str | None = None,
                 version: str = "0") -> None:
        self.estimator = estimator
        self.task = task or ("classification" if hasattr(estimator, "predict_proba") else "regression")
        if self.task not in TASKS:
            raise ModelLoadError(f"task must be one of {TASKS}, got {self.task!r}")
        self.name = name or type(estimator).__name__
        self.version = version
        own = getattr(estimator, "classes_", None)
        self.classes: list[Any] | None = (native_classes(own) if self.task == "classification"
                                          and own is not None else None)

    @classmethod
    def load(cls, path: str | Path, *, trusted: bool = False, **kw: Any) -> SklearnModel:
        """Load a pickle/joblib file. Unpickling runs code from the file: it needs trusted=True."""
        if not trusted:
            raise ModelLoadError(
                f"refusing to load {path}: pickle/joblib files execute code when loaded. Mark the "
                "model as trusted (config `trusted: true`, CLI --trusted) only if you made it or "
                "trust its source; or export it to ONNX"
            )
        import joblib

        try:
            est = joblib.load(path)
        except Exception as e:
            raise ModelLoadError(f"cannot load {path}: {e}") from e
        return cls(est, name=kw.pop("name", None) or Path(path).stem, **kw)

    def predict(self, data: pd.DataFrame) -> Prediction:
        labels = np.asarray(self.estimator.predict(data)).reshape(-1)
        if self.task == "regression":
            return Prediction(labels.astype(np.float64))
        probs = np.asarray(self.estimator.predict_proba(data), dtype=np.float64)
        return Prediction(labels, probs, self.classes or list(range(probs.shape[1])))
