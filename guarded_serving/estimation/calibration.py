"""Calibration maps for class probabilities, kept only where they lower the calibration error.

A map is a monotone piecewise-linear function per class column (isotonic regression's knots),
applied with ``np.interp``: fitting needs scikit-learn, applying needs numpy only. Whether to
apply it is decided by cross-fitting on the holdout: the out-of-fold calibrated probabilities
must have a lower expected calibration error (ECE) than the raw ones, and a lower Brier score
too, as binned ECE favours isotonic's step outputs even on probabilities calibrated already
(the Brier score, a proper score, does not).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> raw = rng.uniform(size=4000)
>>> y = (rng.uniform(size=4000) < raw**2).astype(int)   # the model is overconfident
>>> cal = fit_calibration(y, np.column_stack([1 - raw, raw]), [0, 1])
>>> cal.applied, cal.ece_calibrated < cal.ece_raw
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Folds of the cross-fitting that decides whether a map is applied.
FOLDS = 5
#: Equal-width bins of the expected calibration error.
ECE_BINS = 10


def expected_calibration_error(
    correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the row-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidence = np.clip(np.asarray(confidence, dtype=float), 0.0, 1.0)
    correct = np.asarray(correct, dtype=float)
    if confidence.size == 0:
        return 0.0
    b = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = np.bincount(b, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / confidence.size)


def brier(y_index: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared distance between the probability rows and the one-hot outcomes."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y_index)), y_index] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1))) if len(y_index) else 0.0


def class_ece(y_index: np.ndarray, probs: np.ndarray) -> float:
    """ECE of a probability matrix: of the positive class when binary, else of the top label."""
    if probs.shape[1] == 2:
        return expected_calibration_error(y_index == 1, probs[:, 1])
    top = probs.argmax(axis=1)
    return expected_calibration_error(top == y_index, probs[np.arange(len(top)), top])


@dataclass(frozen=True)
class Calibration:
    """Per class column ``(x, y)`` knots of a monotone map (binary: one map, of the positive
    class); ``applied`` says whether ``apply`` uses them or returns the probabilities as they are.
    The ECE and Brier figures are on the holdout: raw, and calibrated out of fold.
    """

    classes: list[Any]
    knots: list[tuple[list[float], list[float]]] = field(default_factory=list)
    applied: bool = False
    ece_raw: float = 0.0
    ece_calibrated: float = 0.0
    brier_raw: float = 0.0
    brier_calibrated: float = 0.0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (rows sum to one), or ``probs`` unchanged if not applied."""
        probs = np.asarray(probs, dtype=float)
        return _apply(self.knots, probs) if self.applied else probs

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "applied": self.applied,
            "ece_raw": self.ece_raw,
            "ece_calibrated": self.ece_calibrated,
            "brier_raw": self.brier_raw,
            "brier_calibrated": self.brier_calibrated,
            "knots": [{"x": x, "y": y} for x, y in self.knots],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            classes=list(d["classes"]),
            applied=bool(d["applied"]),
            ece_raw=float(d["ece_raw"]),
            ece_calibrated=float(d["ece_calibrated"]),
            brier_raw=float(d.get("brier_raw", 0.0)),
            brier_calibrated=float(d.get("brier_calibrated", 0.0)),
            knots=[([float(v) for v in k["x"]], [float(v) for v in k["y"]]) for k in d["knots"]],
        )


def _apply(knots: list[tuple[list[float], list[float]]], probs: np.ndarray) -> np.ndarray:
    if probs.shape[1] == 2:
        p = np.interp(probs[:, 1], *knots[0])
        return np.column_stack([1.0 - p, p])
    out = np.column_stack([np.interp(probs[:, j], *knots[j]) for j in range(probs.shape[1])])
    total = out.sum(axis=1, keepdims=True)
    # A row every map sends to zero keeps its raw probabilities.
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), probs)


def _fit_knots(y_index: np.ndarray, probs: np.ndarray) -> list[tuple[list[float], list[float]]]:
    from sklearn.isotonic import IsotonicRegression

    cols = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    knots = []
    for j in cols:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
            probs[:, j], y_index == j
        )
        knots.append(([float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]))
    return knots


def fit_calibration(
    y_true: Any, probs: np.ndarray, classes: list[Any], *, folds: int = FOLDS, seed: int = 0
) -> Calibration:
    """Fit isotonic maps on (holdout) outcomes and probabilities; apply them only if their
    cross-fitted ECE and Brier score are below the raw probabilities'. Needs scikit-learn."""
    probs = np.asarray(probs, dtype=float)
    classes = [c.item() if isinstance(c, np.generic) else c for c in classes]  # JSON-safe
    names = [str(c) for c in classes]
    lookup = {c: i for i, c in enumerate(names)}
    y_index = np.asarray([lookup.get(str(v), -1) for v in np.asarray(y_true)])
    keep = y_index >= 0
    y_index, probs = y_index[keep], probs[keep]
    ece_raw = class_ece(y_index, probs)
    if len(y_index) < 2 * folds or len(np.unique(y_index)) < 2:
        return Calibration(
            list(classes),
            applied=False,
            ece_raw=ece_raw,
            ece_calibrated=ece_raw,
            brier_raw=brier(y_index, probs),
            brier_calibrated=brier(y_index, probs),
        )
    fold = np.random.default_rng(seed).permutation(len(y_index)) % folds
    out_of_fold = np.empty_like(probs)
    for k in range(folds):
        test = fold == k
        out_of_fold[test] = _apply(_fit_knots(y_index[~test], probs[~test]), probs[test])
    ece_cal = class_ece(y_index, out_of_fold)
    brier_raw, brier_cal = brier(y_index, probs), brier(y_index, out_of_fold)
    return Calibration(
        list(classes),
        knots=_fit_knots(y_index, probs),
        applied=bool(ece_cal < ece_raw and brier_cal < brier_raw),
        ece_raw=ece_raw,
        ece_calibrated=ece_cal,
        brier_raw=brier_raw,
        brier_calibrated=brier_cal,
    )
