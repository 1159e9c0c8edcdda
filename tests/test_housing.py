"""A real table with time in it: Texas housing sales by city and month (plotnine's txhousing, read
from the installed package). Trained on 2000-2009, served on 2012-2015, the median price the
target. Before time-index support, every 2012-2015 row was flagged out_of_range:year."""

import json

import pandas as pd
import pytest
import yaml

from guarded_serving.checks import OK, check_batch
from guarded_serving.cli import main
from guarded_serving.drift.state import DriftState
from guarded_serving.drift.stats import evaluate
from guarded_serving.policy import Policy
from guarded_serving.profile import Profile, build_profile

from ._data import EXAMPLE

TARGET = "median"


@pytest.fixture(scope="module")
def housing() -> pd.DataFrame:
    from plotnine.data import txhousing

    df = txhousing.drop(columns=["date"])  # a fractional year; a real date column instead:
    df["date"] = pd.to_datetime({"year": df.year, "month": df.month, "day": 1})
    return df[df[TARGET].notna()].reset_index(drop=True)


@pytest.fixture(scope="module")
def train(housing: pd.DataFrame) -> pd.DataFrame:
    return housing[housing.year.between(2000, 2009)]


@pytest.fixture(scope="module")
def served(housing: pd.DataFrame) -> pd.DataFrame:
    return housing[housing.year.between(2012, 2015)].drop(columns=[TARGET])


def _flagged(v) -> float:
    return float((v.status != OK).mean())


def _assert_flags_name_reason_and_column(v, profile: Profile) -> None:
    names = set(profile.feature_names)
    for reasons in v.reasons():
        for r in reasons:
            code, _, column = r.partition(":")
            assert code in ("out_of_range", "null_unseen", "unseen_category", "outlier"), r
            assert column in names or (code == "outlier" and not column), r


def test_without_a_time_index_every_served_row_is_out_of_range(train, served) -> None:
    p = build_profile(train.drop(columns=["date"]), TARGET)
    v = check_batch(served.drop(columns=["date"]), p)
    assert _flagged(v) == 1.0 and v.reason_counts()["out_of_range:year"] == len(served)


def test_year_and_date_as_time_index_at_profile_time(train, served) -> None:
    p = build_profile(train, TARGET, time_index=["date", "year"])
    assert p.feature("date").kind == "datetime" and p.time_index == ["date", "year"]
    assert p.outlier is not None and not {"date", "year"} & set(p.outlier.columns)
    v = check_batch(served, p)
    assert not v.problems
    assert _flagged(v) <= 0.10, v.reason_counts()
    assert not any(r.endswith((":year", ":date")) for r in v.reason_counts())
    _assert_flags_name_reason_and_column(v, p)


def test_year_and_date_as_time_index_in_the_serving_policy(train, served) -> None:
    p = build_profile(train, TARGET)  # a profile that knows nothing of time
    assert "year" in p.outlier.columns
    v = check_batch(served, p, Policy(time_index=("date", "year")))
    assert _flagged(v) <= 0.10, v.reason_counts()
    _assert_flags_name_reason_and_column(v, p)


def test_year_range_ignored_by_feature_policy(train, served) -> None:
    cols = [c for c in train.columns if c != "date"]
    p = build_profile(train[cols], TARGET)
    policy = Policy.from_dict({"features": {"year": {"range": "ignore", "outlier": False}}})
    v = check_batch(served.drop(columns=["date"]), p, policy)
    assert _flagged(v) <= 0.10, v.reason_counts()
    _assert_flags_name_reason_and_column(v, p)


def test_date_out_of_range_when_not_a_time_index(train, served) -> None:
    p = build_profile(train, TARGET, time_index=["year"])
    v = check_batch(served, p)
    assert v.reason_counts()["out_of_range:date"] == len(served)


def test_drift_leaves_the_time_index_out(train, served) -> None:
    p = build_profile(train, TARGET, time_index=["date", "year"])
    state = DriftState.empty(p)
    v = check_batch(served, p)
    state.update(v.columns, now=0.0)
    out = evaluate(state, p)
    assert sorted(out["skipped"]) == ["date", "year"]
    assert {f["name"] for f in out["features"]} == {
        "city",
        "month",
        "sales",
        "volume",
        "listings",
        "inventory",
    }
    # The in-process route: a DataFrame with a datetime column counts into the same bins.
    frame = DriftState.empty(p)
    frame.update(dict(served.items()), now=0.0)
    assert frame.feature("date").counts.tolist() == state.feature("date").counts.tolist()


