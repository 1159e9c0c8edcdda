import numpy as np
import pandas as pd
import pytest

from guarded_serving.checks import FALLBACK, OK, REJECT, check_batch
from guarded_serving.errors import PayloadError
from guarded_serving.policy import Policy
from guarded_serving.profile import Profile, build_profile

from ._data import TARGET, features, holdout, train


@pytest.fixture(scope="module")
def profile() -> Profile:
    return build_profile(train(), TARGET)


def test_held_out_rows_from_the_training_population_pass(profile: Profile) -> None:
    v = check_batch(features(holdout()), profile)
    flagged = (v.status != OK).mean()
    assert flagged <= 0.01, f"{flagged:.2%} of in-distribution rows flagged"
    assert not v.problems


def _row(**changes):
    base = features(holdout()).iloc[[0]].reset_index(drop=True)
    for k, val in changes.items():
        base[k] = base[k].astype(object) if not isinstance(val, (int, float)) else base[k]
        base.loc[0, k] = val
    return base


def test_numeric_beyond_range_goes_to_fallback(profile: Profile) -> None:
    v = check_batch(_row(depth=90.0), profile)
    assert v.status.tolist() == [FALLBACK]
    assert "out_of_range:depth" in v.reasons()[0]


def test_range_margin_widens_the_range(profile: Profile) -> None:
    hi = profile.feature("table").max
    row = _row(table=hi * 1.01)
    assert "out_of_range:table" in check_batch(row, profile).reasons()[0]
    lenient = Policy(range_margin=0.5)
    assert "out_of_range:table" not in check_batch(row, profile, lenient).reasons()[0]


def test_unseen_category_goes_to_fallback(profile: Profile) -> None:
    v = check_batch(_row(cut="Excellent"), profile)
    assert v.status.tolist() == [FALLBACK]
    assert v.reasons()[0] == ["unseen_category:cut"]


def test_null_where_training_had_none(profile: Profile) -> None:
    v = check_batch(_row(color=None), profile)
    assert v.reasons()[0] == ["null_unseen:color"]
    v = check_batch(_row(depth=np.nan), profile)
    assert v.reasons()[0] == ["null_unseen:depth"]


def test_joint_outlier_with_every_value_in_range(profile: Profile) -> None:
    # A stone whose length is the largest seen but whose width is the smallest: each value was
    # seen in training, the combination never.
    x_max = profile.feature("x").quantiles["0.99"]
    y_min = profile.feature("y").quantiles["0.01"]
    v = check_batch(_row(x=x_max, y=y_min), profile)
    assert v.reasons()[0] == ["outlier"]
    assert v.outlier_scores is not None and v.outlier_scores[0] > profile.outlier.threshold(0.999)


def test_schema_violations_are_rejected_naming_row_and_column(profile: Profile) -> None:
    rows = features(holdout()).iloc[:3].to_dict(orient="records")
    rows[1]["carat"] = "heavy"
    rows[2]["cut"] = {"nested": True}
    v = check_batch(rows, profile)
    assert v.status.tolist() == [OK, REJECT, REJECT]
    problems = {(p.row, p.column): p for p in v.problems}
    assert problems[(1, "carat")].expected == "number" and problems[(1, "carat")].got == "heavy"
    assert (2, "cut") in problems


def test_missing_column_rejects_the_batch(profile: Profile) -> None:
    v = check_batch(features(holdout()).iloc[:4].drop(columns=["clarity"]), profile)
    assert (v.status == REJECT).all()
    assert [(p.problem, p.column) for p in v.problems] == [("missing column", "clarity")]


def test_missing_key_in_one_row(profile: Profile) -> None:
    rows = features(holdout()).iloc[:2].to_dict(orient="records")
    del rows[0]["x"]
    v = check_batch(rows, profile)
    assert v.status.tolist() == [REJECT, OK]
    assert (v.problems[0].row, v.problems[0].column, v.problems[0].problem) == (0, "x", "missing value")


