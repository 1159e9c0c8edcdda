"""Per-feature policy: validation (policy.py) and each switch as the checks and drift apply it."""

import numpy as np
import pandas as pd
import pytest
import yaml

from guarded_serving.checks import OK, check_batch
from guarded_serving.config import load_config
from guarded_serving.drift.state import DriftState
from guarded_serving.drift.stats import DriftThresholds, evaluate
from guarded_serving.errors import ConfigError
from guarded_serving.policy import Policy
from guarded_serving.profile import Profile, build_profile

from ._data import CONFIG, EXAMPLE


@pytest.fixture(scope="module")
def profile() -> Profile:
    rng = np.random.default_rng(5)
    n = 2000
    a = rng.normal(size=n)
    df = pd.DataFrame(
        {
            "a": a,
            "b": a + rng.normal(scale=0.1, size=n),  # strongly correlated with a
            "u": rng.uniform(0, 10, n),
            "c": rng.choice(["x", "y"], n),
            "y": rng.normal(size=n),
        }
    )
    return build_profile(df, "y")


def _rows(**cols):
    base = {"a": [0.0], "b": [0.0], "u": [5.0], "c": ["x"]}
    base.update({k: [v] for k, v in cols.items()})
    return base


def _policy(**features) -> Policy:
    return Policy.from_dict({"features": features})


def test_range_check_ignore_and_own_margin(profile: Profile) -> None:
    hi, lo = profile.feature("u").max, profile.feature("u").min
    beyond = hi + 0.05 * (hi - lo)  # 5% of the range beyond the maximum
    assert check_batch(_rows(u=beyond), profile).reasons()[0] == ["out_of_range:u"]
    assert check_batch(
        _rows(u=beyond), profile, _policy(u={"range": "ignore"})
    ).status.tolist() == [OK]
    assert check_batch(_rows(u=beyond), profile, _policy(u={"range": 0.1})).status.tolist() == [OK]
    assert check_batch(_rows(u=beyond), profile, _policy(u={"range": 0.01})).reasons()[0] == [
        "out_of_range:u"
    ]
    # "check" restores the global margin for a feature a time index would exempt.
    wide = Policy.from_dict(
        {"range_margin": 0.1, "features": {"u": {"range": "check"}}}, time_index="u"
    )
    assert check_batch(_rows(u=beyond), profile, wide).status.tolist() == [OK]
    assert check_batch(_rows(u=hi + 0.2 * (hi - lo)), profile, wide).reasons()[0] == [
        "out_of_range:u"
    ]
    # The own margin of one feature leaves the others at the global margin.
    both = check_batch(
        _rows(u=beyond, a=profile.feature("a").max + 1.0), profile, _policy(u={"range": 0.1})
    )
    assert "out_of_range:a" in both.reasons()[0] and "out_of_range:u" not in both.reasons()[0]


def test_json_rows_take_the_same_per_feature_ranges(profile: Profile) -> None:
    # Plain JSON numbers are checked as one matrix; the per-feature bounds must hold there too.
    hi, lo = profile.feature("u").max, profile.feature("u").min
    rows = [{"a": 0.0, "b": 0.0, "u": hi + 0.05 * (hi - lo), "c": "x"}]
    assert check_batch(rows, profile, _policy(u={"range": 0.1})).status.tolist() == [OK]
    assert check_batch(rows, profile, _policy(u={"range": "ignore"})).status.tolist() == [OK]
    assert check_batch(rows, profile).reasons()[0] == ["out_of_range:u"]


def test_categories_switch(profile: Profile) -> None:
    assert check_batch(_rows(c="z"), profile).reasons()[0] == ["unseen_category:c"]
    assert check_batch(
        _rows(c="z"), profile, _policy(c={"categories": "ignore"})
    ).status.tolist() == [OK]
    off = Policy.from_dict({"check_categories": False, "features": {"c": {"categories": "check"}}})
    assert check_batch(_rows(c="z"), profile, off).reasons()[0] == ["unseen_category:c"]


def test_nulls_switch(profile: Profile) -> None:
    assert check_batch(_rows(u=None), profile).reasons()[0] == ["null_unseen:u"]
    assert check_batch(_rows(u=None), profile, _policy(u={"nulls": "ignore"})).status.tolist() == [
        OK
    ]
    assert check_batch(_rows(c=None), profile, _policy(u={"nulls": "ignore"})).reasons()[0] == [
        "null_unseen:c"
    ]


