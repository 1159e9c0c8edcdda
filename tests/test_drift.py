import json

import numpy as np
import pandas as pd
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.drift import (
    DriftState,
    DriftThresholds,
    Segment,
    archive,
    assemble_windows,
    compact,
    drift_view,
    evaluate,
    status_changes,
)
from guarded_serving.profile import Profile, build_profile

from ._data import EXAMPLE, features, holdout, serve, train

CATEGORICAL = ["cut", "color", "clarity"]


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load(EXAMPLE / "profile.json")


@pytest.fixture(scope="module")
def primary():  # noqa: ANN201
    return load_model(EXAMPLE / "primary.onnx", task="regression")


def columns(df: pd.DataFrame, strings: str = "arrow") -> dict:
    """The columns as the guard hands them over: float arrays, and string columns either as the
    DataFrame's own (Arrow) arrays or as object arrays with None for null."""
    out = {}
    for c in df.columns:
        if df[c].dtype.kind == "f":
            out[c] = df[c].to_numpy()
        elif strings == "arrow":
            out[c] = df[c].array
        else:
            obj = df[c].to_numpy(dtype=object)
            obj[pd.isna(obj)] = None
            out[c] = obj
    return out


def state_of(profile: Profile, df: pd.DataFrame, primary=None, now: float = 0.0) -> DriftState:  # noqa: ANN001
    s = DriftState.empty(profile)
    preds = primary.predict(features(df)).labels if primary is not None else None
    s.update(columns(features(df)), preds, now=now)
    return s


# -- state ---------------------------------------------------------------------------------------


def test_counts_sum_to_rows(profile: Profile, primary) -> None:  # noqa: ANN001
    df = holdout().iloc[:700]
    s = state_of(profile, df, primary)
    assert s.rows == 700
    for name in profile.feature_names:
        assert s.feature(name).total == 700
    assert s.prediction is not None and s.prediction.total == 700
    assert len(s.feature("carat").counts) == len(profile.feature("carat").bin_counts) + 2
    assert len(s.feature("cut").counts) == len(profile.feature("cut").categories) + 1


def test_training_rows_land_in_the_training_bins(profile: Profile) -> None:
    s = state_of(profile, train())
    for fp in profile.features:
        got = s.feature(fp.name).counts
        if fp.is_numeric:
            assert got[1:-1].tolist() == fp.bin_counts
            assert got[0] == got[-1] == 0
        else:
            assert got[:-1].tolist() == list(fp.categories.values())
            assert got[-1] == 0


def test_merging_two_halves_equals_one_update(profile: Profile, primary) -> None:  # noqa: ANN001
    df = holdout()
    whole = state_of(profile, df, primary, now=10.0)
    a = state_of(profile, df.iloc[:3000], primary, now=10.0)
    b = state_of(profile, df.iloc[3000:], primary, now=20.0)
    merged = a.merge(b)
    assert merged.rows == whole.rows
    assert merged.to_dict()["features"] == whole.to_dict()["features"]
    assert merged.to_dict()["prediction"] == whole.to_dict()["prediction"]
    assert (merged.first_ts, merged.last_ts) == (10.0, 20.0)
    assert (a + b) == merged
    assert a.rows == 3000  # merge returned a new state


def test_round_trip_through_json(profile: Profile, primary) -> None:  # noqa: ANN001
    s = state_of(profile, holdout().iloc[:500], primary, now=123.5)
    text = json.dumps(s.to_dict(), allow_nan=False)
    back = DriftState.from_dict(json.loads(text))
    assert back == s
    assert back.to_dict() == s.to_dict()
    assert back.profile_hash == profile.content_hash
    # Read back without its profile, it merges and evaluates but cannot count.
    assert evaluate(back, profile) == evaluate(s, profile)
    with pytest.raises(ValueError, match="without its profile"):
        back.update(columns(features(holdout().iloc[:1])))
    bound = DriftState.from_dict(json.loads(text), profile=profile)
    bound.update(columns(features(holdout().iloc[:1])), now=124.0)
    assert bound.rows == 501
    copy = bound.copy()
    copy.update(columns(features(holdout().iloc[:1])))
    assert (bound.rows, copy.rows) == (501, 502)