def test_numbers_as_strings_are_coerced(profile: Profile) -> None:
    rows = features(holdout()).iloc[:1].to_dict(orient="records")
    rows[0]["carat"] = str(rows[0]["carat"])
    v = check_batch(rows, profile)
    assert v.status.tolist() == [OK]
    assert v.features["carat"].dtype == np.float64


def test_extra_columns_ignored_and_listed_or_rejected(profile: Profile) -> None:
    df = features(holdout()).iloc[:2].assign(note="hi")
    v = check_batch(df, profile)
    assert v.extra_columns == ["note"] and (v.status == OK).all()
    v = check_batch(df, profile, Policy(extra_columns="reject"))
    assert (v.status == REJECT).all() and v.problems[0].column == "note"


def test_integer_and_boolean_columns() -> None:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"i": rng.integers(0, 5, 300), "b": rng.random(300) > 0.5,
                       "y": rng.normal(size=300)})
    p = build_profile(df, "y")
    v = check_batch({"i": [1, 2.5, "3"], "b": [True, "false", "maybe"]}, p)
    assert v.status.tolist() == [OK, REJECT, REJECT]
    assert {(pr.row, pr.column) for pr in v.problems} == {(1, "i"), (2, "b")}
    assert "out_of_range:i" in check_batch({"i": [9], "b": [1]}, p).reasons()[0]


def test_bad_batch_shapes_raise_payload_errors(profile: Profile) -> None:
    with pytest.raises(PayloadError):
        check_batch([1, 2, 3], profile)
    with pytest.raises(PayloadError):
        check_batch({"carat": [1.0], "cut": ["Good", "Ideal"]}, profile)


def test_reason_counts(profile: Profile) -> None:
    df = pd.concat([_row(depth=90.0), _row(cut="Excellent"), _row(cut="Excellent")])
    assert check_batch(df, profile).reason_counts() == {
        "out_of_range:depth": 1, "outlier": 1, "unseen_category:cut": 2}


@pytest.mark.parametrize("policy", [Policy(), Policy(range_margin=0.1), Policy(check_nulls=False),
                                    Policy(outlier_quantile=None)], ids=["default", "margin", "no-nulls", "no-outlier"])
def test_json_rows_and_dataframes_get_the_same_verdicts(policy: Policy) -> None:
    # Rows of plain JSON numbers take a one-matrix path for the numeric columns; a DataFrame (and
    # any row with a non-number in a numeric column) is checked column by column. Same verdicts.
    rng = np.random.default_rng(11)
    n = 400
    train_df = pd.DataFrame({
        "a": rng.normal(size=n), "b": rng.uniform(0, 10, n), "k": rng.integers(0, 5, n),
        "c": rng.choice(["u", "v"], n), "opt": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        "y": rng.normal(size=n),
    })
    prof = build_profile(train_df, "y")
    assert prof.feature("k").kind == "integer" and prof.feature("opt").nullable
    live = pd.DataFrame({
        "a": rng.normal(scale=2.0, size=200), "b": rng.uniform(-2, 12, 200), "k": rng.integers(0, 7, 200),
        "c": rng.choice(["u", "v", "w"], 200), "opt": np.where(rng.random(200) < 0.3, np.nan, rng.normal(size=200)),
    })
    live.loc[3, "a"] = np.nan  # a null where training had none
    rows = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in live.astype(object).to_dict(orient="records")]
    plain = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]
    with_nan = [dict(r, a=float("nan") if r["a"] is None else r["a"],
                     opt=float("nan") if r["opt"] is None else r["opt"]) for r in plain]
    from guarded_serving.checks import _numeric_block, as_columns, plan_for

    plan = plan_for(prof, policy)
    assert _numeric_block(as_columns(with_nan)[0], plan) is not None
    assert _numeric_block(as_columns(plain)[0], plan) is None
    by_frame = check_batch(live, prof, policy)
    for batch in (plain, with_nan):  # None in a numeric column: per column; NaN: the matrix path
        by_rows = check_batch(batch, prof, policy)
        assert by_rows.status.tolist() == by_frame.status.tolist()
        assert by_rows.reasons() == by_frame.reasons()
        assert by_rows.flag_names == by_frame.flag_names
        for name in ("a", "b", "k", "opt"):
            np.testing.assert_array_equal(by_rows.columns[name], by_frame.columns[name])
        if policy.outlier_quantile is not None:
            np.testing.assert_allclose(by_rows.outlier_scores, by_frame.outlier_scores)
    assert (by_frame.status == FALLBACK).any() and (by_frame.status == OK).any()
    # One row alone takes a plain-Python path (a one-row request): the same verdict row by row.
    from guarded_serving.checks import _check_row

    expected_reasons = by_frame.reasons()
    for batch in (plain, with_nan):
        for i, row in enumerate(batch):
            one = check_batch([row], prof, policy)
            assert _check_row(row, prof, plan, policy) is not None
            assert one.status.tolist() == [by_frame.status[i]]
            assert one.reasons() == [expected_reasons[i]]
            for name in ("a", "b", "k", "opt", "c"):
                np.testing.assert_array_equal(one.columns[name], by_frame.columns[name][i:i + 1])
            if policy.outlier_quantile is not None:
                np.testing.assert_allclose(one.outlier_scores, by_frame.outlier_scores[i:i + 1])
    # Rows the plain path cannot read go to the columnar one, which names their problems.
    for odd in (dict(plain[0], k=1.5), dict(plain[0], a="1.5"), dict(plain[0], c=3),
                {k: v for k, v in plain[0].items() if k != "b"}, dict(plain[0], a=True)):
        assert _check_row(odd, prof, plan, policy) is None
        assert check_batch([odd], prof, policy).status.tolist() == check_batch([odd, plain[1]], prof, policy).status.tolist()[:1]
    # A fractional value for an integer feature is still named as a problem.
    bad = [dict(plain[0], k=1.5), plain[1]]
    v = check_batch(bad, prof, policy)
    assert [(p.row, p.column) for p in v.problems] == [(0, "k")] and v.status.tolist()[0] == REJECT


