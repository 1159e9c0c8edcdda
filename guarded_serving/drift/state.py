"""Mergeable drift counts: live traffic counted into the training profile's buckets.

A ``DriftState`` holds, per feature, one count per bucket of the profile (numeric: below the
training minimum, the profile's B bins, above the training maximum; categorical and boolean: each
training category in profile order, then "unseen" or, for a column whose profile kept only its
most frequent values, "other"), plus nulls; datetimes count as epoch seconds, and the same for the primary
model's predictions. Its size depends on the features and bins only, never on the rows counted, so
a worker can keep one in memory, flush it as JSON and start again; states of the same profile add
up with ``merge``. Pure numpy/pandas.

>>> from guarded_serving.profile import build_profile
>>> import numpy as np, pandas as pd
>>> df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "c": ["a", "b", "a", "b"], "y": [0, 1, 0, 1]})
>>> state = DriftState.empty(build_profile(df, target="y", n_bins=2))
>>> state.update({"x": np.array([0.0, 1.5, np.nan]), "c": np.array(["a", "z", None], dtype=object)},
...              now=100.0)
>>> state.rows, state.feature("x").counts.tolist(), state.feature("x").nulls
(3, [1, 1, 0, 0], 1)
>>> state.feature("c").counts.tolist()  # a, b, unseen
[1, 0, 1]
>>> (state + state).rows
6
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from ..profile import FeatureProfile, Profile, epoch_seconds, is_missing

FORMAT = "guarded-serving/drift-state"
VERSION = 1
#: Below this many values, counting categories with ``collections.Counter`` beats pandas'
#: per-call overhead (a one-row request would otherwise spend ~100 µs in pandas constructors).
SMALL = 64
NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class FeatureCounts:
    """The counts of one feature (or of the predictions) in a ``DriftState``.

    ``counts`` has B+2 entries for a numeric feature ([below min, bins 0..B-1, above max]) and
    K+1 for a categorical one ([categories in profile order..., unseen]); ``nulls`` is apart.
    """

    name: str
    kind: str
    counts: np.ndarray
    nulls: int

    @property
    def total(self) -> int:
        """Every value counted, nulls included."""
        return int(self.counts.sum()) + self.nulls


@dataclass(frozen=True)
class _Slot:
    """Where one feature's buckets live in the flat count array, and how values find them.

    The slot holds ``size`` = buckets + 1 entries, the last being nulls. ``edges`` (numeric) is
    [min, inner bin edges..., nextafter(max), NaN]: one ``searchsorted(side="right")`` then puts a
    value below min at 0, in bin i at i+1, above max (or +inf) at B+1 and NaN at B+2 (numpy
    orders NaN after everything), so a numeric column needs no masking. ``index`` (categorical)
    maps a category to its bucket. Both are None in a state read back without its profile.
    """

    name: str
    kind: str
    offset: int
    size: int
    edges: np.ndarray | None = None
    index: dict[str, int] | None = None

    @property
    def bound(self) -> bool:
        return self.edges is not None or self.index is not None


@dataclass(frozen=True)
class _Layout:
    profile_hash: str
    features: tuple[_Slot, ...]
    prediction: _Slot | None
    total: int

    @cached_property
    def bound(self) -> bool:
        return all(s.bound for s in self.slots())

    def slots(self) -> tuple[_Slot, ...]:
        return self.features + ((self.prediction,) if self.prediction else ())

    def shape(self) -> tuple[tuple[str, str, int], ...]:
        return tuple((s.name, s.kind, s.size) for s in self.slots())


def _slot(fp: FeatureProfile, offset: int) -> _Slot:
    if fp.is_numeric:
        if fp.count == 0 or fp.min is None or fp.max is None:
            # No training values: every live value counts as "above max" (out of range).
            edges = np.array([np.inf, np.nan])
            return _Slot(fp.name, NUMERIC, offset, 3, edges=edges)
        inner = np.asarray(fp.bin_edges[1:-1], dtype=np.float64)
        edges = np.concatenate(
            ([fp.min], inner, [np.nextafter(fp.max, np.inf)], [np.nan])
        ).astype(np.float64)
        return _Slot(fp.name, NUMERIC, offset, len(fp.bin_counts) + 3, edges=edges)
    index = {c: i for i, c in enumerate(fp.categories)}
    return _Slot(fp.name, CATEGORICAL, offset, len(index) + 2, index=index)


def _layout(profile: Profile) -> _Layout:
    slots, offset = [], 0
    for fp in profile.features:
        slots.append(_slot(fp, offset))
        offset += slots[-1].size
    pred = None
    if profile.prediction_profile is not None:
        pred = _slot(profile.prediction_profile, offset)
        offset += pred.size
    return _Layout(profile.content_hash, tuple(slots), pred, offset)


class DriftState:
    """Counts of live values per training bucket, for every feature and the predictions.

    Build with ``DriftState.empty(profile)``, feed with ``update``, combine with ``merge`` (or
    ``+``), store with ``to_dict`` / ``from_dict``. A state read back without its profile can be
    merged and evaluated but not updated (pass ``profile=`` to ``from_dict`` for that). Not
    thread-safe: a worker that updates from several threads holds a lock around ``update``.

    >>> from guarded_serving.profile import build_profile
    >>> import pandas as pd
    >>> p = build_profile(pd.DataFrame({"c": ["a", "b"], "y": [0.0, 1.0]}), target="y")
    >>> s = DriftState.empty(p)
    >>> s.update({"c": pd.array(["a", "a", None], dtype="string")}, now=5.0)
    >>> back = DriftState.from_dict(s.to_dict())
    >>> back.feature("c").counts.tolist(), back.feature("c").nulls, back == s
    ([2, 0, 0], 1, True)
    """

    __slots__ = ("_layout", "_counts", "rows", "first_ts", "last_ts")

    def __init__(self, layout: _Layout, counts: np.ndarray, rows: int = 0,
                 first_ts: float | None = None, last_ts: float | None = None) -> None:
        self._layout = layout
        self._counts = counts
        self.rows = rows
        self.first_ts = first_ts
        self.last_ts = last_ts

    @classmethod
    def empty(cls, profile: Profile) -> DriftState:
        """A state with no rows, bucketed like ``profile``."""
        layout = _layout(profile)
        return cls(layout, np.zeros(layout.total, dtype=np.int64))

    # -- reading -------------------------------------------------------------------------------

    @property
    def profile_hash(self) -> str:
        """The content hash of the profile this state was built from."""
        return self._layout.profile_hash

    @property
    def feature_names(self) -> list[str]:
        return [s.name for s in self._layout.features]

    @property
    def is_empty(self) -> bool:
        return self.rows == 0

    def feature(self, name: str) -> FeatureCounts:
        """The counts of feature ``name`` (a copy)."""
        for s in self._layout.features:
            if s.name == name:
                return self._read(s)
        raise KeyError(f"no feature {name!r} in this drift state")

    @property
    def prediction(self) -> FeatureCounts | None:
        """The counts of the primary model's predictions (None if the profile has none)."""
        p = self._layout.prediction
        return None if p is None else self._read(p)

    def _read(self, s: _Slot) -> FeatureCounts:
        block = self._counts[s.offset:s.offset + s.size]
        return FeatureCounts(s.name, s.kind, block[:-1].copy(), int(block[-1]))

    # -- counting ------------------------------------------------------------------------------

    def update(self, columns: Mapping[str, Any], predictions: Any = None,
               now: float | None = None) -> None:
        """Count one batch. ``columns`` maps feature name -> values (numeric: float array, NaN
        for null; categorical: object array of str with None for null, or a pandas string/Arrow
        array). Columns the profile does not know are ignored; a profile feature missing from
        ``columns`` counts nothing for that batch (the rows are still counted)."""
        layout = self._layout
        if not layout.bound:
            raise ValueError(
                "this drift state was read back without its profile and cannot count rows; "
                "use DriftState.from_dict(d, profile=...)"
            )
        items = [(s, v) for s in layout.features if (v := columns.get(s.name)) is not None]
        if layout.prediction is not None and predictions is not None:
            items.append((layout.prediction, predictions))
        if not items:
            return
        n = len(items[0][1])
        for slot, values in items:  # all checked before anything is counted
            if len(values) != n:
                raise ValueError(
                    f"{slot.name!r} has {len(values)} values, expected {n} like the others"
                )
        numeric: list[np.ndarray] = []
        categorical: list[tuple[int, int]] = []
        for slot, values in items:
            if slot.kind == NUMERIC:
                assert slot.edges is not None
                idx = np.searchsorted(slot.edges, _as_float(values), side="right")
                numeric.append(idx + slot.offset if slot.offset else idx)
            else:
                categorical.extend(_category_buckets(slot, values))
        # Counted only once every column went through, so a bad column leaves the state as it was.
        if numeric:
            joined = numeric[0] if len(numeric) == 1 else np.concatenate(numeric)
            self._counts += np.bincount(joined, minlength=layout.total)
        for i, c in categorical:
            self._counts[i] += c
        if n:
            self.rows += n
            ts = time.time() if now is None else float(now)
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)

    # -- combining -----------------------------------------------------------------------------

    def merge(self, other: DriftState) -> DriftState:
        """A new state holding the counts of both (which must come from the same profile)."""
        if self._layout.profile_hash != other._layout.profile_hash:
            raise ValueError(
                f"cannot merge drift states of different profiles ({self.profile_hash} and "
                f"{other.profile_hash})"
            )
        if self._layout.shape() != other._layout.shape():
            raise ValueError("cannot merge drift states with different buckets")
        layout = self._layout if self._layout.bound else other._layout
        return DriftState(
            layout,
            self._counts + other._counts,
            self.rows + other.rows,
            _pick(min, self.first_ts, other.first_ts),
            _pick(max, self.last_ts, other.last_ts),
        )

    def __add__(self, other: DriftState) -> DriftState:
        return self.merge(other)

    def copy(self) -> DriftState:
        return DriftState(self._layout, self._counts.copy(), self.rows, self.first_ts, self.last_ts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DriftState):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"DriftState(rows={self.rows}, features={len(self._layout.features)}, "
                f"first_ts={self.first_ts}, last_ts={self.last_ts})")

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: plain ints and lists; ``from_dict`` reads it back exactly."""

        def block(s: _Slot) -> dict[str, Any]:
            fc = self._read(s)
            return {"name": s.name, "kind": s.kind, "counts": fc.counts.tolist(), "nulls": fc.nulls}

        pred = self._layout.prediction
        return {
            "format": FORMAT,
            "version": VERSION,
            "profile_hash": self.profile_hash,
            "rows": int(self.rows),
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "features": [block(s) for s in self._layout.features],
            "prediction": None if pred is None else block(pred),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], profile: Profile | None = None) -> DriftState:
        """Read ``to_dict`` output back. With ``profile`` (whose hash must match), the state can
        also ``update``."""
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(
                f"not a drift state of format {FORMAT!r} version {VERSION} "
                f"(got {d.get('format')!r} version {d.get('version')!r})"
            )
        blocks = list(d["features"]) + ([d["prediction"]] if d.get("prediction") else [])
        if profile is not None:
            layout = _layout(profile)
            if layout.profile_hash != d["profile_hash"]:
                raise ValueError(
                    f"drift state of profile {d['profile_hash']} read with profile "
                    f"{layout.profile_hash}"
                )
            expected = [(s.name, s.kind, s.size) for s in layout.slots()]
            got = [(b["name"], b["kind"], len(b["counts"]) + 1) for b in blocks]
            if expected != got:
                raise ValueError("drift state buckets do not match the profile's")
        else:
            slots, offset = [], 0
            for b in blocks:
                slots.append(_Slot(str(b["name"]), str(b["kind"]), offset, len(b["counts"]) + 1))
                offset += slots[-1].size
            has_pred = bool(d.get("prediction"))
            layout = _Layout(
                str(d["profile_hash"]),
                tuple(slots[:-1] if has_pred else slots),
                slots[-1] if has_pred else None,
                offset,
            )
        counts = np.array(
            [c for b in blocks for c in [*b["counts"], b["nulls"]]], dtype=np.int64
        )
        return cls(layout, counts, int(d["rows"]), _opt_float(d.get("first_ts")),
                   _opt_float(d.get("last_ts")))


def _category_buckets(slot: _Slot, values: Any) -> list[tuple[int, int]]:
    """(flat bucket index, count) per distinct value of a categorical column."""
    if isinstance(values, (pd.Series, pd.Index)):
        values = values.array
    pairs: Iterable[tuple[Any, int]]
    if isinstance(values, pd.api.extensions.ExtensionArray) and len(values) > SMALL:
        # Arrow-backed strings count in C++; iterating them in Python would not.
        vc = pd.Series(values, copy=False).value_counts(dropna=False)
        pairs = zip(vc.index.tolist(), vc.to_numpy().tolist(), strict=True)
    elif isinstance(values, np.ndarray) and values.dtype == object and len(values) > SMALL:
        pairs = _value_counts(values)
    else:
        pairs = Counter(values).items()  # hashes each value once, in C
    index, unseen = slot.index, slot.offset + slot.size - 2
    assert index is not None
    out = []
    # A loop over distinct values, not rows: a few categories (plus any unseen ones).
    for key, c in pairs:
        if is_missing(key):
            out.append((unseen + 1, c))
        else:
            i = index.get(key if isinstance(key, str) else str(key))
            out.append((unseen if i is None else slot.offset + i, c))
    return out


def _value_counts(values: np.ndarray) -> Iterable[tuple[Any, int]]:
    """(value, count) per distinct value of an object array: pandas' hash table, then one count
    per code (half of ``Counter``'s time on a few thousand strings). Values equal in Python are
    one value, as with ``Counter``."""
    try:
        codes, distinct = pd.factorize(values)  # missing values (None, NaN, NA): code -1
    except TypeError:  # an unhashable value: Counter says so the way callers expect
        return Counter(values).items()
    counts = np.bincount(codes + 1, minlength=len(distinct) + 1).tolist()
    pairs = list(zip(distinct.tolist(), counts[1:], strict=True))
    return [(None, counts[0]), *pairs] if counts[0] else pairs


def _as_float(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == np.float64:
        return values
    if pd.api.types.is_datetime64_any_dtype(getattr(values, "dtype", None)):
        return epoch_seconds(pd.Series(values, copy=False))[0]  # the profile's bins are in seconds
    if isinstance(values, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def _pick(fn: Any, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else fn(a, b)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
