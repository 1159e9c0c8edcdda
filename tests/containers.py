"""Podman for the deploy tests: build the image of a bento the no-registry way, run containers on
the host's network (so they reach loopback only), and load them with a client that tells refused
connections from lost requests."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .conftest import wait_until
from .server import ROOT

DEPLOY = ROOT / "deploy"
CONTAINERS_CONF = DEPLOY / "container" / "containers.conf"
BASE_IMAGE = "localhost/guarded-serving-base:bookworm"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), "BENTOML_DO_NOT_TRACK": "true"}


def podman(
    *args: str, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise RuntimeError(
            f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}"
        )
    return out


def podman_unavailable() -> str | None:
    """Why podman cannot run containers here, or None when it can (building the base image first)."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc debootstrap)"
    base = subprocess.run(
        ["bash", str(DEPLOY / "container" / "base-image.sh"), BASE_IMAGE],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if base.returncode != 0:
        raise RuntimeError(f"base-image.sh failed:\n{base.stdout}{base.stderr}")
    probe = podman("run", "--rm", "--network", "host", BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        return f"podman cannot run containers here: {probe.stderr.strip()[-500:]}"
    return None


def build_image(bento_tag: str, env: dict[str, str]) -> str:
    """``deploy/container/build-image.sh`` for ``bento_tag``; returns the image name."""
    image = f"localhost/gs-test-{bento_tag.split(':')[0]}:{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        ["bash", str(DEPLOY / "container" / "build-image.sh"), bento_tag, image],
        env={**podman_env(), **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert out.stdout.strip().splitlines()[-1] == image
    return image


#: The last test image, kept under this name so that its layers (the Python packages above all)
#: are the build cache of the next run: a test build then takes seconds, not minutes.
CACHE_IMAGE = "localhost/guarded-serving-test-cache:latest"


def retire_image(image: str) -> None:
    """Remove a test image but keep its layers as the next build's cache (see CACHE_IMAGE)."""
    previous = podman("image", "inspect", "--format", "{{.Id}}", CACHE_IMAGE, check=False).stdout.strip()
    podman("tag", image, CACHE_IMAGE)
    podman("rmi", image)  # only the name: the image lives on as CACHE_IMAGE
    current = podman("image", "inspect", "--format", "{{.Id}}", CACHE_IMAGE).stdout.strip()
    if previous and previous != current:
        podman("rmi", previous, check=False)  # with the layers only it had


class Container:
    """One container of ``image`` on the host's network, serving on ``port``."""

    def __init__(
        self,
        image: str,
        port: int,
        env: dict[str, str] | None = None,
        volumes: dict[Path, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.image, self.port = image, port
        self.name = name or f"gs-test-{uuid.uuid4().hex[:10]}"
        self.url = f"http://127.0.0.1:{port}"
        self.env = env or {}
        self.volumes = volumes or {}
        self.started_at = 0.0

    def start(self) -> Container:
        args = ["run", "-d", "--name", self.name, "--network", "host"]
        for k, v in self.env.items():
            args += ["-e", f"{k}={v}"]
        for host, inside in self.volumes.items():
            args += ["-v", f"{host}:{inside}"]
        self.started_at = time.monotonic()
        podman(*args, self.image, "--port", str(self.port), "--host", "127.0.0.1")
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from `podman run` to the first 200 from /readyz."""

        def ready_or_dead() -> bool:
            if self.ready():
                return True
            if not self.running():
                raise RuntimeError(f"{self.name} exited before it was ready:\n{self.logs()}")
            return False

        try:
            wait_until(ready_or_dead, timeout, interval=0.1)
        except AssertionError:
            raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.logs()}") from None
        return time.monotonic() - self.started_at

    def running(self) -> bool:
        out = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return out.returncode == 0 and out.stdout.strip() == "true"

    def signal(self, sig: str) -> None:
        podman("kill", "--signal", sig, self.name)

    def wait_exit(self, timeout: float) -> int:
        out = podman("wait", self.name, timeout=timeout)
        return int(out.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        out = podman("logs", self.name, check=False)
        return (out.stdout + out.stderr)[-6000:]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@dataclass
class Outcome:
    kind: str  # "predict" or "feedback"
    started: float
    request_id: str
    status: int | None = None  # HTTP status, or None when no answer came
    error: str | None = None  # the exception's type when no answer came
    rows: int = 0
    served_by: str | None = None  # the balancer's X-Served-By
    retried: bool = False  # sent again, with the same request id, after a connection dropped unanswered


def post(
    client: httpx.Client | None,
    url: str,
    kind: str,
    request_id: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    retry_dropped: bool = False,
) -> Outcome:
    """One POST, its answer or the exception, as an :class:`Outcome` (never raises). With
    ``retry_dropped``, a connection closed without an answer is retried once, as a client of an
    idempotent route would (the request id makes a repeat of a served request harmless)."""
    o = Outcome(
        kind=kind,
        started=time.monotonic(),
        request_id=request_id,
        rows=len(body.get("rows", body.get("outcomes", []))),
    )
    for _ in range(2 if retry_dropped else 1):
        try:
            r = (client or httpx).post(url, json=body, timeout=30.0, headers=headers)
            o.status, o.served_by, o.error = r.status_code, r.headers.get("x-served-by"), None
            break
        except httpx.RemoteProtocolError as e:
            o.error, o.retried = type(e).__name__, retry_dropped
        except httpx.HTTPError as e:
            o.error = type(e).__name__
            break
    return o


@dataclass
class Load:
    """``threads`` clients calling ``send(client, i)`` until stopped; each call returns the
    outcomes of the requests it made."""

    send: Callable[[httpx.Client, int], list[Outcome]]
    threads: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, k: int) -> None:
        with httpx.Client() as client:
            i = 0
            while not self._stop.is_set():
                got = self.send(client, k * 1_000_000 + i)
                with self._lock:
                    self.outcomes.extend(got)
                if any(o.error for o in got):
                    time.sleep(0.01)
                i += 1

    def __enter__(self) -> Load:
        self._workers = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)
        ]
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=60)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)
