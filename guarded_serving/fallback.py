"""The interpretable fallback: a linear model on robustly scaled, clipped features, as ONNX.

Numeric features are imputed with the training median, clipped to the training range widened by
``clip_margin`` of that range (so the model extrapolates gently instead of without bound), then
scaled by median and IQR; categorical features are one-hot encoded (unseen categories encode as all
zeros). Ridge regression or logistic regression is fitted on that design. The ONNX graph is built
by hand so every step is visible in it, and the coefficients ride along in its metadata.

>>> import pandas as pd
>>> df = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "c": ["a", "b", "a", "b"], "y": [0.0, 1.0, 2.0, 3.0]})
>>> fb = FallbackTrainer(task="regression").fit(df, target="y")
>>> round(float(fb.predict_frame(pd.DataFrame({"x": [1.5], "c": ["a"]}))[0]), 1)
1.4
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError
from .profile import infer_kind

MAX_CATEGORIES = 50


@dataclass
class FallbackTrainer:
    """Settings in, learned state (attributes ending in ``_``) out, like a scikit-learn estimator."""

    task: str = "regression"
    alpha: float = 1.0  # ridge penalty (regression)
    C: float = 1.0  # inverse regularisation (classification)
    clip_margin: float = 0.5
    name: str = "fallback"
    version: str = "1"

    numeric_: list[str] = field(default_factory=list, init=False)
    categorical_: list[str] = field(default_factory=list, init=False)
    median_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    scale_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    lo_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    hi_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    categories_: dict[str, list[str]] = field(default_factory=dict, init=False)
    coef_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)  # (D, outputs)
    intercept_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    classes_: list[Any] = field(default_factory=list, init=False)
    columns_: list[str] = field(default_factory=list, init=False)

    def fit(self, data: pd.DataFrame, target: str, exclude: tuple[str, ...] | list[str] = ()) -> FallbackTrainer:
        if self.task not in ("regression", "classification"):
            raise ConfigError(f"task must be 'regression' or 'classification', got {self.task!r}")
        if target not in data.columns:
            raise ConfigError(f"target column {target!r} is not in the data")
        cols = [c for c in data.columns if c != target and c not in set(exclude)]
        self.columns_ = [str(c) for c in cols]
        self.numeric_ = [c for c in self.columns_ if infer_kind(data[c]) in ("numeric", "integer")]
        self.categorical_ = [c for c in self.columns_ if c not in self.numeric_]
        num = data[self.numeric_].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        lo, hi = np.nanmin(num, axis=0), np.nanmax(num, axis=0)
        span = hi - lo
        self.lo_, self.hi_ = lo - self.clip_margin * span, hi + self.clip_margin * span
        self.median_ = np.nanmedian(num, axis=0)
        q75, q25 = np.nanpercentile(num, [75, 25], axis=0)
        iqr = q75 - q25
        std = np.nanstd(num, axis=0)
        self.scale_ = np.where(iqr > 0, iqr, np.where(std > 0, std, 1.0))
        self.categories_ = {}
        for c in self.categorical_:
            s = data[c].dropna()
            if pd.api.types.is_bool_dtype(s.dtype):
                s = s.astype(bool)
            top = s.astype(str).value_counts().index[:MAX_CATEGORIES]
            self.categories_[c] = [str(v) for v in top]
        X = self._design(data)
        y = data[target].to_numpy()
        if self.task == "regression":
            from sklearn.linear_model import Ridge

            m = Ridge(alpha=self.alpha).fit(X, y.astype(float))
            self.coef_ = np.asarray(m.coef_, dtype=float).reshape(-1, 1)
            self.intercept_ = np.atleast_1d(np.asarray(m.intercept_, dtype=float))
        else:
            from sklearn.linear_model import LogisticRegression

            m = LogisticRegression(C=self.C, max_iter=2000).fit(X, y)
            self.classes_ = [c.item() if hasattr(c, "item") else c for c in m.classes_]
            coef, icpt = np.asarray(m.coef_, dtype=float), np.asarray(m.intercept_, dtype=float)
            if len(self.classes_) == 2:  # one logit: softmax([0, z]) is the sigmoid
                coef = np.vstack([np.zeros_like(coef), coef])
                icpt = np.concatenate([[0.0], icpt])
            self.coef_, self.intercept_ = coef.T, icpt
        return self

    def _design(self, data: pd.DataFrame) -> np.ndarray:
        num = data[self.numeric_].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        num = np.where(np.isnan(num), self.median_, num)
        num = (np.clip(num, self.lo_, self.hi_) - self.median_) / self.scale_
        parts = [num]
        for c in self.categorical_:
            s = data[c]
            if pd.api.types.is_bool_dtype(s.dtype):
                s = s.astype(bool)
            vals = s.astype(str).to_numpy()
            parts.append((vals[:, None] == np.asarray(self.categories_[c])[None, :]).astype(float))
        return np.hstack(parts)

    def predict_frame(self, data: pd.DataFrame) -> np.ndarray:
        """Predictions in numpy (the ONNX graph computes the same)."""
        z = self._design(data) @ self.coef_ + self.intercept_
        if self.task == "regression":
            return z[:, 0]
        return np.asarray(self.classes_, dtype=object)[np.argmax(z, axis=1)]

    def coefficients(self) -> dict[str, float]:
        """Coefficient per design column (numeric: per IQR of the feature; category: its offset)."""
        names = list(self.numeric_) + [f"{c}={v}" for c in self.categorical_ for v in self.categories_[c]]
        col = self.coef_[:, -1]
        return {n: float(w) for n, w in zip(names, col, strict=True)}

    # -- export --------------------------------------------------------------------------------

    def to_onnx(self) -> Any:
        """The fitted model as an ``onnx.ModelProto`` with one input per feature column."""
        from onnx import TensorProto, helper, numpy_helper

        nodes, inits, inputs, parts = [], [], [], []

        def const(name: str, arr: np.ndarray) -> str:
            inits.append(numpy_helper.from_array(arr, name))
            return name

        for j, c in enumerate(self.numeric_):
            inputs.append(helper.make_tensor_value_info(c, TensorProto.DOUBLE, [None, 1]))
            med = const(f"{c}__median", np.array([self.median_[j]], dtype=np.float64))
            lo = const(f"{c}__lo", np.array(self.lo_[j], dtype=np.float64))
            hi = const(f"{c}__hi", np.array(self.hi_[j], dtype=np.float64))
            sc = const(f"{c}__scale", np.array([self.scale_[j]], dtype=np.float64))
            nodes += [
                helper.make_node("IsNaN", [c], [f"{c}__isnan"]),
                helper.make_node("Where", [f"{c}__isnan", med, c], [f"{c}__imputed"]),
                helper.make_node("Clip", [f"{c}__imputed", lo, hi], [f"{c}__clipped"]),
                helper.make_node("Sub", [f"{c}__clipped", med], [f"{c}__centered"]),
                helper.make_node("Div", [f"{c}__centered", sc], [f"{c}__scaled"]),
            ]
            parts.append(f"{c}__scaled")
        for c in self.categorical_:
            inputs.append(helper.make_tensor_value_info(c, TensorProto.STRING, [None, 1]))
            nodes += [
                helper.make_node("OneHotEncoder", [c], [f"{c}__onehot3"], domain="ai.onnx.ml",
                                 cats_strings=self.categories_[c], zeros=1),
                helper.make_node("Flatten", [f"{c}__onehot3"], [f"{c}__onehot_f"], axis=1),
                helper.make_node("Cast", [f"{c}__onehot_f"], [f"{c}__onehot"], to=TensorProto.DOUBLE),
            ]
            parts.append(f"{c}__onehot")
        nodes.append(helper.make_node("Concat", parts, ["design"], axis=1))
        w = const("coef", self.coef_.astype(np.float64))
        b = const("intercept", self.intercept_.astype(np.float64))
        nodes += [
            helper.make_node("MatMul", ["design", w], ["xw"]),
            helper.make_node("Add", ["xw", b], ["logits"]),
        ]
        if self.task == "regression":
            outputs = [helper.make_tensor_value_info("logits", TensorProto.DOUBLE, [None, 1])]
        else:
            is_num = all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in self.classes_)
            cls = np.asarray(self.classes_, dtype=np.int64 if is_num else object)
            if not is_num:
                cls = cls.astype(str).astype(object)
            const("classes", cls)
            nodes += [
                helper.make_node("ArgMax", ["logits"], ["argmax"], axis=1, keepdims=0),
                helper.make_node("Gather", ["classes", "argmax"], ["label"], axis=0),
                helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            ]
            label_type = TensorProto.INT64 if is_num else TensorProto.STRING
            outputs = [
                helper.make_tensor_value_info("label", label_type, [None]),
                helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, [None, len(self.classes_)]),
            ]
        graph = helper.make_graph(nodes, self.name, inputs, outputs, inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
            producer_name="guarded-serving",
        )
        model.ir_version = 9
        meta = {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "columns": json.dumps(self.columns_),
            "coefficients": json.dumps(self.coefficients()),
            "clip": json.dumps({c: [float(self.lo_[j]), float(self.hi_[j])] for j, c in enumerate(self.numeric_)}),
        }
        if self.task == "classification":
            meta["classes"] = json.dumps(self.classes_)
        helper.set_model_props(model, meta)
        return model

    def save_onnx(self, path: str | Path) -> None:
        import onnx

        model = self.to_onnx()
        onnx.checker.check_model(model)
        Path(path).write_bytes(model.SerializeToString())
