"""Drift windows assembled at read time from the segments that worker processes flush.

Each worker counts its own rows into a ``DriftState`` and flushes it now and then as a
``Segment`` (worker id, first and last timestamp, rows, the state as a dict). Nothing is shared
between workers while serving; windows are cut when someone reads: segments are ordered by the
time they end and grouped into tumbling windows by rows, by time, or both. Pure: no store here.

>>> from guarded_serving.profile import build_profile
>>> import numpy as np, pandas as pd
>>> p = build_profile(pd.DataFrame({"x": np.arange(100.0), "y": np.zeros(100)}), target="y")
>>> segs = []
>>> for i in range(5):
...     s = DriftState.empty(p)
...     s.update({"x": np.arange(40.0)}, now=float(i))
...     segs.append(Segment(f"w{i % 2}", float(i), float(i), s.rows, s.to_dict(), id=i))
>>> [(w.rows, w.closed, w.segment_ids) for w in assemble_windows(segs, p, window_rows=100)]
[(120, True, [0, 1, 2]), (80, False, [3, 4])]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..profile import Profile
from .state import DriftState
from .stats import DRIFT, DriftThresholds, evaluate

logger = logging.getLogger(__name__)

#: At most this many windows are listed by ``drift_view`` (the newest).
MAX_LISTED_WINDOWS = 50
COMPACTED = "compacted"
#: A segment holding the rows of windows too old to list: counted in the cumulative view only.
ARCHIVED = "archived"
#: Closed windows kept as windows; older ones are archived (see ``archive``).
KEEP_WINDOWS = 100


@dataclass
class Segment:
    """One flush of one worker's drift state."""

    worker: str
    first_ts: float
    last_ts: float
    rows: int
    state: dict[str, Any]
    id: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Segment:
        """From a stored row (a mapping with these fields, as ``Store.segments`` returns)."""
        return cls(worker=row["worker"], first_ts=row["first_ts"], last_ts=row["last_ts"],
                   rows=row["rows"], state=row["state"], id=row.get("id"))

    def as_row(self) -> dict[str, Any]:
        """The fields a store keeps (no id: the store assigns it)."""
        return {"worker": self.worker, "first_ts": self.first_ts, "last_ts": self.last_ts,
                "rows": self.rows, "state": self.state}


@dataclass
class Window:
    """A tumbling window of segments, merged. ``closed`` is False for the window still filling."""

    index: int
    start: float | None
    end: float | None
    rows: int
    closed: bool
    state: DriftState
    segment_ids: list[int | None] = field(default_factory=list)


def _order(seg: Segment) -> tuple[float, bool, float, int]:
    # By end time; a compacted segment goes first among equals so that re-assembling after
    # ``compact`` cuts the same windows.
    return (seg.last_ts, seg.worker != COMPACTED, seg.first_ts, -1 if seg.id is None else seg.id)


