"""Estimated performance of a window of unlabeled rows, per model role and for the flagged rows.

``WindowEstimator.tally`` turns one served batch (its features, each role's predictions, the
route each row took, which rows the checks flagged) into a ``WindowTally``: sums that merge
across batches, workers and replicas. ``WindowTally.metrics`` gives the estimates with the
metric names ``/performance`` uses ("mae"/"rmse"; "accuracy"/"f1"/"roc_auc") and their bands.

>>> est = WindowEstimator.load("models/diamonds/profile.json")
>>> import pandas as pd
>>> from guarded_serving.adapters import load_model
>>> rows = pd.read_parquet("models/diamonds/data/holdout.parquet").head(500)
>>> preds = {r: load_model(f"models/diamonds/{r}.onnx").predict(rows) for r in ("primary", "fallback")}
>>> out = est.estimate(rows, preds)
>>> out["n"], sorted(out["primary"]), sorted(out["bands"]["primary"])
(500, ['mae', 'n', 'rmse'], ['mae', 'rmse'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .artefact import Estimation, estimation_dir
from .errormodel import ErrorModel, error_input
from .tally import ClassificationTally, RegressionTally

if TYPE_CHECKING:
    from ..adapters.base import Prediction
    from ..profile import Profile

ROLES = ("primary", "fallback", "guarded")
SCOPES = ("all", "flagged")
Tally = RegressionTally | ClassificationTally


@dataclass
class WindowTally:
    """Per scope ("all" rows, "flagged" rows) and role, the estimation sums of a window."""

    task: str
    tallies: dict[str, dict[str, Tally]] = field(default_factory=dict)

    def merge(self, other: WindowTally) -> WindowTally:
        out: dict[str, dict[str, Tally]] = {}
        for scope in {*self.tallies, *other.tallies}:
            a, b = self.tallies.get(scope, {}), other.tallies.get(scope, {})
            out[scope] = {
                r: (a[r].merge(b[r]) if r in a and r in b else a.get(r) or b[r])  # type: ignore[arg-type]
                for r in {*a, *b}
            }
        return WindowTally(self.task, out)

    def metrics(self) -> dict[str, Any]:
        """``{"n", "primary", "fallback", "guarded", "bands", "flagged": {same}}``."""
        out = self._scope("all")
        out["flagged"] = self._scope("flagged")
        return out

    def _scope(self, scope: str) -> dict[str, Any]:
        by_role = self.tallies.get(scope, {})
        out: dict[str, Any] = {"n": max((t.n for t in by_role.values()), default=0)}
        bands: dict[str, Any] = {}
        for role in ROLES:
            if role in by_role:
                out[role], bands[role] = by_role[role].metrics()
        out["bands"] = bands
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "tallies": {
                s: {r: t.to_dict() for r, t in by.items()} for s, by in self.tallies.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowTally:
        kind = RegressionTally if d["task"] == "regression" else ClassificationTally
        return cls(
            str(d["task"]),
            {s: {r: kind.from_dict(t) for r, t in by.items()} for s, by in d["tallies"].items()},
        )


class WindowEstimator:
    """Estimates a window's performance from a profile's estimation artefacts.

    See the module docstring for an example; ``tally`` is the per-batch half (for a recorder),
    ``WindowTally.merge`` and ``.metrics`` the per-window half (for a monitor).
    """

    def __init__(self, estimation: Estimation) -> None:
        self.estimation = estimation
        self.task = estimation.task
        self.error_models: dict[str, dict[str, ErrorModel]] = {}
        if self.task == "regression" and estimation.directory is not None:
            for role, art in estimation.roles.items():
                self.error_models[role] = {
                    loss: ErrorModel(estimation.directory / name)
                    for loss, name in art.error_models.items()
                }

    @classmethod
    def load(cls, profile_path: str | Path, profile: Profile | None = None) -> WindowEstimator:
        """The estimator of the profile at ``profile_path`` (its ``profile.estimation/`` folder)."""
        return cls(Estimation.load(estimation_dir(profile_path), profile))

    @staticmethod
    def available(profile_path: str | Path) -> bool:
        """Whether the profile has estimation artefacts (profiles built without a holdout don't)."""
        return (estimation_dir(profile_path) / "estimation.json").exists()

    @property
    def roles(self) -> list[str]:
        return list(self.estimation.roles)

    def estimate(
        self,
        features: pd.DataFrame | Mapping[str, Any],
        predictions: Mapping[str, Prediction | None],
        routes: Any = None,
        flagged: Any = None,
    ) -> dict[str, Any]:
        """The metrics of one batch taken as a window (see ``tally``)."""
        return self.tally(features, predictions, routes, flagged).metrics()

    def tally(
        self,
        features: pd.DataFrame | Mapping[str, Any],
        predictions: Mapping[str, Prediction | None],
        routes: Any = None,
        flagged: Any = None,
        sample: Any = None,
    ) -> WindowTally:
        """Sums for one batch of served (not rejected) rows.

        ``features``: the rows' features (a DataFrame or ``Verdicts.columns``); ``predictions``:
        role -> the model's ``Prediction`` for every row (NaN labels, or NaN probability rows, where
        it did not predict); ``routes``: per row "primary" or "fallback", the role whose answer was
        served (default: "primary"); ``flagged``: per row whether the checks flagged it (outside
        the training support); ``sample``: per row whether it is in a uniform random sample of
        the batch (default: every row is). The "all" scope sums the sampled rows, the "flagged"
        scope every flagged row, sampled or not; the error models see only those rows. A sample
        leaves the estimates unbiased and their bands those of the rows estimated (wider).
        """
        n = (
            len(features)
            if isinstance(features, pd.DataFrame)
            else len(next(iter(features.values())))
        )
        routes = (
            np.full(n, "primary", dtype=object)
            if routes is None
            else np.asarray(routes, dtype=object)
        )
        flagged = np.zeros(n, dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
        sampled = np.ones(n, dtype=bool) if sample is None else np.asarray(sample, dtype=bool)
        needed = sampled | flagged
        if not needed.all():
            idx = np.flatnonzero(needed)
            features = (features.iloc[idx] if isinstance(features, pd.DataFrame)
                        else {k: v[idx] for k, v in features.items()})
            predictions = {r: None if p is None else p.take(idx) for r, p in predictions.items()}
            routes, flagged, sampled, n = routes[idx], flagged[idx], sampled[idx], idx.size
        per_row = self._per_row(features, predictions, n)
        if "primary" in per_row and "fallback" in per_row:
            per_row["guarded"] = _served(per_row, routes == "fallback")
        elif "primary" in per_row:
            per_row["guarded"] = per_row["primary"]
        out: dict[str, dict[str, Tally]] = {}
        for scope, mask in (("all", sampled), ("flagged", flagged)):
            out[scope] = {
                role: self._tally({k: v[mask] for k, v in rows.items()})
                for role, rows in per_row.items()
            }
        return WindowTally(self.task, out)

    def _per_row(
        self, features: Any, predictions: Mapping[str, Prediction | None], n: int
    ) -> dict[str, dict[str, np.ndarray]]:
        """role -> per-row arrays: regression (abs, sq), classification (p, pred, score); NaN
        where the role did not predict."""
        out: dict[str, dict[str, np.ndarray]] = {}
        matrix = None
        for role, art in self.estimation.roles.items():
            pred = predictions.get(role)
            if pred is None:
                continue
            if self.task == "regression":
                labels = np.asarray(pred.labels, dtype=float)
                ok = np.isfinite(labels)
                if matrix is None:
                    matrix = self.estimation.encoder.matrix(features)
                rows = {loss: np.full(n, np.nan) for loss in ("abs", "sq")}
                if ok.any():
                    x = error_input(matrix if ok.all() else matrix[ok], labels[ok])
                    for loss, model in self.error_models[role].items():
                        rows[loss][ok] = model.predict_input(x)
                out[role] = rows
            elif art.calibration is not None and pred.probabilities is not None:
                out[role] = _class_rows(art.calibration, pred)
        return out

    def _tally(self, rows: dict[str, np.ndarray]) -> Tally:
        if self.task == "regression":
            t = RegressionTally()
            ok = np.isfinite(rows["abs"]) & np.isfinite(rows["sq"])
            t.update(rows["abs"][ok], rows["sq"][ok])
            return t
        c = ClassificationTally.empty(rows["p"].shape[1])
        ok = np.isfinite(rows["p"]).all(axis=1) & (rows["pred"] >= 0)
        c.update(rows["p"][ok], rows["pred"][ok], rows["score"][ok])
        return c


def _class_rows(cal: Any, pred: Prediction) -> dict[str, np.ndarray]:
    """Calibrated probabilities, predicted class index and raw scores, in the calibration's
    class order (a model's columns are matched to it by label)."""
    names = [str(c) for c in cal.classes]
    given = [str(c) for c in (pred.classes or [])]
    raw = np.asarray(pred.probabilities, dtype=float)
    scores = np.full((raw.shape[0], len(names)), np.nan)
    for j, c in enumerate(names):
        if c in given:
            scores[:, j] = raw[:, given.index(c)]
    labels = np.asarray(pred.labels).astype(str)
    index = np.full(len(labels), -1)
    for j, c in enumerate(names):
        index[labels == c] = j
    ok = np.isfinite(scores).all(axis=1)
    p = np.full_like(scores, np.nan)
    if ok.any():
        p[ok] = cal.apply(scores[ok])
    return {"p": p, "pred": index, "score": scores}


def _served(
    per_row: dict[str, dict[str, np.ndarray]], to_fallback: np.ndarray
) -> dict[str, np.ndarray]:
    primary, fallback = per_row["primary"], per_row["fallback"]
    out = {}
    for k, v in primary.items():
        mask = to_fallback.reshape(-1, *([1] * (v.ndim - 1)))
        out[k] = np.where(mask, fallback[k], v)
    return out
