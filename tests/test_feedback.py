"""Outcomes: parsed into typed items, checked against the profile's target."""

from __future__ import annotations

import pytest

from guarded_serving.errors import PayloadError, SchemaError
from guarded_serving.feedback import FeedbackRequest, OutcomeItem, OutcomeRule, parse_feedback
from guarded_serving.profile import Profile

from ._data import EXAMPLE


def test_both_shapes_parse_to_items() -> None:
    a = parse_feedback({"request_id": "r1", "outcomes": [1.0, 2.0]})
    b = parse_feedback({"items": [{"request_id": "r1", "row": 0, "outcome": 1.0},
                                  {"request_id": "r1", "row": 1, "outcome": 2.0}], "overwrite": True})
    assert a.items == b.items == (OutcomeItem("r1", 0, 1.0), OutcomeItem("r1", 1, 2.0))
    assert b.overwrite and not a.overwrite
    assert a.as_tuples() == [("r1", 0, 1.0), ("r1", 1, 2.0)]


@pytest.mark.parametrize("body", [
    [], {"request_id": "r1"}, {"request_id": "r1", "outcomes": []}, {"request_id": "\ud800", "outcomes": [1]},
    {"request_id": "a b", "outcomes": [1]}, {"items": [{"request_id": "r", "row": -1, "outcome": 1}]},
    {"items": [{"request_id": "r", "row": 10**400, "outcome": 1}]}, {"items": [{"request_id": "r", "row": 0}]},
    {"request_id": "r1", "outcomes": [1], "overwrite": "yes"}, {"request_id": "r1", "outcomes": [1], "extra": 1},
    {"request_id": "r1", "outcomes": [1], "items": []},
])
def test_malformed_bodies_are_payload_errors(body) -> None:
    with pytest.raises(PayloadError):
        parse_feedback(body, max_rows=1000)


def test_regression_outcomes_are_finite_and_plausible() -> None:
    rule = OutcomeRule.from_profile(Profile.load(EXAMPLE / "profile.json"))  # price 326..9182
    assert rule.low is not None and rule.high is not None and rule.low < 326 and rule.high > 9182
    req = parse_feedback({"request_id": "r", "outcomes": [1500, 1e200, 10**400, "1500", True, None, -1e9, 9000.5]})
    bad = {p.row: p.problem for p in rule.problems(req.items)}
    assert set(bad) == {1, 2, 3, 4, 5, 6}
    assert "plausible" in bad[1] and "range" in bad[2] and "number" in bad[3]
    with pytest.raises(SchemaError) as e:
        rule.check(req)
    assert e.value.problems[0].expected.startswith("a number between")
    assert OutcomeRule.from_profile(Profile.load(EXAMPLE / "profile.json"), margin=None).problems(
        (OutcomeItem("r", 0, 1e200),)) == []


def test_classification_outcomes_are_classes_of_the_same_type() -> None:
    rule = OutcomeRule(task="classification", classes=(0, 1))
    items = FeedbackRequest(tuple(OutcomeItem("r", i, v) for i, v in enumerate([0, 1, "yes", "1", True, 2, 1.0, None])))
    assert [p.row for p in rule.problems(items.items)] == [2, 3, 4, 5, 7]
    labels = OutcomeRule(task="classification", classes=("no", "yes"))
    assert [p.row for p in labels.problems((OutcomeItem("r", 0, "yes"), OutcomeItem("r", 1, 1)))] == [1]
