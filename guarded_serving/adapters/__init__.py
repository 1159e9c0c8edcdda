"""Model adapters: one module per model kind, behind the ``Model`` protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .base import Model, Prediction

__all__ = ["Model", "Prediction", "load_model"]

PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def load_model(path: str | Path | None = None, *, callable_ref: str | None = None,
               task: str | None = None, trusted: bool = False, **kw: Any) -> Model:
    """Load a model by file suffix (.onnx, .joblib/.pkl) or from ``module:function``."""
    if callable_ref:
        from .callable import CallableModel

        return CallableModel.from_import(callable_ref, task=task or "regression", **kw)
    if path is None:
        raise ModelLoadError("a model needs a path or a callable")
    p = Path(path)
    if p.is_dir():  # a BentoML model-store directory: take the one model file in it
        found = sorted(p.glob("*.onnx")) or [f for s in PICKLE_SUFFIXES for f in sorted(p.glob("*" + s))]
        if not found:
            raise ModelLoadError(f"no .onnx or pickle file in model directory {p}")
        p = found[0]
    if not p.exists():
        raise ModelLoadError(f"model file {p} does not exist")
    if p.suffix == ".onnx":
        from .onnx import OnnxModel

        return OnnxModel(p, task=task, **kw)
    if p.suffix in PICKLE_SUFFIXES:
        from .sklearn import SklearnModel

        return SklearnModel.load(p, trusted=trusted, task=task, **kw)
    raise ModelLoadError(f"unknown model file type {p.suffix!r} ({p}); expected .onnx, .joblib or .pkl")
