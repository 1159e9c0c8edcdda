"""Start the real guarded service (``bentoml serve``) on a free loopback port for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from ._data import EXAMPLE, TARGET, features, json_rows

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "guarded_serving.service:GuardedService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, **overrides: Any) -> Path:
    """A copy of the example serving config in ``directory`` with absolute model paths."""
    cfg = yaml.safe_load((EXAMPLE / "serving.yaml").read_text())
    for role in ("primary", "fallback"):
        cfg[role] = {"path": str(EXAMPLE / cfg[role]["path"])}
    cfg["profile"] = str(EXAMPLE / cfg["profile"])
    cfg.setdefault("store", {})["url"] = f"sqlite:///{directory / 'store.sqlite3'}"
    cfg.pop("retrain", None)  # the example's script lies beside the example, not here
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict) and k not in ("primary", "fallback"):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = directory / "serving.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. BentoML's workers are not all in the server's
    process group, so they are found by ancestry."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def worker_processes(pid: int) -> list[Any]:
    """The BentoML worker processes (psutil) under the server process ``pid``."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if "_bentoml_impl.worker" in " ".join(p.cmdline())]


class Server:
    """``with Server(config) as srv: httpx.post(srv.url + "/predict", ...)``"""

    def __init__(self, config: Path, workers: int = 1, env: dict[str, str | None] | None = None,
                 port: int | None = None, target: str = SERVICE, cwd: Path = ROOT) -> None:
        self.config = config
        self.target, self.cwd = target, cwd
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / f"server-{self.port}.log"
        merged: dict[str, str | None] = {
            **os.environ,
            "GUARDED_SERVING_CONFIG": str(config),
            "GUARDED_SERVING_WORKERS": str(workers),
            "BENTOML_DO_NOT_TRACK": "true",
            # BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts: servers
            # sharing a home lose each other's metrics. Each test server gets its own.
            "BENTOML_HOME": str(config.parent / f"bentoml-home-{self.port}"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(env or {}),
        }
        self.env: dict[str, str] = {k: v for k, v in merged.items() if v is not None}  # None: unset it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=str(self.cwd), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self, tail: int | None = 5000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:] if tail else text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # every descendant: workers are not all in the server's process group

    def kill(self) -> None:
        """SIGKILL the server and every worker, as when a container is killed."""
        if self.proc is None:
            return
        kill_tree(self.proc.pid)
        self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def running(servers: dict[str, Server]) -> Iterator[dict[str, Server]]:
    """Start ``servers`` side by side (startup is most of an e2e module's time); stop them after."""
    with ThreadPoolExecutor(len(servers)) as ex:
        list(ex.map(lambda s: s.start(), servers.values()))
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def predict_with_outcomes(client: httpx.Client, df: Any) -> dict[str, Any]:
    """POST /predict with the features of ``df``, then /feedback with its true prices (its
    ``price`` column); the /predict answer."""
    body: dict[str, Any] = client.post("/predict", json={"rows": json_rows(features(df))}).json()
    client.post(
        "/feedback",
        json={"request_id": body["request_id"], "outcomes": [float(p) for p in df[TARGET]]},
    ).raise_for_status()
    return body

