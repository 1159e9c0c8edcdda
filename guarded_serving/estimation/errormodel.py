"""Direct loss estimation: small models of a regressor's |error| and error², run by onnxruntime.

Each error model reads one float matrix: the profile's features (numbers as they are, datetimes
as epoch seconds, categories as their index among training's, -1 for unseen; missing values as
the training median) followed by the monitored model's prediction. ``FeatureEncoder`` builds that
matrix with numpy; fitting (gradient boosting) and the ONNX export need scikit-learn and skl2onnx,
serving needs onnxruntime only.

>>> import pandas as pd
>>> from guarded_serving.profile import build_profile
>>> df = pd.DataFrame({"x": [1.0, 2.0, None, 4.0], "c": ["a", "b", "a", "z"], "y": [0.0, 1, 2, 3]})
>>> enc = FeatureEncoder.from_profile(build_profile(df, target="y"))
>>> enc.matrix(df).tolist()
[[1.0, 0.0], [2.0, 1.0], [2.0, 0.0], [4.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import ModelLoadError
from ..profile import is_missing

if TYPE_CHECKING:
    from ..profile import Profile

#: Gradient boosting settings of the error models: shallow trees, as the targets are noisy. 20
#: trees at a rate of 0.3 estimate the example's windows as well as 40 at 0.2 and 150 at 0.05
#: did (every metric of bench/bench_estimation.py within 3% of 40 trees: MAE a little closer,
#: RMSE a little further, all still closer than NannyML's DLE) at half the cost per served row
#: of 40 (110 instead of 215 us per 1,000 rows and model): every row is scored by four of these
#: in the recorder, a tenth of its CPU (README, Sampling).
GBR_PARAMS: dict[str, Any] = {
    "n_estimators": 20,
    "max_depth": 3,
    "learning_rate": 0.3,
    "subsample": 0.8,
    "min_samples_leaf": 20,
    "random_state": 0,
}
LOSSES = ("abs", "sq")
#: Below this many rows a category column is looked up row by row (pandas' fixed cost is more).
_SMALL = 64


@dataclass(frozen=True)
class EncodedColumn:
    name: str
    kind: str
    fill: float
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureEncoder:
    """Turns a batch (DataFrame or column mapping) into the error models' float matrix."""

    columns: tuple[EncodedColumn, ...]

    @classmethod
    def from_profile(cls, profile: Profile) -> FeatureEncoder:
        cols = []
        for f in profile.features:
            if f.is_numeric:
                median = f.quantiles.get("0.5", f.mean)
                cols.append(
                    EncodedColumn(f.name, f.kind, float(median if median is not None else 0.0))
                )
            else:
                cols.append(EncodedColumn(f.name, f.kind, -1.0, tuple(sorted(f.categories))))
        return cls(tuple(cols))

    def matrix(self, data: pd.DataFrame | Mapping[str, Any]) -> np.ndarray:
        out = np.empty((_length(data), len(self.columns)), dtype=np.float64)
        for j, c in enumerate(self.columns):
            out[:, j] = self._column(c, data[c.name])
        return out

    def _column(self, c: EncodedColumn, raw: Any) -> np.ndarray:
        if c.categories:
            codes = self._codes(c)
            values = np.asarray(raw, dtype=object)
            if len(values) > _SMALL:
                # Checked batches: text only, a few distinct values. pandas' hash table finds
                # each row's value in C; only the distinct ones are looked up here (and a missing
                # value, code -1, takes the table's last entry: -1.0).
                try:
                    found, distinct = pd.factorize(values)
                except TypeError:  # an unhashable value: the row-by-row path below
                    distinct = None
                if distinct is not None and all(type(v) is str for v in distinct):
                    table = np.fromiter(chain(map(codes.get, distinct, repeat(-1.0)), [-1.0]), float, len(distinct) + 1)
                    return table[found]  # type: ignore[no-any-return]
            return np.fromiter((-1.0 if is_missing(v) else codes.get(_text(v), -1.0) for v in values),
                               float, len(values))
        if isinstance(raw, np.ndarray) and raw.dtype.kind == "f" and c.kind != "datetime":
            x = raw  # checked batches: float64 already, no pandas round trip
        else:
            series = pd.Series(raw)
            if c.kind == "datetime" and not pd.api.types.is_numeric_dtype(series):
                from ..profile import epoch_seconds

                x = epoch_seconds(series, c.name)[0]
            else:
                x = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
        return np.where(np.isfinite(x), x, c.fill)

    def _codes(self, c: EncodedColumn) -> dict[str, float]:
        """Category -> its index, built once per column (the encoder is frozen)."""
        cache: dict[str, dict[str, float]] = self.__dict__.setdefault("_code_cache", {})
        codes = cache.get(c.name)
        if codes is None:
            codes = cache[c.name] = {v: float(i) for i, v in enumerate(c.categories)}
        return codes

    def to_dict(self) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "kind": c.kind, "fill": c.fill, "categories": list(c.categories)}
            for c in self.columns
        ]

    @classmethod
    def from_dict(cls, d: list[dict[str, Any]]) -> FeatureEncoder:
        return cls(
            tuple(
                EncodedColumn(
                    str(c["name"]),
                    str(c["kind"]),
                    float(c["fill"]),
                    tuple(str(v) for v in c.get("categories") or ()),
                )
                for c in d
            )
        )


def _length(data: pd.DataFrame | Mapping[str, Any]) -> int:
    if isinstance(data, pd.DataFrame):
        return len(data)
    return len(next(iter(data.values()))) if data else 0


def _text(v: Any) -> str:
    # Categories are profiled as text; booleans as "True"/"False".
    return v if isinstance(v, str) else str(v)


class ErrorModel:
    """An ONNX graph from an encoded matrix plus a prediction column to one expected loss."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"cannot load error model {path}: {e}") from e
        self.input = self.session.get_inputs()[0].name

    def predict(self, matrix: np.ndarray, prediction: np.ndarray) -> np.ndarray:
        return self.predict_input(error_input(matrix, prediction))

    def predict_input(self, x: np.ndarray) -> np.ndarray:
        """The expected loss per row of ``x``, the float32 input ``error_input`` builds (one
        input serves both of a model's error models)."""
        out = np.asarray(self.session.run(None, {self.input: x})[0], dtype=float).reshape(-1)
        out[out < 0] = 0.0  # a loss is never negative; trees fitted on noisy losses can dip below
        return out


def error_input(matrix: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The error models' input: the encoded features, then the monitored model's prediction."""
    x = np.empty((matrix.shape[0], matrix.shape[1] + 1), dtype=np.float32)
    x[:, :-1] = matrix
    x[:, -1] = np.asarray(prediction, dtype=float)
    return x


def fit_error_model(matrix: np.ndarray, prediction: np.ndarray, loss: np.ndarray) -> Any:
    """A gradient boosting regressor of ``loss`` on the matrix and the prediction (scikit-learn)."""
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(**GBR_PARAMS).fit(error_input(matrix, prediction), loss)


def export_error_model(model: Any, n_inputs: int, path: str | Path) -> None:
    """Write a fitted error model as ONNX (one float input of ``n_inputs`` columns)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model,
        initial_types=[("x", FloatTensorType([None, n_inputs]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    Path(path).write_bytes(onx.SerializeToString())
