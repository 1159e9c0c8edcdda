"""Live performance estimates: tallies per served batch, merged per drift window, shown in
/performance beside the realized figures, in gauges, and alerted once below the baseline."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from guarded_serving.config import load_config
from guarded_serving.drift.windows import ARCHIVED
from guarded_serving.estimates import ESTIMATE_KEY, ESTIMATE_STATUS_EVENT, below_baseline
from guarded_serving.report import build_report
from guarded_serving.runtime import ServingRuntime, new_request_id

from . import _data
from ._classifier import make_classifier_project
from .conftest import wait_until
from .server import Server, write_config
from .test_monitoring import _Webhook

WINDOW = 400
SETTINGS: dict[str, Any] = {
    "drift": {"window_rows": WINDOW, "min_rows": 100},
    "store": {"flush_seconds": 0.3},
    # Every row estimated, so the tests can count them (the default samples, see below).
    "estimation": {"sample_rate": 1.0},
}


def _in_distribution() -> pd.DataFrame:
    return _data.holdout().head(WINDOW).reset_index(drop=True)


def _large_stones() -> pd.DataFrame:
    s = _data.serve()
    return s[s["carat"] > 1.2].head(WINDOW).reset_index(drop=True)


def _window(perf: dict[str, Any], index: int) -> dict[str, Any] | None:
    for w in (perf.get("estimated") or {}).get("windows") or []:
        if w["index"] == index and w["closed"] and w["n"] >= WINDOW:
            return w  # type: ignore[no-any-return]
    return None


def test_below_baseline_holds_each_role_to_its_own_baseline_and_skips_thin_windows() -> None:
    base = {"primary": {"n": 10, "mae": 100.0, "rmse": 150.0}, "fallback": {"mae": 200.0}}
    est = {
        "primary": {"n": 500.0, "mae": 119.0, "rmse": 190.0},
        "fallback": {"n": 500.0, "mae": 260.0},
        "guarded": {"n": 50.0, "mae": 900.0},
    }
    assert below_baseline(est, base, 200, 0.2) == ["primary.rmse", "fallback.mae"]
    assert below_baseline(est, base, 200, None) == []
    assert below_baseline(
        {"primary": {"n": 300, "accuracy": 0.7}}, {"primary": {"accuracy": 0.9}}, 200, 0.2
    ) == ["primary.accuracy"]


def test_runtime_estimates_each_drift_window_and_keeps_them_through_compaction(
    tmp_path: Path,
) -> None:
    rt = ServingRuntime(load_config(write_config(tmp_path, **SETTINGS)))
    try:
        for part in (_in_distribution(), _large_stones()):
            rows = _data.json_rows(_data.features(part))
            for i in range(0, WINDOW, 100):
                rt.predict(rows[i : i + 100], request_id=new_request_id())
            rt.recorder.flush(10)
            rt.flush_drift()
        view = rt.monitor.view()
        assert [w["closed"] for w in view["windows"]] == [True, True]
        est = rt.estimates.view  # type: ignore[union-attr]
        assert est is not None
        calm, shifted = est["windows"]
        assert calm["n"] == shifted["n"] == WINDOW
        assert calm["flagged"]["n"] == 0 and shifted["flagged"]["n"] > WINDOW // 2
        for role in ("primary", "fallback", "guarded"):
            assert shifted[role]["mae"] > 2 * calm[role]["mae"], role
            lo, hi = shifted["bands"][role]["mae"]
            assert lo < shifted[role]["mae"] < hi
        # The guarded service served the flagged rows from the fallback: so does its estimate.
        assert shifted["guarded"]["mae"] == pytest.approx(shifted["fallback"]["mae"], rel=0.2)
        assert (
            est["current"]["window"]["index"] == 1
            and "guarded.mae" in est["current"]["below_baseline"]
        )
        # Compaction (one segment per closed window) carries the window's tally along.
        segs = rt.store().segments()
        assert all(ESTIMATE_KEY in s["state"] for s in segs)
        again = rt.monitor.view()
        assert again["windows"] == view["windows"]
        assert rt.estimates.view["windows"] == est["windows"]  # type: ignore[union-attr]
        # One alert event for the change, however often the view is evaluated.
        events = rt.store().events(ESTIMATE_STATUS_EVENT)
        assert [e["body"]["below_baseline"] != [] for e in events].count(True) == 1
        # The report draws the same estimates per window (no outcomes yet: no realized figure).
        html = build_report(rt.config)
        assert "Estimated against realized" in html
        cells = re.findall(
            r'<tr data-window="(\d)" data-model="guarded">.*?class=estimated>([^<]+)<.*?'
            r"class=realized>([^<]+)<",
            html,
        )
        assert [(i, r) for i, _, r in cells] == [("0", "–"), ("1", "–")]
        assert float(cells[1][1]) > 2 * float(cells[0][1])
    finally:
        rt.close()


def test_a_sample_of_rows_is_estimated_and_every_flagged_row(tmp_path: Path, caplog) -> None:
    """At a sample rate of 0.1 the error models see a uniform tenth of the rows plus every
    flagged row: the window's estimate counts the rows estimated, stays near the estimate over
    every row, and the flagged scope is complete. A window too short for the rate to reach
    drift.min_rows is named at startup (its estimate could never alert)."""
    for name in ("full", "sampled"):
        (tmp_path / name).mkdir()
    full, sampled = (
        ServingRuntime(load_config(write_config(tmp_path / name, **{**SETTINGS, "estimation": est})))
        for name, est in (("full", {}), ("sampled", {"sample_rate": 0.1}))
    )
    try:
        assert full.config.estimation.sample_rate == 1.0, "every row by default"
        assert "estimate alerts will not fire" in caplog.text
        rows = _data.json_rows(_data.features(pd.concat([_in_distribution().head(300), _large_stones().head(100)])))
        for rt in (full, sampled):
            for i in range(0, WINDOW, 100):
                rt.predict(rows[i : i + 100], request_id=new_request_id())
            rt.recorder.flush(10)
            rt.flush_drift()
            rt.monitor.view()
        a, b = (rt.estimates.view["windows"][0] for rt in (full, sampled))  # type: ignore[union-attr]
        assert a["n"] == WINDOW and a["flagged"]["n"] > 50
        # Binomial(400, 0.1): 40 expected; outside [15, 75] about once in 10^6 runs.
        assert 15 <= b["n"] <= 75
        assert b["flagged"]["n"] == a["flagged"]["n"]
        assert b["flagged"]["guarded"]["mae"] == pytest.approx(a["flagged"]["guarded"]["mae"])
        lo, hi = b["bands"]["guarded"]["mae"]
        assert hi - lo > (a["bands"]["guarded"]["mae"][1] - a["bands"]["guarded"]["mae"][0])
        assert b["guarded"]["mae"] == pytest.approx(a["guarded"]["mae"], rel=0.6)
    finally:
        full.close()
        sampled.close()


def test_no_artefacts_or_disabled_means_no_estimates(tmp_path: Path) -> None:
    rt = ServingRuntime(load_config(write_config(tmp_path, estimation={"enabled": False})))
    try:
        assert rt.estimates is None and rt.recorder.estimates is None
        assert "estimated" not in rt.performance()
    finally:
        rt.close()


@pytest.mark.e2e
def test_served_estimate_rises_on_shifted_window_and_outcomes_show_realized_beside(
    tmp_path: Path,
) -> None:
    hook = _Webhook()
    config = write_config(
        tmp_path, **{**SETTINGS, "drift": {**SETTINGS["drift"], "webhook_url": hook.url}}
    )
    calm_df, shifted_df = _in_distribution(), _large_stones()
    sent: list[tuple[str, pd.DataFrame]] = []
    with Server(config) as srv:

        def perf() -> dict[str, Any]:
            r = httpx.get(srv.url + "/performance", timeout=30.0)
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]

        def send(df: pd.DataFrame) -> None:
            for i in range(0, len(df), 100):
                part = df.iloc[i : i + 100]
                r = httpx.post(
                    srv.url + "/predict",
                    json={"rows": _data.json_rows(_data.features(part))},
                    timeout=30.0,
                )
                assert r.status_code == 200, r.text
                sent.append((r.json()["request_id"], part))

        send(calm_df)
        calm = wait_until(lambda: _window(perf(), 0), 30.0)
        send(shifted_df)
        shifted = wait_until(lambda: _window(perf(), 1), 30.0)
        body = perf()
        assert body["rows_with_outcomes"] == 0
        for role in ("primary", "guarded"):
            assert shifted[role]["mae"] > 2 * calm[role]["mae"], role
        assert body["estimated"]["current"]["window"]["index"] == 1
        assert shifted["realized"]["rows_with_outcomes"] == 0
        wait_until(lambda: any(a.get("kind") == "estimate_alert" for a in hook.alerts), 15.0)
        alert = next(a for a in hook.alerts if a["kind"] == "estimate_alert")
        assert "guarded.mae" in alert["new"] and alert["model"] == "diamonds-price"
        metrics = httpx.get(srv.url + "/metrics", timeout=30.0).text
        assert (
            'guarded_serving_estimated_metric{metric="mae",model="diamonds-price",role="guarded",scope="all"}'
            in metrics.replace(", ", ",")
        )

        # Outcomes arrive later: the realized figure appears beside the estimate, per window.
        for rid, part in sent:
            r = httpx.post(
                srv.url + "/feedback",
                json={"request_id": rid, "outcomes": part["price"].tolist()},
                timeout=30.0,
            )
            assert r.status_code == 200, r.text
        time.sleep(1.1)  # past the view cache, so the next read is a new evaluation
        body = perf()
        windows = {w["index"]: w for w in body["estimated"]["windows"]}
        for w in windows.values():
            assert w["realized"]["rows_with_outcomes"] == WINDOW
            assert set(w["realized"]) >= {"primary", "fallback", "guarded"}
        # In distribution the estimate is close to what happened; on stones larger than any the
        # holdout had, it rises with the realized error but falls short of it (the error models
        # do not extrapolate): what the flagged rows' own estimate and the README warn about.
        for role in ("primary", "fallback", "guarded"):
            est, real = windows[0][role]["mae"], windows[0]["realized"][role]["mae"]
            assert est == pytest.approx(real, rel=0.25), (role, est, real)
            assert windows[1]["realized"][role]["mae"] > 2 * windows[0]["realized"][role]["mae"]
        assert windows[1]["flagged"]["n"] > WINDOW // 2
        assert body["estimated"]["current"]["realized"]["rows_with_outcomes"] == WINDOW


def test_a_classifier_is_estimated_live_from_the_served_probabilities(tmp_path: Path) -> None:
    df = make_classifier_project(tmp_path)
    (tmp_path / "serving.yaml").write_text(
        "name: synthetic\ntask: classification\nprimary: primary.onnx\nfallback: fallback.onnx\n"
        f"profile: profile.json\nstore: {{url: 'sqlite:///{tmp_path / 's.sqlite3'}'}}\n"
        "drift: {window_rows: 500, min_rows: 100}\nestimation: {sample_rate: 1.0}\n"
    )
    rt = ServingRuntime(load_config(tmp_path / "serving.yaml"))
    try:
        rows = df.iloc[2500:].drop(columns="label").to_dict(orient="records")
        routes = []
        for i in range(0, len(rows), 50):
            routes += rt.predict(rows[i : i + 50], request_id=new_request_id()).routes.tolist()
        rt.recorder.flush(10)
        rt.flush_drift()
        rt.monitor.view()
        cur = rt.estimates.view["current"]  # type: ignore[union-attr]
        assert cur["n"] == 500
        assert (
            set(cur["guarded"]) == {"n", "accuracy", "f1", "roc_auc"} and cur["guarded"]["n"] == 500
        )
        assert cur["primary"]["n"] == routes.count("primary")
        assert 0.5 < cur["guarded"]["accuracy"] <= 1.0
    finally:
        rt.close()


def test_archived_windows_still_count_in_the_cumulative_estimate(tmp_path: Path, monkeypatch) -> None:
    """Old windows are folded into one archived segment (bounded reads); their estimation tallies
    go with them, so the cumulative estimate covers every row, as the cumulative drift view does."""
    import guarded_serving.monitor as monitor

    monkeypatch.setattr(monitor, "MAX_LISTED_WINDOWS", 2)
    monkeypatch.setattr(monitor, "KEEP_WINDOWS", 1)
    monkeypatch.setattr(monitor, "ARCHIVE_SLACK", 0)
    rt = ServingRuntime(load_config(write_config(tmp_path, **SETTINGS)))
    try:
        rows = _data.json_rows(_data.features(_data.holdout().head(3 * WINDOW)))
        for i in range(0, 3 * WINDOW, 100):
            rt.predict(rows[i : i + 100], request_id=new_request_id())
            if (i + 100) % WINDOW == 0:
                rt.recorder.flush(10)
                rt.flush_drift()
        rt.monitor.view()
        assert any(s["worker"] == ARCHIVED for s in rt.store().segments()), "the oldest window was folded"
        rt.monitor.view()
        est = rt.estimates.view  # type: ignore[union-attr]
        assert est is not None and est["cumulative"]["n"] == 3 * WINDOW
    finally:
        rt.close()