def test_state_size_does_not_depend_on_rows(profile: Profile) -> None:
    df = pd.concat([holdout()] * 15, ignore_index=True)
    small, large = state_of(profile, df.iloc[:1000]), state_of(profile, df)
    assert large.rows > 100_000

    def shape(d: dict) -> list[int]:
        return [len(f["counts"]) for f in d["features"]]

    assert shape(small.to_dict()) == shape(large.to_dict())
    # Only the digits of the counts differ.
    assert len(json.dumps(large.to_dict())) < 1.5 * len(json.dumps(small.to_dict()))


def test_object_and_arrow_strings_count_alike(profile: Profile) -> None:
    for n in (1, 50, 2000):  # below and above the small-batch path
        df = features(holdout().iloc[:n])
        a, b = DriftState.empty(profile), DriftState.empty(profile)
        a.update(columns(df, "arrow"), now=0.0)
        b.update(columns(df, "object"), now=0.0)
        assert a == b
        # pandas Series (pyarrow string dtype) work too.
        c = DriftState.empty(profile)
        c.update({k: pd.Series(v, dtype="string[pyarrow]") if k in CATEGORICAL else v
                  for k, v in columns(df, "object").items()}, now=0.0)
        assert c == a


def test_large_object_columns_count_as_small_batches_do(profile: Profile) -> None:
    # Above SMALL rows, object columns are counted by pandas' hash table; row by row (batches
    # of one) must give the same counts: nulls of both kinds, unseen values, values of other types.
    values = np.array(["Ideal", None, "Flawless", np.nan, "Good", 3, True, pd.NaT] * 40, dtype=object)
    big, rows = DriftState.empty(profile), DriftState.empty(profile)
    big.update({"cut": values}, now=1.0)
    for v in values:
        rows.update({"cut": np.array([v], dtype=object)}, now=1.0)
    assert big.feature("cut").counts.tolist() == rows.feature("cut").counts.tolist()
    assert big.feature("cut").nulls == rows.feature("cut").nulls == 120
    unhashable = DriftState.empty(profile)
    with pytest.raises(TypeError):
        unhashable.update({"cut": np.array([["a"]] * 100 + ["Ideal"], dtype=object)}, now=1.0)


def test_nulls_unseen_and_out_of_range_are_counted(profile: Profile) -> None:
    carat = profile.feature("carat")
    s = DriftState.empty(profile)
    s.update({
        "carat": np.array([carat.min - 0.1, carat.min, carat.max, carat.max + 1, np.nan, np.inf]),
        "cut": np.array(["Ideal", "Flawless", None, "Ideal", "Good", "Flawless"], dtype=object),
    }, now=1.0)
    c = s.feature("carat")
    assert c.counts[0] == 1  # below min
    assert c.counts[1] == 1  # min: first bin
    assert c.counts[-2] == 1  # max: last bin
    assert c.counts[-1] == 2  # above max and +inf
    assert c.nulls == 1
    cut = s.feature("cut")
    cats = list(profile.feature("cut").categories)
    assert cut.counts[cats.index("Ideal")] == 2
    assert cut.counts[cats.index("Good")] == 1
    assert cut.counts[-1] == 2  # unseen
    assert cut.nulls == 1
    # Columns missing from the batch count nothing, but the rows count.
    assert s.rows == 6 and s.feature("depth").total == 0
    arrow = DriftState.empty(profile)
    arrow.update({"cut": pd.array(["Ideal", None, "Flawless"] * 30, dtype="str")}, now=1.0)
    assert (arrow.feature("cut").nulls, arrow.feature("cut").counts[-1]) == (30, 30)


def test_merge_refuses_states_of_another_profile(profile: Profile) -> None:
    other = build_profile(train().iloc[:5000], "price")
    with pytest.raises(ValueError, match="different profiles"):
        DriftState.empty(profile).merge(DriftState.empty(other))
    s = DriftState.empty(profile)
    with pytest.raises(ValueError, match="expected 3"):
        s.update({"carat": np.zeros(3), "depth": np.zeros(4)})
    with pytest.raises(TypeError):  # an unhashable "category"
        s.update({"carat": np.zeros(2), "cut": np.array([[1], "Ideal"], dtype=object)})
    assert s.is_empty and s.feature("carat").total == 0  # nothing half-counted


# -- statistics ----------------------------------------------------------------------------------


