"""Replay: a candidate model scored on logged production outcomes, beside what the live service
answered on the same rows.

Input is the prediction log as ``guarded-serving export`` writes it (one row per served row: the
outcome under the target's name, ``route``, ``prediction`` for what was served, and each live
model's own ``primary_prediction`` / ``fallback_prediction`` where it made one) plus the candidate's
predictions on those rows. Output, per route (``primary``, ``fallback``) and over ``all`` rows:

- the metrics of ``/performance`` (``scoring.score``: n, mae, rmse; or n, accuracy, f1) for the
  candidate, the primary, the fallback and the guarded service, each model on the rows it predicted;
- a 95% interval for each, from a paired bootstrap over rows (one set of resamples shared by every
  model, so the models are compared on the same rows each time; fixed seed, so a replay repeats);
- the candidate's improvement over each live model on the rows both predicted, with its interval,
  and a verdict.

The verdict rule, on the key metric (mae for regression, accuracy for classification):
``improvement`` is positive when the candidate is better (reference mae - candidate mae; candidate
accuracy - reference accuracy). With ``[lo, hi]`` its bootstrap interval and ``margin`` the smallest
difference that counts (in the metric's units, or a percentage of the reference's value):

- ``better`` when ``lo > margin``: the whole interval says the candidate is better by more than the margin;
- ``worse`` when ``hi < -margin``: the whole interval says it is worse by more than the margin;
- ``inconclusive`` otherwise (too few rows, or a difference within the margin).

The overall verdict is the candidate against the guarded service on all rows.

>>> rows = pd.DataFrame({"price": [1.0, 2.0, 3.0, 4.0] * 10, "route": ["primary", "fallback"] * 20,
...                      "prediction": [1.5, 2.5, 3.5, 4.5] * 10,
...                      "primary_prediction": [1.5, 3.0, 3.5, 5.0] * 10,
...                      "fallback_prediction": [1.5, 2.5, 3.5, 4.5] * 10})
>>> r = replay(rows, np.array([1.1, 2.1, 3.1, 4.1] * 10), "regression", target="price")
>>> r.verdict, round(r.scopes["all"].metrics["candidate"]["mae"], 6)
(<Verdict.BETTER: 'better'>, 0.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from .errors import GuardedServingError
from .scoring import score

__all__ = ["Comparison", "Replay", "ScopeResult", "Verdict", "parse_margin", "replay"]

#: The live models and the export column holding each one's prediction.
LIVE_COLUMNS = {
    "primary": "primary_prediction",
    "fallback": "fallback_prediction",
    "guarded": "prediction",
}
ROLES = ("candidate", *LIVE_COLUMNS)
#: ``all`` rows, then the rows of each route.
SCOPES = ("all", "primary", "fallback")
#: The metric a verdict is decided on, as /performance's decision impact uses it.
KEY_METRIC = {"regression": "mae", "classification": "accuracy"}
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
N_BOOT = 1000
SEED = 0
CONFIDENCE = 0.95
#: Bootstrap weights are built this many cells (resamples x rows) at a time, to bound memory.
_CELLS_PER_CHUNK = 2_000_000


class Verdict(StrEnum):
    BETTER = "better"
    WORSE = "worse"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """The candidate against one live model, on the ``n`` rows both predicted."""

    reference: str
    metric: str
    n: int
    #: Per metric: positive when the candidate is better.
    improvement: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    #: The margin in the key metric's units.
    margin: float
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "metric": self.metric,
            "n": self.n,
            "improvement": self.improvement,
            "intervals": {k: _pair(v) for k, v in self.intervals.items()},
            "margin": _num(self.margin),
            "verdict": str(self.verdict),
        }


@dataclass(frozen=True)
class ScopeResult:
    """Every model's metrics and intervals on one set of rows (all, or one route)."""

    n: int
    metrics: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    comparisons: dict[str, Comparison]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            **self.metrics,
            "intervals": {
                r: {k: _pair(v) for k, v in m.items()} for r, m in self.intervals.items()
            },
            "comparisons": {r: c.to_dict() for r, c in self.comparisons.items()},
        }


