import json
from datetime import UTC

import numpy as np
import pandas as pd
import pytest

from guarded_serving.errors import ProfileError
from guarded_serving.profile import Profile, build_profile

from ._data import EXAMPLE, TARGET, train


@pytest.fixture(scope="module")
def profile() -> Profile:
    return build_profile(train(), TARGET)


def test_profile_describes_every_feature(profile: Profile) -> None:
    df = train()
    assert profile.feature_names == [c for c in df.columns if c != TARGET]
    assert profile.task == "regression"
    carat = profile.feature("carat")
    assert carat.kind == "numeric"
    assert carat.min == df.carat.min() and carat.max == df.carat.max()
    assert sum(carat.bin_counts) == len(df)
    assert carat.bin_edges[0] == carat.min and carat.bin_edges[-1] == carat.max
    cut = profile.feature("cut")
    assert cut.kind == "categorical"
    assert cut.categories == df.cut.value_counts().to_dict()
    assert not cut.nullable
    assert profile.outlier is not None and set(profile.outlier.columns) == {"carat", "depth", "table", "x", "y", "z"}
    assert profile.target_profile is not None and profile.target_profile.min == df.price.min()


def test_round_trip_keeps_content_and_hash(profile: Profile, tmp_path) -> None:
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    assert json.loads(path.read_text())["content_hash"].startswith("sha256:")


def test_example_profile_has_predictions_and_baseline() -> None:
    p = Profile.load(EXAMPLE / "profile.json")
    assert p.prediction_profile is not None and p.prediction_profile.kind == "numeric"
    assert set(p.baseline) == {"primary", "fallback"}
    assert p.baseline["primary"]["mae"] < p.baseline["fallback"]["mae"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=0), "version 0 is not supported"),
        (lambda d: d.update(format="other"), "not a guarded-serving profile"),
        (lambda d: d["features"][0].update(max=1e9), "content hash does not match"),
        (lambda d: d.pop("features"), "lacks required key"),
    ],
)
def test_bad_profiles_are_refused_with_a_reason(profile: Profile, tmp_path, edit, message) -> None:
    d = profile.to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=message):
        Profile.load(path)


def test_not_json_and_missing_file(tmp_path) -> None:
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(tmp_path / "x.json")
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")


def test_kinds_nulls_and_booleans() -> None:
    rng = np.random.default_rng(0)
    n = 500
    df = pd.DataFrame({
        "f": rng.normal(size=n),
        "i": rng.integers(0, 5, n),
        "b": rng.random(n) > 0.5,
        "c": rng.choice(["a", "b"], n),
        "y": rng.integers(0, 2, n),
    })
    df.loc[::10, "f"] = np.nan
    p = build_profile(df, "y")
    assert [p.feature(c).kind for c in "fibc"] == ["numeric", "integer", "boolean", "categorical"]
    assert p.feature("f").nullable and p.feature("f").null_count == 50
    assert set(p.feature("b").categories) == {"True", "False"}
    assert p.task == "classification"


def test_unknown_target_and_durations_are_clear_errors() -> None:
    df = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=3), "y": [1.0, 2.0, 3.0]})
    with pytest.raises(ProfileError, match="target column 'nope'"):
        build_profile(df, "nope")
    with pytest.raises(ProfileError, match="timedelta"):
        build_profile(df.assign(t=df.t - df.t.min()), "y")


# -- the types real tables bring -----------------------------------------------------------------


def test_nullable_integers_and_booleans() -> None:
    from guarded_serving.checks import FALLBACK, OK, check_batch

    df = pd.DataFrame({
        "n": pd.array([1, 2, None, 4] * 50, dtype="Int64"),
        "flag": pd.array([True, False, None, True] * 50, dtype="boolean"),
        "y": np.arange(200.0),
    })
    p = build_profile(df, "y")
    assert p.feature("n").kind == "integer" and p.feature("n").null_count == 50 and p.feature("n").max == 4
    assert p.feature("flag").kind == "boolean" and p.feature("flag").categories == {"True": 100, "False": 50}
    live = pd.DataFrame({"n": pd.array([2, None, 9], dtype="Int64"),
                         "flag": pd.array([None, False, True], dtype="boolean")})
    v = check_batch(live, p)
    assert v.status.tolist() == [OK, OK, FALLBACK] and "out_of_range:n" in v.reasons()[2]
    assert np.isnan(v.columns["n"][1]) and v.columns["flag"].tolist() == [None, "False", "True"]