def test_holdout_window_is_ok(profile: Profile, primary) -> None:  # noqa: ANN001
    out = evaluate(state_of(profile, holdout().sample(1000, random_state=3), primary), profile)
    assert out["status"] == "ok", [(f["name"], f["status"]) for f in out["features"]]
    assert out["prediction"]["status"] == "ok"
    assert out["rows"] == 1000 and out["window"]["rows"] == 1000
    for f in out["features"]:
        assert f["psi"] < 0.1 and f["p_value_corrected"] >= f["p_value"]
        assert abs(sum(f["observed"]) - 1) < 1e-9 and abs(sum(f["expected"]) - 1) < 1e-9
        assert len(f["buckets"]) == len(f["observed"]) == len(f["expected"])


def test_large_stones_drift(profile: Profile, primary) -> None:  # noqa: ANN001
    large = serve().query("carat >= 1")
    out = evaluate(state_of(profile, large, primary), profile)
    by_name = {f["name"]: f for f in out["features"]}
    assert out["status"] == "drift"
    for name in ("carat", "x", "y", "z"):
        assert by_name[name]["status"] == "drift", name
        assert by_name[name]["wasserstein"] > 0
    assert by_name["carat"]["out_of_range_rate"] == 1.0  # every stone weighs over the training max
    assert by_name["x"]["out_of_range_rate"] > 0.3
    assert by_name["z"]["out_of_range_rate"] < 0.01  # z drifts inside its (wide) training range
    assert out["prediction"]["status"] == "drift"
    assert by_name["cut"]["wasserstein"] is None and by_name["cut"]["unseen_rate"] == 0.0


def test_below_min_rows_is_insufficient_data(profile: Profile, primary) -> None:  # noqa: ANN001
    out = evaluate(state_of(profile, serve().query("carat >= 1").iloc[:150], primary), profile)
    assert out["status"] == "insufficient_data"
    assert {f["status"] for f in out["features"]} == {"insufficient_data"}
    assert all(f["p_value_corrected"] is None for f in out["features"])
    empty = evaluate(DriftState.empty(profile), profile)
    assert empty["status"] == "insufficient_data" and empty["window"]["start"] is None
    assert empty["features"][0]["psi"] is None


def test_evaluate_output_is_json_and_has_the_promised_shape(profile: Profile, primary) -> None:  # noqa: ANN001
    th = DriftThresholds(correction="bonferroni")
    out = evaluate(state_of(profile, serve().iloc[:3000], primary, now=5.0), profile, th)
    json.dumps(out, allow_nan=False)
    assert set(out) == {"status", "rows", "min_rows", "window", "correction", "thresholds",
                        "features", "skipped", "prediction"}
    assert out["correction"] == "bonferroni" and out["thresholds"]["psi_drift"] == 0.25
    assert out["window"] == {"start": 5.0, "end": 5.0, "rows": 3000}
    f = out["features"][0]
    assert {"name", "kind", "status", "test", "statistic", "p_value", "p_value_corrected", "psi",
            "js_distance", "wasserstein", "live_rows", "null_rate_train", "null_rate_live",
            "out_of_range_rate", "expected", "observed", "buckets"} <= set(f)
    assert f["buckets"][0] == "< min" and f["buckets"][-2:] == ["> max", "null"]
    cut = next(f for f in out["features"] if f["name"] == "cut")
    assert cut["buckets"][-2:] == ["(unseen)", "(null)"] and "unseen_rate" in cut


def test_unseen_categories_and_nulls_drift(profile: Profile) -> None:
    df = features(holdout().iloc[:1000])
    cols = columns(df, "object")
    cols["color"] = cols["color"].copy()
    cols["color"][:100] = "Z"  # 10% of a category training never saw
    cols["depth"] = cols["depth"].copy()
    cols["depth"][:100] = np.nan  # 10% nulls where training had none
    s = DriftState.empty(profile)
    s.update(cols, now=0.0)
    by_name = {f["name"]: f for f in evaluate(s, profile)["features"]}
    assert by_name["color"]["status"] == "drift" and by_name["color"]["unseen_rate"] == 0.1
    assert by_name["depth"]["status"] == "drift" and by_name["depth"]["null_rate_live"] == 0.1
    assert by_name["carat"]["status"] == "ok"


