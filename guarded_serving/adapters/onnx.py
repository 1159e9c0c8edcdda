"""ONNX models through onnxruntime."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

from ..errors import ModelLoadError
from .base import TASKS, Prediction, native_classes, one_hot, sorted_classes

log = logging.getLogger(__name__)

_NUMPY_OF = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}


class OnnxModel:
    """An ONNX graph run by onnxruntime.

    Columns map to the graph's inputs in one of two ways: one input per column (named like the
    column, as skl2onnx emits them; each cast to its input's type, 1-D or ``[N, 1]`` as the
    graph declares), or, when the graph has a single input named like no column, one stacked
    ``[N, n_features]`` tensor of the input's type, filled in ``columns`` order (the ``columns``
    argument, else a JSON list in the model's ``columns`` metadata, else the profile's feature
    order). Outputs: regression reads the first output as the values; classification reads the
    first as labels and the second, if any, as probabilities (a matrix, or skl2onnx's ZipMap list
    of dicts); classes come from the ``classes`` metadata, else the class labels declared in the
    graph, else the ZipMap keys, else the sorted labels seen. A graph with labels only gets probability 1.0 for its label.

    >>> m = OnnxModel("models/diamonds/primary.onnx")  # doctest: +SKIP
    >>> m.predict(df).labels  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, task: str | None = None, name: str | None = None,
                 version: str | None = None, columns: list[str] | None = None,
                 intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        # One thread per call: serving runs several workers, and small batches gain nothing.
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"cannot load ONNX model {self.path}: {e}") from e
        meta = self.session.get_modelmeta()
        props = dict(meta.custom_metadata_map or {})
        self.metadata = props
        self.name = name or props.get("name") or self.path.stem
        self.version = version or props.get("version") or str(meta.version)
        self.inputs = self.session.get_inputs()
        # (name, numpy dtype, wants a 2-D column) per input, read once: each property of an
        # onnxruntime NodeArg is a C++ call, and a call per input per request adds up.
        self._input_specs = [(i.name, _NUMPY_OF.get(i.type, np.float32), len(i.shape) == 2)
                             for i in self.inputs]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.columns = columns or (json.loads(props["columns"]) if "columns" in props else None)
        self.task = task or props.get("task") or self._guess_task()
        if self.task not in TASKS:
            raise ModelLoadError(f"{self.path}: task must be one of {TASKS}, got {self.task!r}")
        self.classes: list[Any] | None = (native_classes(json.loads(props["classes"])) if "classes" in props
                                          else _graph_classes(self.path) if self.task == "classification"
                                          else None)

    def _guess_task(self) -> str:
        return "classification" if len(self.outputs) >= 2 else "regression"

    def _feeds(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if len(self.inputs) == 1 and self.inputs[0].name not in columns:
            inp = self.inputs[0]
            cols = self.columns or list(columns)
            dtype = _NUMPY_OF.get(inp.type, np.float32)
            return {inp.name: np.column_stack([np.asarray(columns[c], dtype=dtype) for c in cols])}
        feeds = {}
        for name, dtype, two_d in self._input_specs:
            raw = columns.get(name)
            if raw is None:
                missing = sorted(n for n, _, _ in self._input_specs if n not in columns)
                raise ModelLoadError(f"{self.path.name}: the graph wants inputs {missing} the data lacks")
            if dtype is object:
                arr = np.asarray(raw, dtype=object)
                if len(arr) <= 64:  # pd.isna costs more than this loop on a few rows
                    null = np.fromiter((v is None or v != v for v in arr), bool, len(arr))
                elif infer_dtype(arr, skipna=False) == "string":  # text only: no null (a quarter of pd.isna's time)
                    null = None
                else:
                    null = pd.isna(arr)
                if null is not None and null.any():
                    arr = arr.copy()
                    arr[null] = ""
            else:
                arr = np.asarray(raw, dtype=dtype)
            feeds[name] = arr.reshape(-1, 1) if two_d else arr
        return feeds

    def predict(self, data: pd.DataFrame) -> Prediction:
        return self.predict_columns({str(c): data[c].to_numpy() for c in data.columns})

    def predict_columns(self, columns: Mapping[str, Any]) -> Prediction:
        """Predict from a mapping of column name -> 1-D array (skips building a DataFrame)."""
        outs = self.session.run(None, self._feeds(columns))
        if self.task == "regression":
            return Prediction(np.asarray(outs[0], dtype=np.float64).reshape(-1))
        labels = np.asarray(outs[0]).reshape(-1)
        probs = outs[1] if len(outs) > 1 else None
        classes = self.classes
        if isinstance(probs, list):  # ZipMap output: a list of {class: probability}
            if classes is None:
                classes = list(probs[0].keys()) if probs else []
            probs = np.array([[d[c] for c in classes] for d in probs], dtype=np.float64)
        elif probs is not None:
            probs = np.asarray(probs, dtype=np.float64)
            if classes is None:
                # skl2onnx orders probability columns like classes_, which is sorted.
                seen = sorted_classes(labels)
                classes = seen if len(seen) == probs.shape[1] else list(range(probs.shape[1]))
        else:  # a graph with labels only
            classes = classes or sorted_classes(labels)
            probs = one_hot(labels, classes)
        return Prediction(labels, probs, classes)


def _graph_classes(path: Path) -> list[Any] | None:
    """The class labels a classifier graph declares (skl2onnx writes them into its classifier and
    ZipMap nodes), so probability columns are named even when a batch shows only some labels."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx is optional: onnxruntime alone can run the graph
        log.debug("could not read class labels from %s: %s", path, e)
        return None
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_ints", "classlabels_int64s") and attr.ints:
                return [int(v) for v in attr.ints]
            if attr.name == "classlabels_strings" and attr.strings:
                return [v.decode() for v in attr.strings]
    return None
