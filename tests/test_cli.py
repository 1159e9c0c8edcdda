import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from guarded_serving.cli import main
from guarded_serving.profile import Profile

from ._data import CONFIG, EXAMPLE, features, holdout, json_rows
from .conftest import wait_until
from .server import free_port, kill_tree, worker_processes, write_config

DATA = EXAMPLE / "data"


def test_profile_fallback_check_predict(tmp_path, capsys) -> None:
    assert main(["profile", str(DATA / "train.parquet"), "--target", "price",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert Profile.load(tmp_path / "p.json").n_rows > 10_000
    assert main(["fallback", str(DATA / "train.parquet"), "--target", "price",
                 "--task", "regression", "--out", str(tmp_path / "fb.onnx")]) == 0
    capsys.readouterr()
    assert main(["check", str(DATA / "serve.parquet"), "--profile", str(tmp_path / "p.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 10_000 and report["fallback"] > 4000
    assert report["reasons"]["out_of_range:carat"] == 5000
    assert main(["check", str(DATA / "serve.parquet"), "--profile", str(tmp_path / "p.json")]) == 0
    assert "to fallback" in capsys.readouterr().out
    out = tmp_path / "pred.parquet"
    assert main(["predict", str(CONFIG), str(DATA / "serve.parquet"), "--out", str(out)]) == 0
    pred = pd.read_parquet(out)
    assert set(pred.route) == {"primary", "fallback"} and len(pred) == 10_000


def test_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("name: x\n")
    assert main(["predict", str(tmp_path / "c.yaml"), str(DATA / "serve.parquet")]) == 2
    err = capsys.readouterr().err
    assert "task: required key missing" in err and "profile: required key missing" in err


@pytest.mark.e2e
def test_serve_runs_bentoml_with_the_workers_asked_and_stops_on_sigterm(tmp_path) -> None:
    # `guarded-serving serve` must become BentoML's server, so that the SIGTERM a container runtime
    # or process manager sends stops the workers too, and nothing is left holding the port.
    import psutil

    port = free_port()
    cfg = write_config(tmp_path)
    exe = Path(sys.executable).parent / "guarded-serving"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "true"}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(exe), "serve", str(cfg), "--port", str(port), "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready in 90 s"
            time.sleep(0.3)
        rows = json_rows(features(holdout()).head(1))
        r = httpx.post(url + "/predict", json={"rows": rows}, timeout=30)
        assert r.status_code == 200 and r.json()["routes"] == ["primary"]
        server = psutil.Process(proc.pid)
        assert "bentoml" in server.cmdline() and "serve" in server.cmdline()
        workers = worker_processes(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)  # to the server alone, as `docker stop` does to PID 1
        assert proc.wait(timeout=60) is not None
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, alive
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/readyz", timeout=2)
    finally:
        if proc.poll() is None:  # the test failed with the server up: leave no worker behind
            kill_tree(proc.pid)
            proc.wait()
        log.close()


def _serve(tmp_path: Path, cfg: Path, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "guarded-serving"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "true"}
    log = (tmp_path / "serve.log").open("wb")
    return subprocess.Popen([str(exe), "serve", str(cfg), "--port", str(port), "--workers", str(workers)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.e2e
@pytest.mark.parametrize(("overrides", "reason"), [
    ({"primary": {"path": "untrusted.joblib"}}, "refusing to load"),
    ({"primary": {"path": "corrupt.onnx"}}, "cannot load ONNX model"),
    ({"task": "classification"}, "the profile says 'regression'"),
])
def test_serve_exits_nonzero_with_the_reason_when_a_model_cannot_load(tmp_path, overrides, reason) -> None:
    (tmp_path / "untrusted.joblib").write_bytes(b"not really a pickle")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    if "primary" in overrides:
        overrides = {"primary": {"path": str(tmp_path / overrides["primary"]["path"])}}
    proc = _serve(tmp_path, write_config(tmp_path, **overrides), free_port())
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert reason in (tmp_path / "serve.log").read_text()


@pytest.mark.e2e
def test_workers_die_with_a_killed_server(tmp_path) -> None:
    import psutil

    port = free_port()
    proc = _serve(tmp_path, write_config(tmp_path), port, workers=2)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            return httpx.get(url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90)
        workers = worker_processes(proc.pid)
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGKILL)  # the server's process group; workers have their own sessions
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, alive
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/readyz", timeout=2)
    finally:
        kill_tree(proc.pid)


def test_predict_names_missing_columns_and_exits_2(tmp_path, capsys) -> None:
    data = tmp_path / "no_depth.csv"
    features(holdout()).head(20).drop(columns=["depth", "table"]).to_csv(data, index=False)
    assert main(["predict", str(CONFIG), str(data)]) == 2
    err = capsys.readouterr().err
    assert "depth, table" in err and '"column": "depth"' in err


def test_export_writes_the_format_its_suffix_names(tmp_path, capsys) -> None:
    from guarded_serving.config import load_config
    from guarded_serving.runtime import ServingRuntime

    cfg = write_config(tmp_path)
    rt = ServingRuntime(load_config(cfg))
    rt.predict(json_rows(features(holdout()).head(3)), request_id="export-1")
    rt.close()
    assert main(["export", str(cfg), "--out", str(tmp_path / "log.json")]) == 0
    records = json.loads((tmp_path / "log.json").read_text())
    assert [r["request_id"] for r in records] == ["export-1"] * 3 and "carat" in records[0]
    assert main(["export", str(cfg), "--out", str(tmp_path / "log.jsonl")]) == 0
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    assert main(["export", str(cfg), "--out", str(tmp_path / "log.xlsx")]) == 2
    assert "unknown file type '.xlsx'" in capsys.readouterr().err
    assert not (tmp_path / "log.xlsx").exists()


def test_predict_finds_a_callable_in_the_working_directory_as_serve_does(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_price_model.py").write_text("def predict(df):\n    return df['carat'] * 1000.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cfg = write_config(tmp_path, primary={"callable": "my_price_model:predict"})
    data = tmp_path / "rows.csv"
    features(holdout()).head(5).to_csv(data, index=False)
    assert main(["predict", str(cfg), str(data)]) == 0
    assert "5 rows: 5 primary" in capsys.readouterr().err


@pytest.mark.e2e
def test_plain_bentoml_serve_stops_when_a_worker_cannot_load_its_model(tmp_path) -> None:
    from .server import Server

    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    srv = Server(write_config(tmp_path, primary={"path": str(tmp_path / "corrupt.onnx")}))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout=60)
    assert time.monotonic() - t0 < 30
    assert "cannot serve diamonds-price: cannot load ONNX model" in srv.logs(tail=None)