def test_evaluate_refuses_a_state_of_another_profile(profile: Profile) -> None:
    other = build_profile(train().iloc[:5000], "price")
    with pytest.raises(ValueError, match="evaluated against"):
        evaluate(DriftState.empty(other), profile)


# -- windows -------------------------------------------------------------------------------------


def segments_from(profile: Profile, frames: list[pd.DataFrame], primary, workers: int = 3,  # noqa: ANN001
                  t0: float = 1000.0) -> list[Segment]:
    """One segment per frame, flushed by the workers in turn, one second apart."""
    segs = []
    for i, df in enumerate(frames):
        s = state_of(profile, df, primary, now=t0 + i)
        segs.append(Segment(f"worker-{i % workers}", t0 + i, t0 + i, s.rows, s.to_dict(), id=i))
    return segs


def test_three_workers_assemble_into_windows(profile: Profile, primary) -> None:  # noqa: ANN001
    df = holdout()
    frames = [df.iloc[i * 150:(i + 1) * 150] for i in range(14)]  # 2,100 rows
    segs = segments_from(profile, frames, primary)
    shuffled = [segs[i] for i in np.random.default_rng(0).permutation(len(segs))]
    wins = assemble_windows(shuffled, profile, window_rows=500, window_seconds=None)
    # 150-row flushes: a window closes at the first flush at or after 500 rows (600).
    assert [w.rows for w in wins] == [600, 600, 600, 300]
    assert [w.closed for w in wins] == [True, True, True, False]
    assert wins[0].segment_ids == [0, 1, 2, 3]
    assert sum(w.state.rows for w in wins) == 2100
    assert wins[1].start == 1004.0 and wins[1].end == 1007.0
    # By time: 5-second periods [1000, 1005), [1005, 1010), [1010, 1015).
    by_time = assemble_windows(segs, profile, None, 5.0)
    assert [w.rows for w in by_time] == [750, 750, 600]
    assert [w.closed for w in by_time] == [True, True, False]
    assert assemble_windows(segs, profile, None, 5.0, now=1015.0)[-1].closed
    # Both: whichever comes first.
    both = assemble_windows(segs, profile, 500, 5.0)
    assert [w.rows for w in both] == [600, 150, 600, 150, 600]
    # Compacting the closed windows gives the same windows back.
    compacted = compact(wins)
    assert [c.worker for c in compacted] == ["compacted"] * 3
    open_segs = [s for s in segs if s.id in wins[-1].segment_ids]
    again = assemble_windows(compacted + open_segs, profile, 500, None)
    assert [(w.rows, w.closed) for w in again] == [(w.rows, w.closed) for w in wins]
    assert again[1].state == wins[1].state


def test_retrain_recommended_after_consecutive_drifting_windows(profile: Profile, primary) -> None:  # noqa: ANN001
    ok_rows = holdout().sample(3000, random_state=1)
    large = serve().query("carat >= 1")
    frames = [ok_rows.iloc[i * 500:(i + 1) * 500] for i in range(6)]
    frames += [large.iloc[i * 500:(i + 1) * 500] for i in range(4)]
    segs = segments_from(profile, frames, primary)
    seen = []
    for k in range(5, len(segs) + 1):
        view = drift_view(segs[:k], profile, window_rows=1000, window_seconds=None,
                          consecutive_windows_for_retrain=2, thresholds=DriftThresholds())
        seen.append((k, view["consecutive_drift_windows"], view["retrain_recommended"]))
    # Windows of 1,000 rows: 3 in-distribution, then the large stones from segment 7 on.
    assert seen == [(5, 0, False), (6, 0, False), (7, 0, False), (8, 1, False), (9, 1, False),
                    (10, 2, True)]
    view = drift_view(segs, profile, 1000, None, 2, DriftThresholds())
    json.dumps(view, allow_nan=False)
    assert [w["status"] for w in view["windows"]] == ["ok", "ok", "ok", "drift", "drift"]
    assert view["windows"][-1]["features"]["carat"]["status"] == "drift"
    assert "prediction" in view["windows"][-1]["features"]
    assert view["cumulative"]["rows"] == 5000 and view["cumulative"]["status"] == "drift"
    assert view["current_window"] == {"index": 4, "closed": True}