def _check_report(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["check", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_cli_profile_with_time_index_and_check_with_a_config(
    train, served, tmp_path, capsys
) -> None:
    data, serve = str(tmp_path / "train.parquet"), str(tmp_path / "serve.parquet")
    train.to_parquet(data)
    served.to_parquet(serve)
    timed, plain = str(tmp_path / "p.json"), str(tmp_path / "plain.json")
    assert (
        main(["profile", data, "--target", TARGET, "--out", timed, "--time-index", "date", "year"])
        == 0
    )
    assert "time index: date, year" in capsys.readouterr().out
    report = _check_report(capsys, serve, "--profile", timed)
    assert report["fallback"] <= 0.10 * report["rows"] and report["rejected"] == 0
    # A profile without a time index, and a serving config that gives it.
    assert main(["profile", data, "--target", TARGET, "--out", plain]) == 0
    assert _check_report(capsys, serve, "--profile", plain)["fallback"] == len(served)
    config = {
        "name": "housing",
        "task": "regression",
        "profile": plain,
        "primary": {"path": str(EXAMPLE / "primary.onnx")},
        "fallback": {"path": str(EXAMPLE / "fallback.onnx")},
        "time_index": ["date", "year"],
        "policy": {"features": {"listings": {"range": 0.5}}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    report = _check_report(capsys, serve, "--config", str(tmp_path / "c.yaml"))
    assert report["fallback"] <= 0.10 * report["rows"]
    assert "out_of_range:listings" not in report["reasons"]
    # The same from the command line alone.
    report = _check_report(capsys, serve, "--profile", plain, "--time-index", "date", "year", "--drift-by", "year")
    assert report["fallback"] <= 0.10 * len(served)
    by_year = report["drift_by_period"]
    assert [d["period"] for d in by_year] == ["2012", "2013", "2014", "2015"]
    assert sum(d["rows"] for d in by_year) == len(served)
    assert "month" in by_year[-1]["drifting"]  # 2015 has January to July only
    assert main(["check", serve, "--profile", plain, "--drift-by", "year"]) == 2
    assert "--drift-by needs a datetime time index" in capsys.readouterr().err


@pytest.mark.e2e
def test_served_over_http_with_a_date_column(train, served, tmp_path) -> None:
    import httpx

    from guarded_serving.fallback import FallbackTrainer

    from .server import Server

    cols = ["city", "date", "sales", "listings", TARGET]
    build_profile(train[cols], TARGET).save(tmp_path / "profile.json")
    FallbackTrainer(task="regression").fit(train[cols], TARGET).save_onnx(tmp_path / "model.onnx")
    config = {
        "name": "housing",
        "task": "regression",
        "profile": str(tmp_path / "profile.json"),
        "primary": {"path": str(tmp_path / "model.onnx")},
        "fallback": {"path": str(tmp_path / "model.onnx")},
        "time_index": "date",
        "store": {"url": f"sqlite:///{tmp_path / 'store.sqlite3'}"},
    }
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    rows = json.loads(served[cols[:-1]].head(20).to_json(orient="records", date_format="iso"))
    assert rows[0]["date"].startswith("2012-01-01T00:00:00")
    with Server(tmp_path / "serving.yaml") as srv:
        r = httpx.post(srv.url + "/predict", json={"rows": rows}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["routes"].count("primary") >= 18  # 2012 dates pass: the date is the time index
        bad = [dict(rows[0]), dict(rows[1], date="not a date"), dict(rows[2], date="2012-03-01T00:00:00Z")]
        r = httpx.post(srv.url + "/predict", json={"rows": bad}, timeout=30)
        assert r.status_code == 422, r.text
        problems = {(p["row"], p["column"]): p for p in r.json()["problems"]}
        assert set(problems) == {(1, "date"), (2, "date")}
        assert problems[(1, "date")]["got"] == "not a date"
        assert problems[(2, "date")]["problem"] == "time-zone-aware datetime where training had naive ones"
        null_date = [dict(rows[0], date=None)]
        r = httpx.post(srv.url + "/predict", json={"rows": null_date}, timeout=30)
        assert r.status_code == 200 and r.json()["reasons"][0] == ["null_unseen:date"], r.text


def test_export_gives_dates_back_as_dates(train, served, tmp_path) -> None:
    """The log keeps a datetime feature as epoch seconds; the export (the next training set) turns
    it back into the dates that were served."""
    from guarded_serving.config import load_config
    from guarded_serving.fallback import FallbackTrainer
    from guarded_serving.runtime import ServingRuntime, new_request_id

    cols = ["city", "date", "sales", "listings", TARGET]
    build_profile(train[cols], TARGET).save(tmp_path / "profile.json")
    FallbackTrainer(task="regression").fit(train[cols], TARGET).save_onnx(tmp_path / "model.onnx")
    config = {"name": "housing", "task": "regression", "profile": str(tmp_path / "profile.json"),
              "primary": {"path": str(tmp_path / "model.onnx")},
              "fallback": {"path": str(tmp_path / "model.onnx")}, "time_index": "date",
              "store": {"url": f"sqlite:///{tmp_path / 'store.sqlite3'}"}}
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    rows = served[cols[:-1]].head(20)
    rt = ServingRuntime(load_config(tmp_path / "serving.yaml"))
    rt.predict(rows, request_id=new_request_id())
    rt.close()
    assert main(["export", str(tmp_path / "serving.yaml"), "--out", str(tmp_path / "prod.parquet")]) == 0
    out = pd.read_parquet(tmp_path / "prod.parquet").sort_values("row")
    assert pd.api.types.is_datetime64_any_dtype(out["date"])
    assert out["date"].tolist() == rows["date"].tolist()