def assemble_windows(
    segments: Iterable[Segment],
    profile: Profile,
    window_rows: int | None = None,
    window_seconds: float | None = None,
    now: float | None = None,
) -> list[Window]:
    """Cut ``segments`` into tumbling windows, oldest first.

    Segments are ordered by ``last_ts`` and never split. By rows: a window closes as soon as it
    holds ``window_rows`` or more, i.e. at the first flush boundary at or after ``window_rows``, so
    a window may hold up to one segment's rows more than asked. By time: a segment belongs to the
    period ``floor(first_ts / window_seconds)``; the first segment of a later period closes the
    window, and a late segment of an earlier period joins the window being filled. With both, a
    window closes at whichever comes first. The last window is open unless it closed by rows, or
    ``now`` is given and lies past the end of its period. With neither, everything forms one open
    window. A segment written by ``compact`` is a closed window on its own; segments that sort
    before it but were not part of it (flushed late) join the next window. Segments of another
    profile (the model changed) are skipped.
    """
    if window_rows is not None and window_rows < 1:
        raise ValueError(f"window_rows must be >= 1, got {window_rows!r}")
    if window_seconds is not None and not window_seconds > 0:
        raise ValueError(f"window_seconds must be > 0, got {window_seconds!r}")
    profile_hash = profile.content_hash
    ordered = sorted((s for s in segments if s.rows > 0 and s.worker != ARCHIVED), key=_order)
    kept = [s for s in ordered if s.state.get("profile_hash") == profile_hash]
    if len(kept) < len(ordered):
        logger.warning("skipped %d drift segment(s) of another profile", len(ordered) - len(kept))

    windows: list[Window] = []
    current: list[Segment] = []
    period: int | None = None
    filled = 0  # rows in ``current``

    def close(closed: bool) -> None:
        state = DriftState.from_dict(current[0].state)
        for s in current[1:]:
            state = state.merge(DriftState.from_dict(s.state))
        windows.append(Window(
            index=len(windows),
            start=min(s.first_ts for s in current),
            end=max(s.last_ts for s in current),
            rows=sum(s.rows for s in current),
            closed=closed,
            state=state,
            segment_ids=[s.id for s in current],
        ))
        current.clear()

    for seg in kept:
        if seg.worker == COMPACTED:  # a closed window already
            # Rows flushed late (a worker's segment that ends before a window another process
            # already compacted) join the window being filled after it, not a tiny window of their own.
            late = list(current)
            current.clear()
            current.append(seg)
            close(True)
            current.extend(late)
            filled = sum(s.rows for s in late)
            if window_rows is not None and late and filled >= window_rows:
                close(True)
            continue
        if window_seconds is not None:
            p = math.floor(seg.first_ts / window_seconds)
            if current and period is not None and p > period:
                close(True)
            if not current:
                period = p
        current.append(seg)
        filled = seg.rows if len(current) == 1 else filled + seg.rows
        if window_rows is not None and filled >= window_rows:
            close(True)
    if current:
        ended = (window_seconds is not None and now is not None and period is not None
                 and now >= (period + 1) * window_seconds)
        close(ended)
    return windows


def drift_view(
    segments: Iterable[Segment],
    profile: Profile,
    window_rows: int | None = None,
    window_seconds: float | None = None,
    consecutive_windows_for_retrain: int = 3,
    thresholds: DriftThresholds | None = None,
    now: float | None = None,
    windows: Sequence[Window] | None = None,
) -> dict[str, Any]:
    """Everything a reader wants to know about drift, from the stored segments.

    ``windows``: the segments' windows when the caller has assembled them already (with the same
    settings), so they are not merged twice.

    ``current`` evaluates the open window, or the last closed one while the open window holds
    fewer than ``min_rows`` (``current_window`` says which); ``cumulative`` evaluates all rows;
    ``windows`` lists the newest ``MAX_LISTED_WINDOWS`` windows, oldest first.
    ``retrain_recommended`` is True once the last ``consecutive_windows_for_retrain`` closed
    windows all drifted; ``consecutive_drift_windows`` counts the closed windows drifting in a
    row up to the newest.
    """
    th = thresholds or DriftThresholds()
    if consecutive_windows_for_retrain < 1:
        raise ValueError("consecutive_windows_for_retrain must be >= 1")
    segments = list(segments)
    if windows is None:
        windows = assemble_windows(segments, profile, window_rows, window_seconds, now)
    archived = [DriftState.from_dict(s.state) for s in segments
                if s.worker == ARCHIVED and s.state.get("profile_hash") == profile.content_hash]
    if not windows and not archived:
        empty = DriftState.empty(profile)
        return {
            "current": evaluate(empty, profile, th),
            "current_window": None,
            "cumulative": evaluate(empty, profile, th),
            "windows": [],
            "retrain_recommended": False,
            "consecutive_drift_windows": 0,
        }
    evaluated: dict[int, dict[str, Any]] = {}

    def result(w: Window) -> dict[str, Any]:
        if w.index not in evaluated:
            evaluated[w.index] = evaluate(w.state, profile, th)
        return evaluated[w.index]

    if not windows:  # everything archived, nothing since
        return {
            "current": evaluate(DriftState.empty(profile), profile, th),
            "current_window": None,
            "cumulative": evaluate(_merged(archived, profile), profile, th),
            "windows": [],
            "retrain_recommended": False,
            "consecutive_drift_windows": 0,
        }
    closed = [w for w in windows if w.closed]
    current = windows[-1]
    if not current.closed and current.rows < th.min_rows and closed:
        current = closed[-1]
    streak = 0
    for w in reversed(closed):
        if result(w)["status"] != DRIFT:
            break
        streak += 1

    cumulative = _merged([*archived, *(w.state for w in windows)], profile)
    listed = []
    for w in windows[-MAX_LISTED_WINDOWS:]:
        r = result(w)
        per = [*r["features"], *([r["prediction"]] if r["prediction"] else [])]
        listed.append({
            "index": w.index,
            "start": w.start,
            "end": w.end,
            "rows": w.rows,
            "closed": w.closed,
            "status": r["status"],
            "features": {
                f["name"]: {"status": f["status"], "psi": f["psi"],
                            "p_value_corrected": f["p_value_corrected"]}
                for f in per
            },
        })
    return {
        "current": result(current),
        "current_window": {"index": current.index, "closed": current.closed},
        "cumulative": evaluate(cumulative, profile, th),
        "windows": listed,
        "retrain_recommended": streak >= consecutive_windows_for_retrain,
        "consecutive_drift_windows": streak,
    }