def test_outlier_switch_leaves_the_feature_out_of_the_score(profile: Profile) -> None:
    # a and b move together in training; a row where they disagree is a joint outlier.
    a_hi = profile.feature("a").quantiles["0.99"]
    b_lo = profile.feature("b").quantiles["0.01"]
    assert check_batch(_rows(a=a_hi, b=b_lo), profile).reasons()[0] == ["outlier"]
    without_b = _policy(b={"outlier": False})
    v = check_batch(_rows(a=a_hi, b=b_lo), profile, without_b)
    assert v.status.tolist() == [OK]
    # The marginal score of a is the one-feature score: far values still stand out.
    far = check_batch(_rows(a=profile.feature("a").max), profile, without_b)
    assert far.outlier_scores is not None and far.outlier_scores[0] > 3.0
    # Held-out rows from the same population: the approximate threshold keeps the false-alarm
    # rate near the configured quantile.
    rng = np.random.default_rng(9)
    a = rng.normal(size=5000)
    live = pd.DataFrame(
        {
            "a": a,
            "b": a + rng.normal(scale=0.1, size=5000),
            "u": rng.uniform(0, 10, 5000),
            "c": rng.choice(["x", "y"], 5000),
        }
    )
    v = check_batch(
        live,
        profile,
        Policy.from_dict({"outlier_quantile": 0.99, "features": {"b": {"outlier": False}}}),
    )
    assert 0.002 <= (v.reason_counts().get("outlier", 0) / 5000) <= 0.03


def test_drift_switch_and_test(profile: Profile) -> None:
    rng = np.random.default_rng(3)
    state = DriftState.empty(profile)
    n = 2000
    state.update(
        {
            "a": rng.normal(loc=1.0, size=n),
            "b": rng.normal(size=n),
            "u": rng.uniform(0, 10, n),
            "c": np.array(rng.choice(["x", "y"], n), dtype=object),
        },
        now=0.0,
    )
    out = evaluate(state, profile)
    by = {f["name"]: f for f in out["features"]}
    assert by["a"]["status"] == "drift" and by["a"]["test"] == "chi2" and out["skipped"] == []
    off = evaluate(state, profile, DriftThresholds(policy=_policy(a={"drift": False})))
    assert "a" not in {f["name"] for f in off["features"]} and off["skipped"] == ["a"]
    psi = evaluate(state, profile, DriftThresholds(policy=_policy(a={"drift_test": "psi"})))
    a = next(f for f in psi["features"] if f["name"] == "a")
    assert a["test"] == "psi" and a["status"] == "drift" and a["p_value_corrected"] is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"features": {"u": {"range": "sometimes"}}},
            r"policy.features.u.range must be 'check', 'ignore' or a margin",
        ),
        ({"features": {"u": {"range": -0.1}}}, "policy.features.u.range"),
        (
            {"features": {"u": {"nulls": True}}},
            r"policy.features.u.nulls must be 'check' or 'ignore'",
        ),
        (
            {"features": {"u": {"outlier": "no"}}},
            r"policy.features.u.outlier must be true or false",
        ),
        ({"features": {"u": {"drift_test": "ks"}}}, r"policy.features.u.drift_test must be one of"),
        ({"features": {"u": {"colour": 1}}}, "unknown key"),
        ({"features": ["u"]}, "policy.features must be a mapping"),
        ({"drift_test": "ks"}, "policy.drift_test"),
    ],
)
def test_bad_values_are_named(raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Policy.from_dict(raw)


def test_unknown_feature_names_are_an_error_naming_them(profile: Profile) -> None:
    policy = Policy.from_dict({"features": {"carrot": {"range": "ignore"}}}, time_index=["when"])
    with pytest.raises(ConfigError, match="'carrot', 'when'") as e:
        check_batch(_rows(), profile, policy)
    assert [p.column for p in e.value.problems] == ["carrot", "when"]


def _config(tmp_path, **changes):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(
        profile=str(EXAMPLE / "profile.json"),
        primary={"path": str(EXAMPLE / "primary.onnx")},
        fallback={"path": str(EXAMPLE / "fallback.onnx")},
        **changes,
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_serving_config_reads_features_and_time_index(tmp_path) -> None:
    c = load_config(
        _config(
            tmp_path,
            time_index="depth",
            policy={"range_margin": 0.0, "features": {"table": {"range": 0.2, "drift": False}}},
        )
    )
    assert c.time_index == ("depth",) and c.policy.time_index == ("depth",)
    rules = c.policy.rules("table")
    assert rules.range_margin == 0.2 and not rules.drift and rules.outlier
    with pytest.raises(ConfigError, match="policy names feature.*'tabel'"):
        load_config(_config(tmp_path, policy={"features": {"tabel": {"range": "ignore"}}}))
    with pytest.raises(ConfigError, match="'when'"):
        load_config(_config(tmp_path, time_index="when"))
    with pytest.raises(ConfigError, match="time_index: must be a column name"):
        load_config(_config(tmp_path, time_index=3))


def test_policy_to_dict_round_trips() -> None:
    p = Policy.from_dict(
        {"range_margin": 0.1, "features": {"u": {"range": 0.2, "outlier": False}}}, time_index="t"
    )
    d = p.to_dict()
    assert d["features"] == {"u": {"range": 0.2, "outlier": False}} and d["time_index"] == ["t"]
    keys = {k: v for k, v in d.items() if k != "time_index"}
    assert Policy.from_dict(keys, time_index=d["time_index"]) == p
    hash(p)  # policies key the cache of check plans