def test_current_falls_back_to_the_last_closed_window(profile: Profile, primary) -> None:  # noqa: ANN001
    frames = [holdout().iloc[:600], holdout().iloc[600:1200], holdout().iloc[1200:1300]]
    view = drift_view(segments_from(profile, frames, primary), profile, 500, None, 3, None)
    assert view["current_window"] == {"index": 1, "closed": True}  # the open one has 100 rows
    assert view["current"]["rows"] == 600
    assert view["windows"][-1]["closed"] is False and len(view["windows"]) == 3
    empty = drift_view([], profile, 500, None, 3, None)
    assert empty["current"]["status"] == "insufficient_data" and empty["windows"] == []


def test_status_changes(profile: Profile, primary) -> None:  # noqa: ANN001
    before = evaluate(state_of(profile, holdout().iloc[:1000], primary), profile)
    after = evaluate(state_of(profile, serve().query("carat >= 1").iloc[:1000], primary), profile)
    changes = status_changes(before, after)
    assert {"feature": "carat", "from": "ok", "to": "drift"} in changes
    assert {"feature": "prediction", "from": "ok", "to": "drift"} in changes
    assert {"feature": "__overall__", "from": "ok", "to": "drift"} in changes
    assert status_changes(None, after) == []
    assert status_changes(after, after) == []
    few = evaluate(state_of(profile, holdout().iloc[:10], primary), profile)
    assert {"feature": "__overall__", "from": "insufficient_data", "to": "ok"} in status_changes(
        few, before)


def test_integer_boolean_features_and_class_predictions() -> None:
    from guarded_serving.adapters import Prediction

    class Majority:
        name, version, task = "majority", "1", "classification"

        def predict(self, data: pd.DataFrame) -> Prediction:
            return Prediction((data["n"].to_numpy() > 2).astype(np.int64))

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"n": rng.integers(0, 5, 3000), "b": rng.random(3000) < 0.3,
                       "y": rng.integers(0, 2, 3000)})
    p = build_profile(df, "y", primary=Majority())
    assert p.prediction_profile is not None and p.prediction_profile.kind == "categorical"
    s = DriftState.empty(p)
    live = df.iloc[:1000]
    s.update({"n": live["n"].to_numpy(dtype=float), "b": live["b"].to_numpy()},
             Majority().predict(live).labels, now=0.0)
    assert s.feature("b").counts.sum() == 1000 and s.feature("b").counts[-1] == 0  # no unseen
    assert s.prediction is not None and s.prediction.counts[-1] == 0
    assert evaluate(s, p)["status"] == "ok"
    flipped = DriftState.empty(p)
    flipped.update({"b": np.ones(1000, dtype=bool)}, np.zeros(1000, dtype=np.int64), now=0.0)
    out = evaluate(flipped, p)
    assert out["prediction"]["status"] == "drift"
    assert {f["name"]: f["status"] for f in out["features"]} == {
        "n": "insufficient_data", "b": "drift"}


def test_rows_flushed_after_their_window_was_compacted_join_the_next_window(profile: Profile) -> None:
    df = holdout()
    window = compact(assemble_windows(
        [Segment("w1", 1.0, 10.0, 300, state_of(profile, df.iloc[:300], now=10.0).to_dict(), id=1)],
        profile, window_rows=300))
    late = Segment("w2", 2.0, 9.0, 50, state_of(profile, df.iloc[300:350], now=9.0).to_dict(), id=2)
    fresh = Segment("w1", 11.0, 11.0, 200, state_of(profile, df.iloc[350:550], now=11.0).to_dict(), id=3)
    wins = assemble_windows([*window, late, fresh], profile, window_rows=300)
    assert [(w.rows, w.closed) for w in wins] == [(300, True), (250, False)]
    assert sum(w.state.rows for w in wins) == 550


