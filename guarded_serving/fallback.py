"""The interpretable fallback: a linear model on robustly scaled, clipped features, as ONNX.

Numeric features are imputed with the training median, clipped to the training range widened by
``clip_margin`` of that range (so the model extrapolates gently instead of without bound), then
scaled by median and IQR; categorical features are one-hot encoded (unseen categories encode as all
zeros). A datetime feature is a numeric one in epoch seconds (its trend), plus its calendar parts
(month, weekday, hour: those that vary in training) one-hot encoded; the graph takes it as epoch
seconds, as the guard hands it over, and computes the parts itself. Ridge regression or logistic regression is fitted on that design. The ONNX graph is built
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
from .profile import epoch_seconds, infer_kind

MAX_CATEGORIES = 50
#: Calendar parts of a datetime feature, and the values each takes (pandas' numbering: Monday 0).
CALENDAR_PARTS = {"month": list(range(1, 13)), "weekday": list(range(7)), "hour": list(range(24))}


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
    datetime_: list[str] = field(default_factory=list, init=False)  # also among numeric_
    #: Per datetime feature: the calendar parts used, and the UTC offset (seconds) they are read in.
    calendar_: dict[str, list[str]] = field(default_factory=dict, init=False)
    utc_offset_: dict[str, float] = field(default_factory=dict, init=False)
    coef_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)  # (D, outputs)
    intercept_: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    classes_: list[Any] = field(default_factory=list, init=False)
    columns_: list[str] = field(default_factory=list, init=False)

    def fit(self, data: pd.DataFrame, target: str, exclude: tuple[str, ...] | list[str] = (),
            categorical: tuple[str, ...] | list[str] = ()) -> FallbackTrainer:
        """Fit on ``data``; ``categorical`` columns are one-hot encoded whatever their values look like."""
        if self.task not in ("regression", "classification"):
            raise ConfigError(f"task must be 'regression' or 'classification', got {self.task!r}")
        if target not in data.columns:
            raise ConfigError(f"target column {target!r} is not in the data")
        cols = [c for c in data.columns if c != target and c not in set(exclude)]
        self.columns_ = [str(c) for c in cols]
        kinds = {c: "categorical" if c in categorical else infer_kind(data[c]) for c in self.columns_}
        self.numeric_ = [c for c in self.columns_ if kinds[c] in ("numeric", "integer", "datetime")]
        self.datetime_ = [c for c in self.columns_ if kinds[c] == "datetime"]
        self.categorical_ = [c for c in self.columns_ if c not in self.numeric_]
        num = self._numbers(data)
        self.calendar_, self.utc_offset_ = {}, {}
        for c in self.datetime_:
            seconds = num[:, self.numeric_.index(c)]
            local = seconds
            tz = getattr(data[c].dtype, "tz", None)
            if tz is not None:
                local = epoch_seconds(data[c].dt.tz_localize(None), c)[0]  # wall-clock time
            # The graph can only add a fixed offset: the largest of training (summer time), so that
            # a time read an hour late in winter never falls on the previous day.
            offsets = local - seconds
            self.utc_offset_[c] = float(np.nanmax(offsets)) if np.isfinite(offsets).any() else 0.0
            parts = calendar_parts(local[~np.isnan(local)])
            self.calendar_[c] = [p for p in CALENDAR_PARTS if np.unique(parts[p]).size > 1]
        lo, hi = np.nanmin(num, axis=0), np.nanmax(num, axis=0)
        span = hi - lo
        self.lo_, self.hi_ = lo - self.clip_margin * span, hi + self.clip_margin * span
        self.median_ = np.nanmedian(num, axis=0)
        q75, q25 = np.nanpercentile(num, [75, 25], axis=0) if num.shape[1] else (num[0], num[0])
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

    def _numbers(self, data: pd.DataFrame) -> np.ndarray:
        """The numeric and datetime columns as floats (datetimes in epoch seconds)."""
        cols = []
        for c in self.numeric_:
            s = data[c]
            if pd.api.types.is_datetime64_any_dtype(s.dtype) or (c in self.datetime_ and s.dtype == object):
                cols.append(epoch_seconds(s, c)[0])
            else:
                cols.append(pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan))
        return np.column_stack(cols) if cols else np.zeros((len(data), 0))

    def _design(self, data: pd.DataFrame) -> np.ndarray:
        raw = self._numbers(data)
        imputed = np.where(np.isnan(raw), self.median_, raw)
        num = (np.clip(imputed, self.lo_, self.hi_) - self.median_) / self.scale_
        parts = [num]
        for c in self.datetime_:
            cal = calendar_parts(imputed[:, self.numeric_.index(c)] + self.utc_offset_[c])
            for p in self.calendar_[c]:
                parts.append((cal[p][:, None] == np.asarray(CALENDAR_PARTS[p])[None, :]).astype(float))
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
        names = (list(self.numeric_)
                 + [f"{c}.{p}={v}" for c in self.datetime_ for p in self.calendar_[c] for v in CALENDAR_PARTS[p]]
                 + [f"{c}={v}" for c in self.categorical_ for v in self.categories_[c]])
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

        # The numeric features as one matrix, each step once for all of them (per-column
        # constants as vectors): six nodes whatever the number of features, a third of the time
        # of a chain per feature on a few thousand rows.
        for c in self.numeric_:
            inputs.append(helper.make_tensor_value_info(c, TensorProto.DOUBLE, [None, 1]))
        if self.numeric_:
            med = const("numbers__median", np.asarray(self.median_, dtype=np.float64))
            lo = const("numbers__lo", np.asarray(self.lo_, dtype=np.float64))
            hi = const("numbers__hi", np.asarray(self.hi_, dtype=np.float64))
            sc = const("numbers__scale", np.asarray(self.scale_, dtype=np.float64))
            nodes += [
                helper.make_node("Concat", list(self.numeric_), ["numbers"], axis=1),
                helper.make_node("IsNaN", ["numbers"], ["numbers__isnan"]),
                helper.make_node("Where", ["numbers__isnan", med, "numbers"], ["numbers__imputed"]),
                helper.make_node("Max", ["numbers__imputed", lo], ["numbers__above_lo"]),
                helper.make_node("Min", ["numbers__above_lo", hi], ["numbers__clipped"]),
                helper.make_node("Sub", ["numbers__clipped", med], ["numbers__centered"]),
                helper.make_node("Div", ["numbers__centered", sc], ["numbers__scaled"]),
            ]
            parts.append("numbers__scaled")
        for c in self.datetime_:  # its calendar parts read its imputed epoch seconds
            j = const(f"{c}__column", np.array([self.numeric_.index(c)], dtype=np.int64))
            nodes.append(helper.make_node("Gather", ["numbers__imputed", j], [f"{c}__imputed"], axis=1))
            parts += _onnx_calendar(c, f"{c}__imputed", self.utc_offset_[c], self.calendar_[c], nodes, const)
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


def calendar_parts(seconds: np.ndarray) -> dict[str, np.ndarray]:
    """Month (1-12), weekday (Monday 0) and hour (0-23) of epoch seconds (NaN stays NaN), by the
    same arithmetic the ONNX graph does (days to civil date: H. Hinnant's algorithm)."""
    days = np.floor(seconds / 86400.0)
    z = days + 719468.0
    era = np.floor(z / 146097.0)
    doe = z - era * 146097.0
    yoe = np.floor((doe - np.floor(doe / 1460.0) + np.floor(doe / 36524.0) - np.floor(doe / 146096.0)) / 365.0)
    doy = doe - (365.0 * yoe + np.floor(yoe / 4.0) - np.floor(yoe / 100.0))
    mp = np.floor((5.0 * doy + 2.0) / 153.0)
    month = mp + 3.0 - 12.0 * (mp >= 10.0)
    weekday = _mod(days + 3.0, 7.0)  # 1970-01-01 was a Thursday
    hour = _mod(np.floor(seconds / 3600.0), 24.0)
    nan = np.isnan(seconds)
    return {"month": np.where(nan, np.nan, month), "weekday": weekday, "hour": hour}


def _mod(x: np.ndarray, m: float) -> np.ndarray:
    return x - np.floor(x / m) * m


def _onnx_calendar(c: str, seconds: str, offset: float, parts: list[str], nodes: list[Any],
                   const: Any) -> list[str]:
    """Nodes computing the one-hot calendar ``parts`` of the epoch-seconds tensor ``seconds``,
    as ``calendar_parts`` does; returns the names of the one-hot outputs."""
    from onnx import TensorProto, helper

    def k(name: str, value: float) -> str:
        return const(f"{c}__k_{name}", np.array(value, dtype=np.float64))

    def op(kind: str, a: str, b: str | None, out: str) -> str:
        nodes.append(helper.make_node(kind, [a] if b is None else [a, b], [f"{c}__{out}"]))
        return f"{c}__{out}"

    def floor_div(a: str, d: float, out: str) -> str:
        return op("Floor", op("Div", a, k(f"{out}_d", d), f"{out}_q"), None, out)

    def mod(a: str, m: float, out: str) -> str:
        return op("Sub", a, op("Mul", floor_div(a, m, f"{out}_f"), k(f"{out}_m", m), f"{out}_p"), out)

    local = op("Add", seconds, k("offset", offset), "local")
    days = floor_div(local, 86400.0, "days")
    values = {}
    if "month" in parts:
        z = op("Add", days, k("z", 719468.0), "z")
        era = floor_div(z, 146097.0, "era")
        doe = op("Sub", z, op("Mul", era, k("era_n", 146097.0), "era_days"), "doe")
        num = op("Add", op("Sub", doe, floor_div(doe, 1460.0, "d1460"), "y1"),
                 floor_div(doe, 36524.0, "d36524"), "y2")
        num = op("Sub", num, floor_div(doe, 146096.0, "d146096"), "y3")
        yoe = floor_div(num, 365.0, "yoe")
        leap = op("Sub", floor_div(yoe, 4.0, "yoe4"), floor_div(yoe, 100.0, "yoe100"), "leap")
        doy = op("Sub", doe, op("Add", op("Mul", yoe, k("y365", 365.0), "yd"), leap, "ydays"), "doy")
        mp = floor_div(op("Add", op("Mul", doy, k("five", 5.0), "doy5"), k("two", 2.0), "doy52"), 153.0, "mp")
        late = op("GreaterOrEqual", mp, k("ten", 10.0), "late")
        nodes.append(helper.make_node("Cast", [late], [f"{c}__late_f"], to=TensorProto.DOUBLE))
        shift = op("Mul", f"{c}__late_f", k("twelve", 12.0), "shift")
        values["month"] = op("Sub", op("Add", mp, k("three", 3.0), "mp3"), shift, "month")
    if "weekday" in parts:
        values["weekday"] = mod(op("Add", days, k("thu", 3.0), "days3"), 7.0, "weekday")
    if "hour" in parts:
        values["hour"] = mod(floor_div(local, 3600.0, "hours"), 24.0, "hour")
    outs = []
    for p in parts:
        levels = const(f"{c}__{p}_levels", np.asarray(CALENDAR_PARTS[p], dtype=np.float64))
        eq = op("Equal", values[p], levels, f"{p}_eq")
        nodes.append(helper.make_node("Cast", [eq], [f"{c}__{p}_onehot"], to=TensorProto.DOUBLE))
        outs.append(f"{c}__{p}_onehot")
    return outs