def test_categorical_with_thousands_of_values_keeps_the_top_and_an_other_bucket(tmp_path) -> None:
    from guarded_serving.checks import OK, check_batch
    from guarded_serving.drift.state import DriftState
    from guarded_serving.drift.stats import evaluate

    rng = np.random.default_rng(2)
    n = 20_000
    ids = np.where(rng.random(n) < 0.5, rng.choice(["a", "b", "c"], n),
                   np.char.add("user-", rng.integers(0, 5000, n).astype(str)))
    df = pd.DataFrame({"who": ids, "y": rng.normal(size=n)})
    p = build_profile(df, "y", max_categories=50)
    who = p.feature("who")
    # Only values frequent for a reason are kept apart: the thousands of rare ids are "other"
    # (the most frequent of them are so by chance and would look like drift in fresh data).
    assert set(who.categories) == {"a", "b", "c"} and who.categories_truncated
    assert sum(who.categories.values()) + who.other_count == n
    p.save(tmp_path / "p.json")
    assert (tmp_path / "p.json").stat().st_size < 10_000
    assert Profile.load(tmp_path / "p.json").feature("who").other_count == who.other_count
    # A value beyond the kept ones may have been seen in training: not flagged.
    assert check_batch({"who": ["user-never-seen", "a"]}, p).status.tolist() == [OK, OK]
    # Drift counts such values as "other", against training's share of them.
    state = DriftState.empty(p)
    fresh = np.where(rng.random(2000) < 0.5, rng.choice(["a", "b", "c"], 2000),
                     np.char.add("user-", rng.integers(0, 5000, 2000).astype(str)))
    state.update({"who": np.array(fresh, dtype=object)}, now=0.0)
    f = evaluate(state, p)["features"][0]
    assert f["buckets"][-2] == "(other)" and f["status"] == "ok"
    assert abs(f["expected"][-2] - who.other_count / n) < 1e-9


def test_constant_columns_are_profiled_without_dividing_by_zero() -> None:
    from guarded_serving.checks import OK, check_batch
    from guarded_serving.drift.state import DriftState
    from guarded_serving.drift.stats import evaluate
    from guarded_serving.fallback import FallbackTrainer

    rng = np.random.default_rng(3)
    n = 300
    df = pd.DataFrame({"k": 7.0, "c": "same", "t": pd.Timestamp("2024-01-01"), "x": rng.normal(size=n),
                       "y": rng.normal(size=n)})
    with np.errstate(all="raise"):
        p = build_profile(df, "y")
    k = p.feature("k")
    assert (k.min, k.max, k.std) == (7.0, 7.0, 0.0) and len(k.bin_counts) == 1
    assert p.outlier is not None and p.outlier.columns == ["x"]
    v = check_batch({"k": [7.0, 8.0], "c": ["same", "same"], "t": ["2024-01-01", "2024-01-01"], "x": [0.0, 0.0]}, p)
    assert v.status.tolist()[0] == OK and v.reasons()[1] == ["out_of_range:k"]
    state = DriftState.empty(p)
    state.update(dict(df.drop(columns="y").iloc[:250].items()), now=0.0)
    assert evaluate(state, p)["status"] == "ok"
    fb = FallbackTrainer().fit(df, "y")
    assert np.isfinite(fb.predict_frame(df.drop(columns="y"))).all()


def test_a_numeric_column_with_a_few_strings_stays_numeric_and_names_them(caplog) -> None:
    from guarded_serving.checks import OK, REJECT, check_batch
    from guarded_serving.fallback import FallbackTrainer

    rng = np.random.default_rng(6)
    n = 1000
    price = rng.uniform(1, 100, n).round(2).astype(object)
    price[[3, 10, 500]] = ["n/a", "n/a", "call us"]
    df = pd.DataFrame({"price": price, "y": rng.normal(size=n)})
    p = build_profile(df, "y")
    f = p.feature("price")
    assert f.kind == "numeric" and f.count == n - 3 and f.null_count == 0
    assert f.invalid_count == 3 and f.invalid_values == {"n/a": 2, "call us": 1}
    assert "price" in caplog.text and "n/a" in caplog.text
    # In-distribution numbers pass (as numbers, not as unseen categories); the strings are named.
    v = check_batch({"price": [12.5, "40", "n/a"]}, p)
    assert v.status.tolist() == [OK, OK, REJECT]
    assert [(x.row, x.column, x.got) for x in v.problems] == [(2, "price", "n/a")]
    assert FallbackTrainer().fit(df, "y").numeric_ == ["price"]
    # Forced categorical, when the numbers really are codes.
    forced = build_profile(df, "y", categorical=["price"])
    assert forced.feature("price").kind == "categorical"
    assert FallbackTrainer().fit(df, "y", categorical=["price"]).categorical_ == ["price"]
    # A column that is mostly text stays categorical.
    words = df.assign(price=np.where(np.arange(n) % 3 == 0, "cheap", df.price.astype(str)))
    assert build_profile(words, "y").feature("price").kind == "categorical"


