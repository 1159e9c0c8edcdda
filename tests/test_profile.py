import json

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
