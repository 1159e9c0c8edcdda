"""Drift statistics on counts: a live ``DriftState`` against the training profile's histograms.

Everything here works on bucket counts (a few dozen numbers per feature), so evaluating a window
costs the same whatever its size. Per feature: Pearson's chi-square goodness-of-fit test of the
live counts against the training proportions (taken as known: the training set is large), PSI,
Jensen-Shannon distance and, for numeric features, the Wasserstein distance between the binned
distributions; then a multiple-testing correction over the features. Pure numpy/scipy.
The serving policy can test a feature by PSI alone (``drift_test: psi``) or not at all
(``drift: false``, and by default the time index): such features are listed under ``skipped``.

>>> from guarded_serving.profile import build_profile
>>> from guarded_serving.drift.state import DriftState
>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> p = build_profile(pd.DataFrame({"x": rng.normal(size=5000), "y": np.zeros(5000)}), target="y")
>>> live = DriftState.empty(p)
>>> live.update({"x": rng.normal(loc=1.0, size=500)}, now=0.0)
>>> out = evaluate(live, p)
>>> out["status"], out["features"][0]["status"], out["features"][0]["psi"] > 0.25
('drift', 'drift', True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.special import chdtrc

from ..policy import DriftTest, Policy
from ..profile import FeatureProfile, Profile
from .state import DriftState, FeatureCounts

OK, WARN, DRIFT, INSUFFICIENT = "ok", "warn", "drift", "insufficient_data"
_RANK = {INSUFFICIENT: -1, OK: 0, WARN: 1, DRIFT: 2}
CORRECTIONS = ("holm", "bonferroni", "none")
#: Training pseudo-count of the buckets training never filled (below min, above max, unseen,
#: null): small enough not to blur the histogram, non-zero so that the test can see them fill.
PSEUDO_COUNT = 0.5
#: Floor of a proportion in PSI, whose log ratio is infinite on an empty bucket.
PSI_EPSILON = 1e-4
#: Pooling: buckets expected to hold fewer live values than this are pooled (the usual rule of
#: thumb for the chi-square approximation).
MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class DriftThresholds:
    """When a feature counts as drifting.

    A feature is tested only once its window holds ``min_rows`` values. Then it is

    * ``"drift"`` when the test is significant (corrected p < ``p_value``) **and** the change is
      non-trivial (PSI >= ``psi_warn``);
    * ``"warn"`` when the test is significant but PSI is below ``psi_warn`` (a real but small
      change, which large windows find readily), or when PSI >= ``psi_drift`` without
      significance (large, but not yet established);
    * ``"ok"`` otherwise.

    Why these defaults. Requiring significance *and* effect size is what keeps false alarms down.
    The chi-square test is exact only if the training histogram is the true distribution; the
    training set is itself a sample, and so is any holdout, so on large windows the test finds
    differences of no practical weight. PSI alone is biased upwards by about (buckets - 1) / rows
    (0.11 at 200 rows and 22 buckets, 0.04 at 500). ``p_value=0.01`` after Holm's correction keeps
    the test's own false-alarm rate near 1% per window over all features; ``psi_warn=0.1``, the
    customary "moderate change" level, lies well above the PSI noise of windows of 500 rows and
    more. Drift cannot require the customary "major change" level ``psi_drift=0.25``: realistic
    shifts sit around it (halving the share of the most frequent cut gives a PSI of about 0.23,
    a +0.5 standard deviation shift of depth about 0.3), so ``psi_drift`` only raises a warning
    on its own. ``min_rows=200``: below it, 20 bins hold ~10 values each and the test has little
    power. bench/bench_drift.py measures the result on the example: drift in <= 0.5% of
    in-distribution windows of 500 and 2,000 rows, and in every window of the three shifts above;
    the price is that a +0.2 standard deviation shift (PSI ~0.05) mostly gets "warn", not "drift".

    >>> DriftThresholds().p_value, DriftThresholds(correction="bonferroni").correction
    (0.01, 'bonferroni')
    """

    p_value: float = 0.01
    psi_warn: float = 0.1
    psi_drift: float = 0.25
    correction: Literal["holm", "bonferroni", "none"] = "holm"
    min_rows: int = 200
    #: The serving policy: which features are tested and how (``drift`` and ``drift_test`` of
    #: ``policy.features``, the time index). None: the default policy, under which the
    #: profile's time index is not tested.
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if not 0 < self.p_value < 1:
            raise ValueError(f"p_value must lie in (0, 1), got {self.p_value!r}")
        if not 0 <= self.psi_warn <= self.psi_drift:
            raise ValueError(
                f"need 0 <= psi_warn <= psi_drift, got {self.psi_warn!r} and {self.psi_drift!r}"
            )
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows!r}")


@dataclass(frozen=True)
class _Reference:
    """The training side of one feature: bucket counts (null last) and labels."""

    counts: np.ndarray
    labels: list[str]
    positions: np.ndarray | None  # numeric: where each non-null bucket sits, for Wasserstein


def _reference(fp: FeatureProfile) -> _Reference:
    """Training counts per bucket; a categorical column that kept only its most frequent values
    puts the rest in the "(other)" bucket, where live values outside them are counted."""
    if fp.is_numeric:
        if not fp.bin_counts or fp.min is None or fp.max is None:
            return _Reference(np.array([0, 0, fp.null_count], dtype=float),
                              ["< min", "> max", "null"], None)
        e = np.asarray(fp.bin_edges, dtype=float)
        shown = _times(e, fp.timezone) if fp.is_datetime else [f"{x:.4g}" for x in e]
        labels = ["< min", *(f"[{a}, {b})" for a, b in zip(shown[:-1], shown[1:], strict=True)),
                  "> max", "null"]
        labels[-3] = labels[-3][:-1] + "]"  # the last bin includes the maximum
        counts = np.array([0, *fp.bin_counts, 0, fp.null_count], dtype=float)
        positions = np.concatenate(([fp.min], (e[:-1] + e[1:]) / 2, [fp.max]))
        return _Reference(counts, labels, positions)
    cats = list(fp.categories)
    counts = np.array([*fp.categories.values(), fp.other_count, fp.null_count], dtype=float)
    rest = "(other)" if fp.categories_truncated else "(unseen)"
    return _Reference(counts, [*cats, rest, "(null)"], None)


def _times(seconds: np.ndarray, timezone: str | None) -> list[str]:
    """Bin edges of a datetime feature as ISO 8601 text: dates when all are midnights."""
    t = pd.Series(pd.to_datetime(seconds, unit="s", utc=True))
    t = t.dt.tz_convert(timezone) if timezone else t.dt.tz_localize(None)
    midnight = bool((t.dt.normalize() == t).all())
    return t.dt.strftime("%Y-%m-%d" if midnight else "%Y-%m-%dT%H:%M").tolist()  # type: ignore[no-any-return]


def _compare(fp: FeatureProfile, live: FeatureCounts, test: DriftTest = "chi2") -> dict[str, Any]:
    """Every statistic of one feature (no verdict yet)."""
    ref = _reference(fp)
    obs = np.append(live.counts, live.nulls).astype(float)
    if obs.size != ref.counts.size:
        raise ValueError(f"{fp.name}: the drift state has {obs.size} buckets, the profile "
                         f"{ref.counts.size}; was it built from another profile?")
    n = obs.sum()
    train_total = ref.counts.sum()
    expected = ref.counts / train_total if train_total else ref.counts
    numeric = fp.is_numeric
    out: dict[str, Any] = {
        "name": fp.name,
        "kind": fp.kind,
        "status": INSUFFICIENT,
        "test": test,
        "statistic": None,
        "p_value": None,
        "p_value_corrected": None,
        "psi": None,
        "js_distance": None,
        "wasserstein": None,
        "live_rows": int(n),
        "null_rate_train": _share(ref.counts[-1], train_total),
        "null_rate_live": _share(obs[-1], n),
        ("out_of_range_rate" if numeric else "unseen_rate"): None,
        "expected": [float(v) for v in expected],
        "observed": [float(v) for v in (obs / n if n else obs)],
        "buckets": ref.labels,
    }
    if n == 0 or train_total == 0:
        return out
    observed = obs / n
    # Buckets training never filled get a pseudo-count, so that filling them is testable.
    smoothed = np.where(ref.counts > 0, ref.counts, PSEUDO_COUNT)
    smoothed = smoothed / smoothed.sum()
    stat, p = _chi2(obs, n * smoothed)
    out.update(
        statistic=stat,
        p_value=p,
        psi=_psi(observed, smoothed),
        js_distance=_js_distance(expected, observed),
    )
    if numeric:
        out["out_of_range_rate"] = float(observed[0] + observed[-2])
        if ref.positions is not None:
            out["wasserstein"] = _wasserstein(ref.counts[:-1], obs[:-1], ref.positions)
    else:
        out["unseen_rate"] = float(observed[-2])
    return out


def _chi2(observed: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square goodness of fit, pooling buckets expected to hold < 5 values.

    The sparse buckets are pooled together (adding the next smallest until the pool reaches
    ``MIN_EXPECTED``), so a filled "above max" or "unseen" bucket still weighs in the test."""
    order = np.argsort(expected, kind="stable")
    e, o = expected[order], observed[order]
    sparse = int(np.searchsorted(e, MIN_EXPECTED, side="left"))
    if sparse:
        cum = np.cumsum(e)
        # Pool the first k buckets, k >= sparse, the smallest with a pooled expectation >= 5.
        k = max(sparse, int(np.searchsorted(cum, MIN_EXPECTED, side="left")) + 1)
        k = min(k, e.size)
        e = np.concatenate(([e[:k].sum()], e[k:]))
        o = np.concatenate(([o[:k].sum()], o[k:]))
    if e.size < 2:
        return 0.0, 1.0
    stat = float(((o - e) ** 2 / e).sum())
    return stat, float(chdtrc(e.size - 1, stat))