# -- datetimes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dated() -> Profile:
    rng = np.random.default_rng(8)
    n = 500
    df = pd.DataFrame({
        "when": pd.date_range("2020-01-01", periods=n, freq="D"),
        "at": pd.date_range("2020-01-01", periods=n, freq="h", tz="Europe/Paris")[rng.permutation(n)],
        "x": rng.normal(size=n),
        "y": rng.normal(size=n),
    })
    return build_profile(df, "y")


def test_datetime_range_and_nulls_and_schema(dated: Profile) -> None:
    assert dated.feature("when").kind == "datetime" and dated.feature("when").timezone is None
    assert dated.feature("at").timezone == "Europe/Paris"
    rows = [
        {"when": "2020-06-01", "at": "2020-01-05T10:00:00+01:00", "x": 0.0},  # fine
        {"when": "2024-06-01T12:00:00", "at": "2020-01-05T09:00:00Z", "x": 0.0},  # after training
        {"when": None, "at": "2020-01-05T10:00:00+01:00", "x": 0.0},  # a null date
        {"when": "last tuesday", "at": "2020-01-05T10:00:00+01:00", "x": 0.0},  # not a date
        {"when": "2020-06-01T00:00:00+00:00", "at": "2020-01-05T10:00:00", "x": 0.0},  # aware/naive swapped
        {"when": 1590969600, "at": "2020-01-05T10:00:00+01:00", "x": 0.0},  # a number is not a date
    ]
    v = check_batch(rows, dated)
    assert v.status.tolist() == [OK, FALLBACK, FALLBACK, REJECT, REJECT, REJECT]
    # A datetime that is not a time index is in the outlier score too.
    assert v.reasons()[1] == ["out_of_range:when", "outlier"] and v.reasons()[2] == ["null_unseen:when"]
    problems = {(p.row, p.column): p for p in v.problems}
    assert set(problems) == {(3, "when"), (4, "when"), (4, "at"), (5, "when")}
    assert problems[(3, "when")].problem == "cannot convert" and problems[(3, "when")].got == "last tuesday"
    assert problems[(3, "when")].expected == "ISO 8601 datetime without a time zone"
    assert problems[(4, "when")].problem == "time-zone-aware datetime where training had naive ones"
    assert problems[(4, "at")].problem == "naive datetime where training had time-zone-aware ones"
    # A datetime feature's own margin widens its range like a number's.
    wide = Policy.from_dict({"features": {"when": {"range": 5.0}}})
    assert check_batch(rows[:2], dated, wide).reasons()[1] == ["outlier"]
    # Another zone, the same instant: in range, and read as that instant.
    assert v.columns["at"][0] == v.columns["at"][1] == pd.Timestamp("2020-01-05T09:00Z").timestamp()