def test_cli_profile_reports_stray_strings_and_takes_categorical(tmp_path, capsys) -> None:
    from guarded_serving.cli import main

    (tmp_path / "d.csv").write_text("code,price,y\n" + "".join(
        f"{i % 7},{'oops' if i == 5 else i * 1.5},{i}\n" for i in range(100)))
    assert main(["profile", str(tmp_path / "d.csv"), "--target", "y", "--out", str(tmp_path / "p.json"),
                 "--categorical", "code"]) == 0
    err = capsys.readouterr().err
    assert "column 'price' is numeric: 1 value(s) that are not numbers" in err and "'oops' (1)" in err
    p = Profile.load(tmp_path / "p.json")
    assert p.feature("code").kind == "categorical" and p.feature("price").kind == "numeric"
    assert main(["profile", str(tmp_path / "d.csv"), "--target", "y", "--out", str(tmp_path / "q.json"),
                 "--categorical", "nope"]) == 2
    assert "--categorical names columns that are not features: ['nope']" in capsys.readouterr().err


def test_old_profiles_load_and_keep_their_hash() -> None:
    d = json.loads((EXAMPLE / "profile.json").read_text())
    assert d["version"] == 1
    p = Profile.from_dict(d)
    assert p.time_index == [] and all(f.other_count == 0 and f.timezone is None for f in p.features)
    # Written back in its own version, so drift states that name its hash still match it.
    assert p.content_hash == d["content_hash"] and p.to_dict() == d


def test_new_profiles_are_version_2_with_a_time_index(tmp_path) -> None:
    df = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=50, freq="D", tz="UTC"),
                       "x": np.arange(50.0), "y": np.arange(50.0)})
    p = build_profile(df, "y", time_index=["t"])
    p.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["version"] == 2 and d["time_index"] == ["t"]
    assert d["features"][0]["min_time"] == "2024-01-01T00:00:00+00:00" and d["features"][0]["timezone"] == "UTC"
    assert Profile.load(tmp_path / "p.json").to_dict() == d
    d["time_index"] = ["nope"]
    from guarded_serving.profile import content_hash

    d["content_hash"] = content_hash(d)
    with pytest.raises(ProfileError, match="time_index names columns that are not features"):
        Profile.from_dict(d)


def test_datetime_training_columns_from_text_and_their_problems() -> None:
    df = pd.DataFrame({"t": ["2024-01-01", "2024-02-01T10:00:00", None], "y": [1.0, 2.0, 3.0]})
    p = build_profile(df, "y")
    assert p.feature("t").kind == "datetime" and p.feature("t").null_count == 1
    mixed = df.assign(t=["2024-01-01", "2024-02-01T10:00:00+02:00", None])
    with pytest.raises(ProfileError, match="mixes naive and time-zone-aware") as e:
        build_profile(mixed, "y")
    assert (e.value.problems[0].row, e.value.problems[0].column) == (0, "t")
    from datetime import datetime

    objs = df.assign(t=[datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2), None])
    with pytest.raises(ProfileError, match="mixes naive"):
        build_profile(objs, "y")


def test_no_outlier_and_time_index_columns_are_left_out_of_the_outlier_model() -> None:
    rng = np.random.default_rng(7)
    n = 400
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "year": rng.integers(2000, 2010, n),
                       "y": rng.normal(size=n)})
    assert build_profile(df, "y").outlier.columns == ["a", "b", "year"]
    assert build_profile(df, "y", no_outlier=["b"], time_index=["year"]).outlier.columns == ["a"]
    with pytest.raises(ProfileError, match="--no-outlier names columns that are not features"):
        build_profile(df, "y", no_outlier=["y"])
