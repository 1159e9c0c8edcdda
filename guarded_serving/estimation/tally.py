"""Mergeable sums from which a window's expected metrics and their bands are computed.

A tally is updated one batch at a time and merged across batches, workers and replicas, like
the drift window state; ``metrics`` turns it into estimates. Regression tallies hold the error
model's per-row expectations (direct loss estimation); classification tallies hold the calibrated
probabilities' expected confusion counts and, per class, expected positives per score bin
(confidence-based performance estimation).

Bands are the 2.5% and 97.5% points of the realized metric if the calibrated probabilities (or
the error model) are right: the sampling spread of a finite window, not the error of the model
behind the estimate. Regression uses normal approximations (the variance of |e| is
E[e²] - E[|e|]², that of e² is 2 E[e²]² as for normal errors); accuracy the variance of a sum of
Bernoullis; F1 the delta method over the expected confusion counts; ROC AUC Hanley and McNeil's
standard error at the expected class counts.

>>> t = RegressionTally()
>>> t.update(np.array([1.0, 3.0]), np.array([2.0, 10.0]))
>>> values, bands = t.metrics()
>>> values["mae"], round(values["rmse"], 4)
(2.0, 2.4495)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Score bins per class of the classification tally (ROC AUC is computed over them).
SCORE_BINS = 1000
Z = 1.959963984540054


@dataclass
class RegressionTally:
    """Sums of expected absolute and squared errors and of their variances."""

    n: int = 0
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    abs_var: float = 0.0
    sq_var: float = 0.0

    def update(self, abs_error: np.ndarray, sq_error: np.ndarray) -> None:
        """Add rows' expected |error| and error² (from the error models)."""
        a = np.maximum(np.asarray(abs_error, dtype=float), 0.0)
        s = np.maximum(np.asarray(sq_error, dtype=float), a**2)
        self.n += int(a.size)
        self.abs_sum += float(a.sum())
        self.sq_sum += float(s.sum())
        self.abs_var += float((s - a**2).sum())
        self.sq_var += float((2.0 * s**2).sum())

    def merge(self, other: RegressionTally) -> RegressionTally:
        return RegressionTally(
            self.n + other.n,
            self.abs_sum + other.abs_sum,
            self.sq_sum + other.sq_sum,
            self.abs_var + other.abs_var,
            self.sq_var + other.sq_var,
        )

    def metrics(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        if self.n == 0:
            return {"n": 0.0}, {}
        n = self.n
        mae, mse = self.abs_sum / n, self.sq_sum / n
        rmse = math.sqrt(mse)
        sd_mae = math.sqrt(self.abs_var) / n
        sd_mse = math.sqrt(self.sq_var) / n
        lo_mse, hi_mse = max(mse - Z * sd_mse, 0.0), mse + Z * sd_mse
        return (
            {"n": float(n), "mae": mae, "rmse": rmse},
            {
                "mae": [max(mae - Z * sd_mae, 0.0), mae + Z * sd_mae],
                "rmse": [math.sqrt(lo_mse), math.sqrt(hi_mse)],
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "abs_sum": self.abs_sum,
            "sq_sum": self.sq_sum,
            "abs_var": self.abs_var,
            "sq_var": self.sq_var,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegressionTally:
        return cls(
            int(d["n"]),
            float(d["abs_sum"]),
            float(d["sq_sum"]),
            float(d["abs_var"]),
            float(d["sq_var"]),
        )


@dataclass
class ClassificationTally:
    """Expected confusion counts from calibrated probabilities, per class.

    ``tp``/``fn`` (and their variances) are expected true positives / false negatives of each
    class; ``predicted`` counts rows predicted as each class. ``pos``/``pos_var``/``count`` are
    per class x score bin: expected positives, their variance and rows, for ROC AUC.
    """

    k: int
    n: int
    correct: float
    correct_var: float
    predicted: np.ndarray
    tp: np.ndarray
    tp_var: np.ndarray
    fn: np.ndarray
    fn_var: np.ndarray
    pos: np.ndarray
    pos_var: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls, k: int) -> ClassificationTally:
        """A tally of no rows over ``k`` classes."""
        per_class = [np.zeros(k) for _ in range(5)]
        per_bin = [np.zeros((k, SCORE_BINS)) for _ in range(3)]
        return cls(k, 0, 0.0, 0.0, *per_class, *per_bin)

    def update(self, calibrated: np.ndarray, predicted: np.ndarray, scores: np.ndarray) -> None:
        """Add rows: calibrated probabilities (rows x k), the predicted class index per row and
        the model's own scores (rows x k; they rank rows for ROC AUC)."""
        p = np.asarray(calibrated, dtype=float)
        m = p.shape[0]
        if m == 0:
            return
        pred = np.asarray(predicted, dtype=int)
        onehot = np.zeros_like(p)
        onehot[np.arange(m), pred] = 1.0
        pc = p[np.arange(m), pred]
        bern = p * (1.0 - p)
        self.n += m
        self.correct += float(pc.sum())
        self.correct_var += float((pc * (1 - pc)).sum())
        self.predicted += onehot.sum(axis=0)
        self.tp += (p * onehot).sum(axis=0)
        self.tp_var += (bern * onehot).sum(axis=0)
        self.fn += (p * (1 - onehot)).sum(axis=0)
        self.fn_var += (bern * (1 - onehot)).sum(axis=0)
        b = np.minimum(
            (np.clip(np.asarray(scores, dtype=float), 0, 1) * SCORE_BINS).astype(int),
            SCORE_BINS - 1,
        )
        for j in range(self.k):
            self.pos[j] += np.bincount(b[:, j], weights=p[:, j], minlength=SCORE_BINS)
            self.pos_var[j] += np.bincount(b[:, j], weights=bern[:, j], minlength=SCORE_BINS)
            self.count[j] += np.bincount(b[:, j], minlength=SCORE_BINS)

    def merge(self, other: ClassificationTally) -> ClassificationTally:
        return ClassificationTally(
            self.k,
            self.n + other.n,
            self.correct + other.correct,
            self.correct_var + other.correct_var,
            *(
                getattr(self, a) + getattr(other, a)
                for a in ("predicted", "tp", "tp_var", "fn", "fn_var", "pos", "pos_var", "count")
            ),
        )

    def metrics(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        if self.n == 0:
            return {"n": 0.0}, {}
        n = self.n
        acc = self.correct / n
        sd = math.sqrt(self.correct_var) / n
        values = {
            "n": float(n),
            "accuracy": acc,
            "f1": float(_f1_and_sd(self.tp, self.tp_var, self.fn, self.fn_var, self.predicted)[0]),
        }
        bands = {"accuracy": [max(acc - Z * sd, 0.0), min(acc + Z * sd, 1.0)]}
        f1, f1_sd = _f1_and_sd(self.tp, self.tp_var, self.fn, self.fn_var, self.predicted)
        bands["f1"] = [max(f1 - Z * f1_sd, 0.0), min(f1 + Z * f1_sd, 1.0)]
        auc = _auc(self.pos[None], self.count[None], self.pos_var[None], self.k)
        if auc is not None and np.isfinite(auc[0]):
            values["roc_auc"] = a = float(auc[0])
            # Hanley & McNeil's standard error, at the expected numbers of positives and negatives
            # (of the second class when binary, else averaged over the classes).
            cols = [1] if self.k == 2 else list(range(self.k))
            n_pos = float(np.mean([self.pos[j].sum() for j in cols]))
            n_neg = n - n_pos
            q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
            var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / max(
                n_pos * n_neg, 1.0
            )
            sd_auc = math.sqrt(max(var, 0.0))
            bands["roc_auc"] = [max(a - Z * sd_auc, 0.0), min(a + Z * sd_auc, 1.0)]
        return values, bands

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "k": self.k,
            "n": self.n,
            "correct": self.correct,
            "correct_var": self.correct_var,
        }
        for a in ("predicted", "tp", "tp_var", "fn", "fn_var"):
            d[a] = getattr(self, a).tolist()
        for a in ("pos", "pos_var", "count"):  # sparse: most score bins are empty
            arr = getattr(self, a)
            nz = np.nonzero(arr)
            d[a] = [nz[0].tolist(), nz[1].tolist(), arr[nz].tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassificationTally:
        k = int(d["k"])
        dense = {}
        for a in ("pos", "pos_var", "count"):
            arr = np.zeros((k, SCORE_BINS))
            rows, cols, vals = d[a]
            arr[np.asarray(rows, dtype=int), np.asarray(cols, dtype=int)] = vals
            dense[a] = arr
        return cls(
            k,
            int(d["n"]),
            float(d["correct"]),
            float(d["correct_var"]),
            *(np.asarray(d[a], dtype=float) for a in ("predicted", "tp", "tp_var", "fn", "fn_var")),
            **dense,
        )


def _f1_and_sd(
    tp: np.ndarray, tp_var: np.ndarray, fn: np.ndarray, fn_var: np.ndarray, predicted: np.ndarray
) -> tuple[float, float]:
    """F1 as scoring.macro_f1 defines it (the second class's when binary, else the macro mean
    over classes predicted or expected to occur) and its standard error by the delta method.

    Per class F1 = 2 TP / (predicted + TP + FN), with the predicted count fixed and TP, FN sums
    of independent Bernoullis."""
    denom = predicted + tp + fn
    safe = np.where(denom > 0, denom, 1.0)
    f1 = np.where(denom > 0, 2 * tp / safe, 0.0)
    var = (2 * (predicted + fn) / safe**2) ** 2 * tp_var + (2 * tp / safe**2) ** 2 * fn_var
    if len(tp) == 2:
        return float(f1[1]), float(np.sqrt(var[1]))
    present = denom > 0
    k = max(int(present.sum()), 1)
    return float(f1[present].sum() / k), float(np.sqrt(var[present].sum()) / k)


def _auc(pos: np.ndarray, count: np.ndarray, pos_var: np.ndarray, k: int) -> np.ndarray | None:
    """ROC AUC (binary: of the second class; else one-vs-rest macro) from expected positives per
    score bin; leading axis: one per tally. Pairs within a bin count half, as average ranks do;
    a row's pairing with itself (its expected share is its p(1-p), ``pos_var``) is taken out."""
    cols = [1] if k == 2 else list(range(k))
    neg = count - pos
    out = []
    for j in cols:
        p, q = pos[:, j], neg[:, j]
        below = np.cumsum(q, axis=-1) - q  # negatives in lower bins
        n_pos, n_neg = p.sum(axis=-1), q.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ties = np.maximum(p * q - pos_var[:, j], 0.0).sum(axis=-1)
            out.append(((p * below).sum(axis=-1) + 0.5 * ties) / (n_pos * n_neg))
    return np.mean(out, axis=0) if out else None