def test_old_windows_are_archived_into_the_cumulative_view(profile: Profile) -> None:
    df = holdout()
    segs = [Segment("w", float(i), float(i), 20, state_of(profile, df.iloc[i * 20:(i + 1) * 20], now=float(i)).to_dict(),
                    id=i + 1) for i in range(130)]
    windows = assemble_windows(segs, profile, window_rows=20)
    before = drift_view(segs, profile, window_rows=20)
    seg, ids = archive(segs, windows, keep=100)
    assert seg.worker == "archived" and seg.rows == 30 * 20 and sorted(ids) == list(range(1, 31))
    after_segs = [seg, *[s for s in segs if s.id not in ids]]
    after = drift_view(after_segs, profile, window_rows=20)
    assert after["cumulative"]["rows"] == before["cumulative"]["rows"] == 130 * 20
    assert after["cumulative"]["features"][0]["psi"] == pytest.approx(before["cumulative"]["features"][0]["psi"])
    assert len(assemble_windows(after_segs, profile, window_rows=20)) == 100
    # Archiving again folds the previous archive in: still one archived segment.
    more = [*after_segs, *[Segment("w", 200.0 + i, 200.0 + i, 20, segs[i].state, id=500 + i) for i in range(30)]]
    seg2, ids2 = archive(more, assemble_windows(more, profile, window_rows=20), keep=100)
    assert seg2.rows == 60 * 20 and None not in ids2


def test_drift_by_calendar_period_of_the_time_index() -> None:
    from guarded_serving.checks import check_batch
    from guarded_serving.drift.periods import PeriodStates, period_labels

    rng = np.random.default_rng(12)
    n = 3000
    t = pd.to_datetime(rng.integers(1_577_836_800, 1_609_459_200, n), unit="s", utc=True)  # 2020
    train_df = pd.DataFrame({"t": t, "x": rng.normal(size=n), "y": 0.0})
    p = build_profile(train_df, "y", time_index=["t"])
    live_t = pd.Series(pd.to_datetime(rng.integers(1_609_459_200, 1_640_995_200, n), unit="s", utc=True))
    x = rng.normal(size=n)
    x[live_t.dt.quarter.to_numpy() == 3] += 1.0  # a shift in the third quarter only
    live = pd.DataFrame({"t": live_t, "x": x})
    states = PeriodStates.empty(p, "t", "quarter")
    states.update(check_batch(live, p).columns)  # the checks' columns: datetimes in epoch seconds
    out = states.evaluate()
    assert [d["period"] for d in out] == ["2021Q1", "2021Q2", "2021Q3", "2021Q4"]
    assert [d["status"] for d in out] == ["ok", "ok", "drift", "ok"]
    assert sum(d["rows"] for d in out) == n and all(d["skipped"] == ["t"] for d in out)
    # The same from a DataFrame; states merge period by period.
    again = PeriodStates.empty(p, "t", "quarter")
    again.update(dict(live.items()))
    both = states.merge(again)
    assert both.states["2021Q3"].rows == 2 * states.states["2021Q3"].rows
    # Periods are read in the column's time zone; nulls are their own period.
    secs = np.array([pd.Timestamp("2021-03-31T23:30:00-05:00").timestamp(), np.nan])
    assert period_labels(secs, "month", "America/Chicago").tolist() == ["2021-03", None]
    assert period_labels(secs, "month", "UTC").tolist() == ["2021-04", None]
    with pytest.raises(ValueError, match="datetime"):
        PeriodStates.empty(build_profile(train_df.drop(columns="t"), "y"), "x", "month")


def test_datetime_buckets_are_labelled_as_times() -> None:
    from guarded_serving.drift.stats import DriftThresholds
    from guarded_serving.policy import Policy

    t = pd.date_range("2020-01-01", periods=400, freq="D", tz="Europe/Paris")
    p = build_profile(pd.DataFrame({"t": t, "y": 0.0}), "y", n_bins=4)
    state = DriftState.empty(p)
    state.update({"t": t[:10]}, now=0.0)
    th = DriftThresholds(policy=Policy.from_dict({"features": {"t": {"drift": True}}}))
    f = evaluate(state, p, th)["features"][0]
    # Quantile edges fall between midnights here, so the labels carry the time of day too.
    assert f["buckets"][:2] == ["< min", "[2020-01-01T00:00, 2020-04-09T18:00)"]
    assert f["buckets"][4].endswith(", 2021-02-03T00:00]")
    daily = build_profile(pd.DataFrame({"t": t[::2], "y": 0.0}), "y", n_bins=2)  # edges on midnights
    assert evaluate(DriftState.empty(daily), daily, th)["features"][0]["buckets"][1] == "[2020-01-01, 2020-07-18)"
