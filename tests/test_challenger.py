"""The challenger in shadow: scored by the recorder on answered rows, logged with its version,
judged beside the champion on outcomes by /performance (in process, temporary SQLite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.config import load_config
from guarded_serving.runtime import ServingRuntime, new_request_id

from ._data import EXAMPLE, features, json_rows, serve
from .server import Server, predict_with_outcomes, write_config

CHALLENGER = {"path": str(EXAMPLE / "fallback.onnx"), "version": "challenger-1"}


def _runtime(tmp_path: Path, **overrides: object) -> ServingRuntime:
    return ServingRuntime(
        load_config(write_config(tmp_path, **{"challenger": CHALLENGER, **overrides}))
    )


def test_challenger_is_logged_on_every_answered_row_with_its_version(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    frame = features(serve()).head(200)
    ids = [new_request_id() for _ in range(20)]
    for i, rid in enumerate(ids):
        rt.predict(json_rows(frame.iloc[i * 10 : (i + 1) * 10]), request_id=rid)
    assert rt.recorder.flush(10)
    df = rt.store().joined()
    assert len(df) == 200
    assert df["challenger_prediction"].notna().all() and set(df["challenger_version"]) == {
        "challenger-1"
    }
    expected = load_model(EXAMPLE / "fallback.onnx", task="regression").predict(frame).labels
    assert np.allclose(df["challenger_prediction"].astype(float), expected, rtol=1e-5)
    rt.close()


def test_sampled_challenger_scores_a_share_and_never_rejected_rows(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, challenger={**CHALLENGER, "sample_rate": 0.3})
    rows = json_rows(features(serve()).head(20))
    rows[0] = {**rows[0], "carat": "heavy"}  # rejected, logged with no prediction
    for _ in range(50):
        rt.predict(rows, request_id=new_request_id(), on_reject="mark")
    assert rt.recorder.flush(10)
    df = rt.store().joined()
    scored = df["challenger_prediction"].notna()
    assert not scored[df["route"] == "rejected"].any()
    assert 0.15 < scored.mean() < 0.45
    assert (df.loc[scored, "challenger_version"] == "challenger-1").all()
    assert df.loc[~scored, "challenger_version"].isna().all()
    rt.close()


def test_performance_shows_the_challenger_beside_the_champion_with_intervals(
    tmp_path: Path,
) -> None:
    rt = _runtime(tmp_path)
    df = serve().head(300)
    rows = json_rows(features(df))
    ids = [new_request_id() for _ in range(30)]
    for i, rid in enumerate(ids):
        rt.predict(rows[i * 10 : (i + 1) * 10], request_id=rid)
    assert rt.recorder.flush(10)
    price = df["price"].tolist()
    rt.feedback(
        [(rid, j, float(price[i * 10 + j])) for i, rid in enumerate(ids) for j in range(10)]
    )
    perf = rt.performance()
    assert perf["overall"]["challenger"]["n"] == 300
    ch = perf["challenger"]
    assert ch["version"] == "challenger-1" and ch["n"] == 300
    assert ch["verdict"] in {"better", "worse", "inconclusive"}
    lo, hi = ch["intervals"]["candidate"]["mae"]
    assert lo <= ch["candidate"]["mae"] <= hi
    # The same figure as the live view's, on the same rows.
    assert abs(ch["candidate"]["mae"] - perf["overall"]["challenger"]["mae"]) < 1e-6
    assert "primary" in ch["intervals"] and "guarded" in ch["comparisons"]
    rt.close()


def test_no_challenger_no_challenger_figures(tmp_path: Path) -> None:
    rt = ServingRuntime(load_config(write_config(tmp_path)))
    rid = new_request_id()
    rt.predict(json_rows(features(serve()).head(5)), request_id=rid)
    assert rt.recorder.flush(10)
    rt.feedback([(rid, 0, 1000.0)])
    perf = rt.performance()
    assert "challenger" not in perf and "challenger" not in perf["overall"]
    rt.close()


@pytest.mark.e2e
def test_a_retrained_challenger_shows_better_on_live_outcomes_over_http(tmp_path: Path) -> None:
    """The example's retraining script on shifted production rows with outcomes; its candidate
    served as the challenger on later rows of the same shift, with every true price fed back."""
    shifted = serve()
    shifted.iloc[:3000].to_parquet(tmp_path / "export.parquet")
    candidate = tmp_path / "candidate.onnx"
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "retrain.py"),
            "--export",
            str(tmp_path / "export.parquet"),
            "--out",
            str(candidate),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    cfg = write_config(
        tmp_path,
        challenger={"path": str(candidate), "version": "retrained-1"},
        store={"flush_seconds": 0.3},
    )
    live = shifted.iloc[3000:4500]
    with Server(cfg, workers=2) as srv, httpx.Client(base_url=srv.url, timeout=60.0) as c:
        for i in range(0, len(live), 50):
            part = live.iloc[i : i + 50]
            predict_with_outcomes(c, part)
        perf = c.get("/performance").json()
        metrics = c.get("/metrics").text
    ch = perf["challenger"]
    print(
        f"\n{ch['n']} outcomes: challenger mae {ch['candidate']['mae']:.1f} {ch['intervals']['candidate']['mae']}, "
        f"primary {ch['primary']['mae']:.1f} {ch['intervals']['primary']['mae']}, guarded "
        f"{ch['guarded']['mae']:.1f} {ch['intervals']['guarded']['mae']}; improvement over guarded "
        f"{ch['comparisons']['guarded']['improvement']['mae']:.1f} "
        f"{ch['comparisons']['guarded']['intervals']['mae']}: {ch['verdict']}"
    )
    assert ch["n"] == len(live) and ch["version"] == "retrained-1"
    assert ch["verdict"] == "better"
    assert 'role="challenger"' in metrics


def test_drift_shows_the_challengers_prediction_drift_against_its_profile(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, drift={"min_rows": 50})
    frame = features(serve()).head(300)
    for i in range(0, 300, 30):
        rt.predict(json_rows(frame.iloc[i : i + 30]), request_id=new_request_id())
    view = rt.drift()
    ch = view["challenger"]
    assert ch["version"] == "challenger-1" and ch["rows"] == 300
    pred = ch["prediction"]
    assert pred["status"] in {"ok", "warn", "drift"} and pred["psi"] is not None
    # The same test the primary's predictions get, on the challenger's own answers.
    expected = load_model(EXAMPLE / "fallback.onnx", task="regression").predict(frame).labels
    from guarded_serving.challenger import challenger_drift

    direct = challenger_drift(rt.challenger, list(expected), 50)  # type: ignore[arg-type]
    assert direct["prediction"]["psi"] == pytest.approx(pred["psi"], rel=1e-6)
    rt.close()
