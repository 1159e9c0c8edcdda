"""Outcomes sent back for logged rows: parsed into typed items, then checked against the profile.

A regression outcome must be a finite number within a plausible range of the training target
(its [min, max] widened by ``margin`` times its range on each side); a classification outcome
must be one of the model's classes, of the same type (``1`` is not ``"1"`` nor ``true``). A
wrong outcome is a 422 whether or not the row already has one stored.

>>> req = parse_feedback({"request_id": "abc", "outcomes": [1200.0, 1e9]})
>>> rule = OutcomeRule(task="regression", low=0.0, high=20000.0)
>>> [p.row for p in rule.problems(req.items)]
[1]
>>> OutcomeRule(task="classification", classes=(0, 1)).problems(
...     parse_feedback({"items": [{"request_id": "a", "row": 0, "outcome": "yes"}]}).items)[0].problem
'outcome is not one of the classes'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import PayloadError, Problem, SchemaError

#: Request ids this service issues or accepts (``X-Request-ID``); any other id is unknown.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Default widening of the training target's range for plausible regression outcomes.
OUTCOME_RANGE_MARGIN = 5.0


@dataclass(frozen=True)
class OutcomeItem:
    """The true outcome of row ``row`` of request ``request_id``."""

    request_id: str
    row: int
    outcome: Any

    def as_tuple(self) -> tuple[str, int, Any]:
        return (self.request_id, self.row, self.outcome)


@dataclass(frozen=True)
class FeedbackRequest:
    """A parsed /feedback body: its items and whether stored outcomes may be replaced."""

    items: tuple[OutcomeItem, ...]
    overwrite: bool = False

    def as_tuples(self) -> list[tuple[str, int, Any]]:
        """``(request_id, row, outcome)`` per item, as ``ServingRuntime.feedback`` takes them."""
        return [it.as_tuple() for it in self.items]


def parse_feedback(body: Any, max_rows: int | None = None) -> FeedbackRequest:
    """A /feedback body in either shape, ``{"request_id", "outcomes": [...]}`` or
    ``{"items": [{"request_id", "row", "outcome"}, ...]}``; PayloadError naming what is wrong.
    ``max_rows`` bounds row indexes (no request has more rows)."""
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object with request_id and outcomes, or items")
    unknown = sorted(set(body) - {"request_id", "outcomes", "items", "overwrite"})
    if unknown:
        raise PayloadError(f"unknown key(s) {unknown}; a feedback body has request_id and outcomes, "
                           "or items, and optionally overwrite")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise PayloadError("overwrite must be true or false")
    problems: list[Problem] = []
    items: list[OutcomeItem] = []
    if "items" in body and ("request_id" in body or "outcomes" in body):
        raise PayloadError('give either "request_id" and "outcomes", or "items", not both')
    if "items" in body:
        raw = body["items"]
        if not isinstance(raw, list) or not raw:
            raise PayloadError("items must be a non-empty list of {request_id, row, outcome}")
        for i, it in enumerate(raw):
            if not isinstance(it, dict) or set(it) != {"request_id", "row", "outcome"}:
                problems.append(Problem(problem="item must be an object with exactly request_id, row "
                                                "and outcome", row=i, column="items"))
                continue
            bad = _id_problem(it["request_id"], i) or _row_problem(it["row"], i, max_rows)
            if bad:
                problems.append(bad)
            else:
                items.append(OutcomeItem(it["request_id"], it["row"], it["outcome"]))
    elif "request_id" in body and "outcomes" in body:
        rid, outcomes = body["request_id"], body["outcomes"]
        bad = _id_problem(rid, None)
        if bad:
            problems.append(bad)
        elif not isinstance(outcomes, list) or not outcomes:
            problems.append(Problem(problem="outcomes must be a non-empty list, one per row of the request",
                                    column="outcomes"))
        elif max_rows is not None and len(outcomes) > max_rows:
            problems.append(Problem(problem=f"more outcomes than a request can have rows ({max_rows})",
                                    column="outcomes", got=len(outcomes)))
        else:
            items = [OutcomeItem(rid, i, o) for i, o in enumerate(outcomes)]
    else:
        raise PayloadError('the body must have "request_id" and "outcomes", or "items"')
    if problems:
        raise PayloadError(f"{len(problems)} malformed feedback item(s)", problems)
    return FeedbackRequest(tuple(items), overwrite)


def _id_problem(rid: Any, i: int | None) -> Problem | None:
    if isinstance(rid, str) and REQUEST_ID.match(rid):
        return None
    return Problem(problem="request_id must be an id this service issued (letters, digits and ._:-, "
                           "at most 128)", row=i, column="request_id",
                   got=repr(rid)[:80] if not isinstance(rid, str) else rid.encode("utf-8", "backslashreplace").decode()[:80])


def _row_problem(row: Any, i: int, max_rows: int | None) -> Problem | None:
    if isinstance(row, int) and not isinstance(row, bool) and row >= 0 and (max_rows is None or row < max_rows):
        return None
    bound = f" below {max_rows}" if max_rows is not None else ""
    return Problem(problem=f"row must be a row index (an integer >= 0{bound})", row=i, column="row",
                   got=repr(row)[:80])


@dataclass(frozen=True)
class OutcomeRule:
    """What an outcome may be: a number in [low, high] (regression; None: unbounded), or one of
    ``classes`` of the same type (classification)."""

    task: str
    low: float | None = None
    high: float | None = None
    classes: tuple[Any, ...] | None = None

    @classmethod
    def from_profile(cls, profile: Any, classes: list[Any] | None = None,
                     margin: float | None = OUTCOME_RANGE_MARGIN) -> OutcomeRule:
        """The rule of a ``Profile``: the target's range widened by ``margin`` (None: any finite
        number); ``classes`` as the model gives them, else the target's categories."""
        target = getattr(profile, "target_profile", None)
        if profile.task == "regression":
            if margin is None or target is None or target.min is None or target.max is None:
                return cls("regression")
            span = (target.max - target.min) or max(abs(target.max), 1.0)
            return cls("regression", target.min - margin * span, target.max + margin * span)
        if classes is None and target is not None and target.categories:
            classes = [_typed(c) for c in target.categories]
        return cls("classification", classes=tuple(classes) if classes is not None else None)

    def expected(self) -> str:
        if self.task == "regression":
            if self.low is None or self.high is None:
                return "a finite number"
            return f"a number between {self.low:.6g} and {self.high:.6g}"
        if self.classes is None:
            return "a class label (string, integer or boolean)"
        return f"one of {list(self.classes)}"

    def problems(self, items: tuple[OutcomeItem, ...] | list[OutcomeItem]) -> list[Problem]:
        """A Problem per item whose outcome breaks the rule (row: the item's row)."""
        out = []
        for it in items:
            why = self._why(it.outcome)
            if why:
                out.append(Problem(problem=why, row=it.row, column="outcome", expected=self.expected(),
                                   got=_shown(it.outcome)))
        return out

    def check(self, request: FeedbackRequest) -> None:
        """Raise SchemaError (422) listing every outcome that breaks the rule."""
        problems = self.problems(request.items)
        if problems:
            raise SchemaError(f"{len(problems)} outcome(s) are not valid for this model", problems)

    def _why(self, v: Any) -> str | None:
        if self.task == "regression":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return "outcome must be a number"
            try:
                x = float(v)
            except OverflowError:
                return "outcome is out of range"
            if not math.isfinite(x):
                return "outcome must be a finite number"
            if (self.low is not None and x < self.low) or (self.high is not None and x > self.high):
                return "outcome is outside the plausible range of the training target"
            return None
        if v is None or isinstance(v, (dict, list)) or (isinstance(v, float) and not v.is_integer()):
            return "outcome must be a class label"
        if self.classes is None:
            return None
        if not any(_same_class(v, c) for c in self.classes):
            return "outcome is not one of the classes"
        return None


def _same_class(v: Any, c: Any) -> bool:
    if isinstance(c, bool) or isinstance(v, bool):
        return isinstance(c, bool) and isinstance(v, bool) and v == c
    if isinstance(c, (int, float)):
        return isinstance(v, (int, float)) and v == c
    return isinstance(v, str) and v == str(c)


def _typed(label: str) -> Any:
    """A class label from a profile's category key (stored as text) back to its type."""
    if label in ("True", "False"):
        return label == "True"
    if re.fullmatch(r"-?\d+", label):
        return int(label)
    return label


def _shown(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode()[:80]
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of {len(str(abs(v)))} digits"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (int, float, bool)) or v is None else repr(v)[:80]