@dataclass(frozen=True)
class Replay:
    """The result of ``replay``: ``scopes`` maps all / primary / fallback to a ScopeResult."""

    task: str
    metric: str
    margin: str
    confidence: float
    n_boot: int
    seed: int
    scopes: dict[str, ScopeResult]

    @property
    def n(self) -> int:
        return self.scopes["all"].n

    @property
    def verdict(self) -> Verdict:
        """The candidate against the guarded service on all rows."""
        return self.scopes["all"].comparisons["guarded"].verdict

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (null where a figure has no rows): overall figures at the top, each
        route under ``by_route``."""
        top = self.scopes["all"].to_dict()
        out: dict[str, Any] = {
            "n": self.n,
            "task": self.task,
            "metric": self.metric,
            "margin": self.margin,
            "confidence": self.confidence,
            "bootstrap": {"resamples": self.n_boot, "seed": self.seed},
            **{k: v for k, v in top.items() if k != "n"},
            "by_route": {s: self.scopes[s].to_dict() for s in SCOPES if s != "all"},
            "verdict": str(self.verdict),
        }
        return out


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _pair(v: tuple[float, float]) -> list[float | None]:
    return [_num(v[0]), _num(v[1])]


def parse_margin(margin: float | str) -> tuple[float, bool]:
    """``(amount, relative)`` from a number in the metric's units or a percentage such as ``"2%"``.

    >>> parse_margin("2.5%"), parse_margin(10)
    ((0.025, True), (10.0, False))
    """
    text = str(margin).strip()
    relative = text.endswith("%")
    try:
        amount = float(text[:-1] if relative else text)
    except ValueError:
        raise GuardedServingError(
            f"margin: expected a number or a percentage such as 2%, got {margin!r}"
        ) from None
    if not math.isfinite(amount) or amount < 0:
        raise GuardedServingError(f"margin: must be a finite number >= 0, got {margin!r}")
    return (amount / 100.0 if relative else amount), relative


def replay(
    rows: pd.DataFrame,
    candidate: Any,
    task: str,
    *,
    target: str = "outcome",
    margin: float | str = 0.0,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Replay:
    """Score ``candidate`` (one prediction per row of ``rows``) beside the live models on the rows
    of ``rows`` that have an outcome in ``target``. See the module docstring for the rule."""
    if task not in KEY_METRIC:
        raise GuardedServingError(f"task must be one of {sorted(KEY_METRIC)}, got {task!r}")
    if target not in rows.columns:
        raise GuardedServingError(f"the logged rows have no {target!r} column (the outcomes)")
    cand = np.asarray(candidate).reshape(-1)
    if len(cand) != len(rows):
        raise GuardedServingError(f"{len(cand)} candidate prediction(s) for {len(rows)} row(s)")
    if not 0.0 < confidence < 1.0 or n_boot < 1:
        raise GuardedServingError("confidence must be in (0, 1) and n_boot at least 1")
    amount, relative = parse_margin(margin)
    y = _values(rows[target], task)
    keep = ~pd.isna(y)
    y = y[keep]
    preds = {"candidate": _values(pd.Series(cand), task)[keep]}
    for role, col in LIVE_COLUMNS.items():
        preds[role] = (
            _values(rows[col], task)[keep] if col in rows else np.full(len(y), np.nan, dtype=object)
        )
    masks = {r: ~pd.isna(p) for r, p in preds.items()}
    route = (
        rows["route"].astype(object).to_numpy()[keep] if "route" in rows else np.full(len(y), None)
    )
    classes = _classes(y, preds, masks) if task == "classification" else []
    key = KEY_METRIC[task]
    rng = np.random.default_rng(seed)
    scopes = {}
    for scope in SCOPES:
        sel = np.ones(len(y), dtype=bool) if scope == "all" else route == scope
        scopes[scope] = _scope(
            task,
            key,
            classes,
            y[sel],
            {r: p[sel] for r, p in preds.items()},
            {r: m[sel] for r, m in masks.items()},
            (amount, relative),
            n_boot,
            rng,
            confidence,
        )
    return Replay(task, key, str(margin), confidence, n_boot, seed, scopes)


# -- internals -----------------------------------------------------------------------------------


def _values(s: pd.Series, task: str) -> np.ndarray:
    """Numbers (NaN when missing) for regression; objects (None when missing) for classification."""
    if task == "regression":
        return np.asarray(pd.to_numeric(s.astype(object), errors="coerce"), dtype=float)
    v = s.astype(object).to_numpy()
    return np.asarray(np.where(pd.isna(v), None, v), dtype=object)


def _classes(
    y: np.ndarray, preds: dict[str, np.ndarray], masks: dict[str, np.ndarray]
) -> list[str]:
    """Every label seen, as text (``scoring`` compares labels as text)."""
    seen = {str(v) for v in y}
    for r, p in preds.items():
        seen.update(str(v) for v in p[masks[r]])
    return sorted(seen)


def _row_stats(
    task: str, classes: list[str], y: np.ndarray, p: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Per-row columns whose (weighted) sums give every metric (``_from_sums``); zero off ``mask``."""
    m = mask.astype(float)
    if task == "regression":
        err = np.where(mask, p.astype(float) - y.astype(float), 0.0)
        return np.column_stack([m, np.abs(err), err**2])
    t = np.asarray([str(v) for v in y])
    q = np.asarray([str(v) for v in p])
    cols = [m, (t == q) & mask]
    for c in classes:
        cols += [(t == c) & (q == c) & mask, (t != c) & (q == c) & mask, (t == c) & (q != c) & mask]
    return np.column_stack(cols).astype(float)


