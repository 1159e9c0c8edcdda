"""The drift report rendered in headless Chromium agrees with GET /drift; production data exported
from the log trains the next profile."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from guarded_serving.cli import main as cli
from guarded_serving.profile import Profile

from . import _data
from .server import Server, write_config

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A service that saw in-range and shifted traffic, with outcomes for both; its config and
    its final GET /drift body."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = write_config(tmp, drift={"window_rows": 400, "min_rows": 200}, store={"flush_seconds": 0.3})
    serve = _data.serve()
    data = pd.concat([_data.holdout().sample(800, random_state=5),
                      serve[serve["carat"] >= 1.0].sample(800, random_state=5)], ignore_index=True)
    with Server(cfg) as srv:
        for start in range(0, len(data), 50):
            chunk = data.iloc[start:start + 50]
            rows = _data.json_rows(_data.features(chunk))
            r = httpx.post(srv.url + "/predict", json={"rows": rows}, timeout=30.0)
            assert r.status_code == 200, r.text
            if start < 1200:  # outcomes for most of the traffic, not all
                fb = httpx.post(srv.url + "/feedback", timeout=30.0, json={
                    "request_id": r.json()["request_id"], "outcomes": chunk["price"].astype(float).tolist()})
                assert fb.status_code == 200, fb.text
        import time

        time.sleep(1.0)
        drift = httpx.get(srv.url + "/drift", timeout=30.0).json()
        assert drift["cumulative"]["rows"] == len(data)
    yield cfg, drift


class _Cells(HTMLParser):
    """Text by element id, and per-feature table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.features: dict[str, dict[str, str]] = {}
        self._stack: list[tuple[str | None, str | None, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self._stack.append((a.get("id"), a.get("data-feature"), a.get("class")))
        if a.get("data-feature"):
            self.features[a["data-feature"] or ""] = {}

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for id_, _, _ in self._stack:
            if id_:
                self.by_id[id_] = self.by_id.get(id_, "") + data
        feature = next((f for _, f, _ in reversed(self._stack) if f), None)
        cls = self._stack[-1][2] if self._stack else None
        if feature and cls in ("psi", "stat"):
            self.features[feature][cls] = data.strip()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium_and_matches_get_drift(served: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    cfg, drift = served
    out = tmp_path / "drift.html"
    assert cli(["report", str(cfg), "--out", str(out)]) == 0
    html = out.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = subprocess.run([*base, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "drift.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a real picture, not a blank page

    cells = _Cells()
    cells.feed(dom.stdout)
    current = drift["current"]
    assert current["status"] in cells.by_id["overall-status"]
    for f in current["features"]:
        shown = cells.features[f["name"]]
        assert float(shown["psi"]) == pytest.approx(f["psi"], rel=1e-3), f["name"]
        assert float(shown["stat"]) == pytest.approx(f["statistic"], rel=1e-3), f["name"]
    assert re.search(r"\d", cells.by_id["window-rows"])
    assert int(cells.by_id["window-rows"]) == current["window"]["rows"]
    assert ("retrain" in cells.by_id) == bool(drift["retrain_recommended"])
    assert "fallback did better" in cells.by_id["decision-impact"]


def test_export_then_profile_the_production_data(served: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    cfg, _ = served
    everything, labelled = tmp_path / "prod.parquet", tmp_path / "prod-labelled.parquet"
    assert cli(["export", str(cfg), "--out", str(everything)]) == 0
    assert cli(["export", str(cfg), "--out", str(labelled), "--with-outcomes-only"]) == 0
    all_rows, with_outcomes = pd.read_parquet(everything), pd.read_parquet(labelled)
    assert len(all_rows) == 1600 and len(with_outcomes) == 1200
    features = _data.features(_data.holdout()).columns.tolist()
    assert set(features) <= set(all_rows.columns)
    assert {"request_id", "row", "route", "reasons", "prediction", "primary_prediction",
            "fallback_prediction", "price"} <= set(all_rows.columns)
    assert all_rows["price"].isna().sum() == 400
    assert set(with_outcomes["route"]) == {"primary", "fallback"}
    assert cli(["export", str(cfg), "--out", str(tmp_path / "none.parquet"), "--since", "2999-01-01"]) == 0
    assert len(pd.read_parquet(tmp_path / "none.parquet")) == 0

    profile_path = tmp_path / "next-profile.json"
    assert cli(["profile", str(labelled), "--target", "price", "--from-export", "--out", str(profile_path)]) == 0
    fb = tmp_path / "next-fallback.onnx"
    assert cli(["fallback", str(everything), "--target", "price", "--task", "regression", "--from-export",
                "--out", str(fb)]) == 0
    assert fb.stat().st_size > 0
    nxt = Profile.load(profile_path)
    assert nxt.feature_names == features
    assert nxt.n_rows == 1200
    assert nxt.feature("carat").max > Profile.load(_data.EXAMPLE / "profile.json").feature("carat").max
