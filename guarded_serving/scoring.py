"""Performance metrics on true outcomes, in numpy: MAE/RMSE for regression; accuracy, macro F1
and ROC AUC for classification. Used for the baseline in the profile and for live performance.

>>> score("regression", [1.0, 2.0], [1.5, 2.0])["mae"]
0.25
"""

from __future__ import annotations

from typing import Any

import numpy as np


def score(task: str, y_true: Any, y_pred: Any, prediction: Any = None) -> dict[str, float]:
    """Metrics of ``y_pred`` against ``y_true``; ``prediction`` (an adapters Prediction) supplies
    class probabilities for ROC AUC. Always includes ``n``."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    n = int(len(y_true))
    if n == 0:
        return {"n": 0.0}
    if task == "regression":
        err = y_pred.astype(float) - y_true.astype(float)
        return {
            "n": float(n),
            "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err**2))),
        }
    out = {"n": float(n), "accuracy": float(np.mean(_same(y_true, y_pred))), "f1": macro_f1(y_true, y_pred)}
    probs = getattr(prediction, "probabilities", None)
    classes = getattr(prediction, "classes", None)
    if probs is not None and classes is not None:
        auc = roc_auc(y_true, np.asarray(probs), list(classes))
        if auc is not None:
            out["roc_auc"] = auc
    return out


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray([str(x) for x in a]) == np.asarray([str(x) for x in b])


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in y_true or y_pred (labels compared as text)."""
    t = np.asarray([str(x) for x in y_true])
    p = np.asarray([str(x) for x in y_pred])
    labels = np.union1d(t, p)
    f1s = []
    for c in labels:
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        denom = 2 * tp + fp + fn
        f1s.append(0.0 if denom == 0 else 2 * tp / denom)
    if len(labels) == 2:
        # Binary: report F1 of the positive (second-sorted) class, as scikit-learn does by default.
        return float(f1s[1])
    return float(np.mean(f1s))


def roc_auc(y_true: np.ndarray, probabilities: np.ndarray, classes: list[Any]) -> float | None:
    """Binary AUC of the last class, or one-vs-rest macro AUC; None when a class is missing."""
    t = np.asarray([str(x) for x in y_true])
    names = [str(c) for c in classes]
    cols = range(1, 2) if len(names) == 2 else range(len(names))
    aucs = []
    for j in cols:
        pos = t == names[j]
        if pos.all() or not pos.any():
            return None
        aucs.append(_binary_auc(pos, probabilities[:, j]))
    return float(np.mean(aucs))


def _binary_auc(pos: np.ndarray, s: np.ndarray) -> float:
    # Mann-Whitney U with average ranks for ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = pos.sum()
    n_neg = len(pos) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