def _from_sums(task: str, s: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from the sums of ``_row_stats`` columns (one row of sums per resample)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = s[:, 0]
        if task == "regression":
            return {"mae": s[:, 1] / n, "rmse": np.sqrt(s[:, 2] / n)}
        tp, fp, fn = s[:, 2::3], s[:, 3::3], s[:, 4::3]
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1.0), np.nan)
        # As scoring.macro_f1: the positive (second) class when there are two, else the macro mean
        # over the classes present in the rows.
        if tp.shape[1] == 2:
            f1_all = np.where(np.isnan(f1[:, 1]), 0.0, f1[:, 1])
        else:
            present = denom > 0
            f1_all = np.where(present, f1, 0.0).sum(axis=1) / present.sum(axis=1)
        return {"accuracy": s[:, 1] / n, "f1": f1_all}


def _bootstrap_sums(stats: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of ``stats`` (rows x k) over ``n_boot`` resamples of the rows with replacement:
    each resample is a vector of row counts, so every sum is one matrix product."""
    n = len(stats)
    out = np.empty((n_boot, stats.shape[1]))
    step = max(1, _CELLS_PER_CHUNK // max(n, 1))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        out[start : start + b] = counts @ stats
    return out


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return (math.nan, math.nan)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def _improvement(metric: str, candidate: Any, reference: Any) -> Any:
    return reference - candidate if metric in LOWER_IS_BETTER else candidate - reference


def _scope(
    task: str,
    key: str,
    classes: list[str],
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    margin: tuple[float, bool],
    n_boot: int,
    rng: np.random.Generator,
    confidence: float,
) -> ScopeResult:
    # One block of row statistics per model on its own rows, then per live model the candidate's
    # and the reference's on the rows both predicted; one bootstrap over all of them keeps the
    # resamples paired.
    blocks: dict[tuple[str, str], np.ndarray] = {}
    for role in ROLES:
        blocks[(role, role)] = _row_stats(task, classes, y, preds[role], masks[role])
    for ref in LIVE_COLUMNS:
        both = masks["candidate"] & masks[ref]
        blocks[("candidate", ref)] = _row_stats(task, classes, y, preds["candidate"], both)
        blocks[(ref, ref + "+candidate")] = _row_stats(task, classes, y, preds[ref], both)
    keys = list(blocks)
    widths = [blocks[k].shape[1] for k in keys]
    stacked = np.hstack([blocks[k] for k in keys]) if len(y) else np.zeros((0, sum(widths)))
    sums = (
        _bootstrap_sums(stacked, n_boot, rng) if len(y) else np.full((n_boot, sum(widths)), np.nan)
    )
    bounds = np.cumsum([0, *widths])
    boot = {k: _from_sums(task, sums[:, bounds[i] : bounds[i + 1]]) for i, k in enumerate(keys)}

    metrics: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, tuple[float, float]]] = {}
    for role in ROLES:
        mask = masks[role]
        metrics[role] = score(task, y[mask], preds[role][mask])
        intervals[role] = {m: _interval(v, confidence) for m, v in boot[(role, role)].items()}
    comparisons = {}
    for ref in LIVE_COLUMNS:
        both = masks["candidate"] & masks[ref]
        cand = score(task, y[both], preds["candidate"][both])
        other = score(task, y[both], preds[ref][both])
        names = [m for m in cand if m != "n"]
        improvement = {m: float(_improvement(m, cand[m], other[m])) for m in names}
        ivals = {
            m: _interval(
                _improvement(m, boot[("candidate", ref)][m], boot[(ref, ref + "+candidate")][m]),
                confidence,
            )
            for m in boot[("candidate", ref)]
        }
        amount, relative = margin
        margin_abs = amount * abs(other.get(key, math.nan)) if relative else amount
        comparisons[ref] = Comparison(
            ref,
            key,
            int(both.sum()),
            improvement,
            ivals,
            margin_abs,
            _verdict(ivals.get(key, (math.nan, math.nan)), margin_abs),
        )
    return ScopeResult(len(y), metrics, intervals, comparisons)


def _verdict(interval: tuple[float, float], margin: float) -> Verdict:
    lo, hi = interval
    if math.isfinite(lo) and math.isfinite(margin) and lo > margin:
        return Verdict.BETTER
    if math.isfinite(hi) and math.isfinite(margin) and hi < -margin:
        return Verdict.WORSE
    return Verdict.INCONCLUSIVE