def test_datetime_rows_and_frames_agree(dated: Profile) -> None:
    frame = pd.DataFrame({
        "when": pd.to_datetime(["2020-03-01", "2031-01-01", None]),
        "at": pd.to_datetime(["2020-01-02T00:00Z"] * 3).tz_convert("Asia/Tokyo"),
        "x": [0.0, 0.0, 0.0],
    })
    by_frame = check_batch(frame, dated)
    rows = [{"when": None if pd.isna(w) else w.isoformat(), "at": a.isoformat(), "x": 0.0}
            for w, a in zip(frame.when, frame["at"], strict=True)]
    big = rows * 40  # past the few-rows parser, through pandas
    for batch in (rows, big):
        v = check_batch(batch, dated)
        assert v.reasons() == by_frame.reasons() * (len(batch) // 3)
        np.testing.assert_array_equal(v.columns["when"], np.tile(by_frame.columns["when"], len(batch) // 3))
    assert by_frame.reasons() == [[], ["out_of_range:when", "outlier"], ["null_unseen:when"]]
    # A naive frame column where training was aware is a schema problem for every row.
    naive = frame.assign(at=frame["at"].dt.tz_localize(None))
    v = check_batch(naive, dated)
    assert (v.status == REJECT).all() and {p.column for p in v.problems} == {"at"}
    # Models that take a DataFrame get datetimes back, in the training zone.
    feats = by_frame.features
    assert str(feats["at"].dt.tz) == "Europe/Paris" and feats["when"].dt.tz is None
    assert feats["when"].iloc[0] == pd.Timestamp("2020-03-01")


def test_a_date_that_is_not_a_date_is_a_422_schema_error(dated: Profile) -> None:
    from guarded_serving.errors import SchemaError
    from guarded_serving.guard import GuardedModel
    from guarded_serving.service import STATUS_BY_CODE

    class Mean:
        task, name, version, classes = "regression", "mean", "1", None

        def predict(self, data: pd.DataFrame):
            from guarded_serving.adapters.base import Prediction

            assert data["when"].dtype.kind == "M"  # a DataFrame model sees datetimes
            return Prediction(np.zeros(len(data)))

    gm = GuardedModel(Mean(), Mean(), dated, None, None, "t")
    ok = gm.predict([{"when": "2020-06-01", "at": "2020-01-05T10:00:00+01:00", "x": 0.0}])
    assert ok.routes.tolist() == ["primary"]
    with pytest.raises(SchemaError) as e:
        gm.predict([{"when": "2020-06-01", "at": "2020-01-05T10:00:00+01:00", "x": 0.0},
                    {"when": "soon", "at": "2020-01-05T10:00:00+01:00", "x": 0.0}])
    assert STATUS_BY_CODE[e.value.code] == 422
    assert [(p.row, p.column, p.got) for p in e.value.problems] == [(1, "when", "soon")]


def test_categorical_codes_come_with_the_unseen_category_check(profile) -> None:  # noqa: ANN001
    cats = list(profile.feature("cut").categories)
    base = features(holdout()).iloc[0].to_dict()
    rows = [{**base, "cut": c} for c in [cats[1], None, "Flawless", cats[0], cats[1]]]
    v = check_batch(rows, profile)
    coded = v.codes["cut"]
    assert coded.codes.tolist() == [1, -1, -1, 0, 1] and coded.categories == tuple(cats)
    assert coded.values is v.columns["cut"]