def status_changes(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed status between two ``evaluate`` results: features, "prediction" and
    "__overall__", each ``{"feature", "from", "to"}``. Nothing when ``previous`` is None (a first
    evaluation is no change)."""
    if previous is None:
        return []

    def statuses(r: dict[str, Any]) -> dict[str, str]:
        out = {f["name"]: f["status"] for f in r.get("features") or []}
        if r.get("prediction"):
            out["prediction"] = r["prediction"]["status"]
        out["__overall__"] = r["status"]
        return out

    before, after = statuses(previous), statuses(current)
    return [
        {"feature": name, "from": before.get(name), "to": status}
        for name, status in after.items()
        if before.get(name) != status
    ]


def compact(windows: Sequence[Window]) -> list[Segment]:
    """One segment (worker ``"compacted"``) per closed window, holding that window's rows, so that
    stored segments do not grow without bound. The caller stores each in place of the window's
    ``segment_ids``; the open window is left alone. Assembling again cuts the same windows."""
    return [
        Segment(COMPACTED, float(w.start), float(w.end), w.rows, w.state.to_dict())  # type: ignore[arg-type]
        for w in windows
        if w.closed
    ]


def _merged(states: Sequence[DriftState], profile: Profile) -> DriftState:
    out = DriftState.empty(profile)
    for st in states:
        out = out.merge(st)
    return out


def archive(segments: Sequence[Segment], windows: Sequence[Window],
            keep: int = KEEP_WINDOWS) -> tuple[Segment, list[int]] | None:
    """Fold the closed windows beyond the newest ``keep`` (and any earlier archive) into one
    ``ARCHIVED`` segment, so that reading drift costs the same after a month as after an hour.
    Returns the new segment and the ids it replaces, or None when there is nothing to fold.
    """
    closed = [w for w in windows if w.closed]
    old = closed[:-keep] if keep > 0 else closed
    if not old:
        return None
    previous = [s for s in segments if s.worker == ARCHIVED]
    parts = [DriftState.from_dict(s.state) for s in previous] + [w.state for w in old]
    state = parts[0]
    for st in parts[1:]:
        state = state.merge(st)
    ids = [i for s in previous for i in [s.id] if i is not None]
    ids += [i for w in old for i in w.segment_ids if i is not None]
    starts = [s.first_ts for s in previous] + [w.start for w in old if w.start is not None]
    ends = [s.last_ts for s in previous] + [w.end for w in old if w.end is not None]
    seg = Segment(ARCHIVED, min(starts), max(ends), state.rows, state.to_dict())
    return seg, ids