def _psi(observed: np.ndarray, expected: np.ndarray) -> float:
    o = np.maximum(observed, PSI_EPSILON)
    e = np.maximum(expected, PSI_EPSILON)
    return float(((o - e) * np.log(o / e)).sum())


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0: same distribution, 1: disjoint)."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def _wasserstein(train: np.ndarray, live: np.ndarray, positions: np.ndarray) -> float | None:
    """W1 between the binned distributions (bin centres; below/above range at min/max), in units
    of the feature; None if either side has no non-null value."""
    if train.sum() == 0 or live.sum() == 0:
        return None
    gap = np.abs(np.cumsum(train / train.sum()) - np.cumsum(live / live.sum()))[:-1]
    return float((gap * np.diff(positions)).sum())


def _share(part: float, whole: float) -> float | None:
    return float(part / whole) if whole else None


def _correct(p: list[float], method: str) -> list[float]:
    """Holm (step-down), Bonferroni, or no correction of a family of p-values."""
    m = len(p)
    if method == "none" or m == 0:
        return list(p)
    arr = np.asarray(p, dtype=float)
    if method == "bonferroni":
        return np.minimum(arr * m, 1.0).tolist()  # type: ignore[no-any-return]
    order = np.argsort(arr, kind="stable")
    adjusted = np.minimum(np.maximum.accumulate(arr[order] * (m - np.arange(m))), 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()  # type: ignore[no-any-return]


def _verdict(f: dict[str, Any], th: DriftThresholds) -> str:
    if f["test"] == "psi":  # effect size alone
        return DRIFT if f["psi"] >= th.psi_drift else WARN if f["psi"] >= th.psi_warn else OK
    significant = f["p_value_corrected"] < th.p_value
    if significant and f["psi"] >= th.psi_warn:
        return DRIFT
    if significant or f["psi"] >= th.psi_drift:
        return WARN
    return OK


def _judge(results: list[dict[str, Any]], th: DriftThresholds, correction: str) -> None:
    """Correct the p-values of the testable results in place and give each its status."""
    testable = [f for f in results if f["p_value"] is not None and f["live_rows"] >= th.min_rows]
    # Only the chi-square tests form the family that the correction is over.
    family = [f for f in testable if f["test"] == "chi2"]
    for f, pc in zip(family, _correct([f["p_value"] for f in family], correction), strict=True):
        f["p_value_corrected"] = float(pc)
    for f in testable:
        f["status"] = _verdict(f, th)


def evaluate(state: DriftState, profile: Profile,
             thresholds: DriftThresholds | None = None) -> dict[str, Any]:
    """Drift of ``state`` against ``profile``: overall status, per-feature tests and statistics,
    the predictions apart (tested on their own). JSON-safe."""
    th = thresholds or DriftThresholds()
    if state.profile_hash != profile.content_hash:
        raise ValueError(f"drift state of profile {state.profile_hash} evaluated against profile "
                         f"{profile.content_hash}")
    policy = th.policy or Policy()
    rules = {fp.name: policy.rules(fp.name, profile.time_index) for fp in profile.features}
    skipped = [fp.name for fp in profile.features if not rules[fp.name].drift]
    features = [_compare(fp, state.feature(fp.name), rules[fp.name].drift_test)
                for fp in profile.features if rules[fp.name].drift]
    prediction = None
    pp, live_pred = profile.prediction_profile, state.prediction
    if pp is not None and live_pred is not None:
        prediction = _compare(pp, live_pred)
    enough = state.rows >= th.min_rows
    if enough:
        _judge(features, th, th.correction)
        if prediction is not None:
            _judge([prediction], th, "none")
    statuses = [f["status"] for f in features] + ([prediction["status"]] if prediction else [])
    worst = max(statuses, key=_RANK.__getitem__, default=INSUFFICIENT)
    return {
        "status": worst if enough else INSUFFICIENT,
        "rows": int(state.rows),
        "min_rows": th.min_rows,
        "window": {"start": state.first_ts, "end": state.last_ts, "rows": int(state.rows)},
        "correction": th.correction,
        "thresholds": {k: v for k, v in asdict(th).items() if k != "policy"},
        "features": features,
        "skipped": skipped,
        "prediction": prediction,
    }
