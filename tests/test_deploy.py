"""Deploying for real: a bento of a model that is not the example, built into an image with podman
from the local base image (no registry), run, loaded, and stopped with SIGTERM under traffic.

Skipped, with the reason, only where podman cannot run containers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from guarded_serving.store.sql import Store

from .containers import (
    BASE_IMAGE,
    Container,
    Load,
    build_image,
    podman,
    podman_unavailable,
    wait_until,
)
from .iris_model import make_iris_project
from .iris_model import rows as iris_rows
from .otlp_receiver import OtlpReceiver
from .server import ROOT, free_port

pytestmark = pytest.mark.e2e
#: What Kubernetes gives a pod by default between SIGTERM and SIGKILL.
GRACE_SECONDS = 30.0


@pytest.fixture(scope="module")
def podman_ready() -> None:
    reason = podman_unavailable()
    if reason:
        print(f"\nskipping the container tests: {reason}", file=sys.stderr)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def iris_image(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image of a bento built by `guarded-serving build` for the iris model."""
    work = tmp_path_factory.mktemp("iris-image")
    config = make_iris_project(work / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDED_SERVING_")}
    env.update(
        BENTOML_HOME=str(work / "bentoml-home"), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(ROOT)
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "guarded_serving.cli",
            "build",
            str(config),
            "--base-image",
            BASE_IMAGE,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    image = build_image(tag, env)
    print(f"\nbuilt {image} from {tag} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    yield image
    podman("rmi", "-f", image, check=False)


def test_the_image_runs_as_a_non_root_user_on_port_3000(iris_image: str) -> None:
    info = json.loads(podman("image", "inspect", iris_image).stdout)[0]
    assert info["Config"]["User"] == "bentoml"
    assert "3000/tcp" in info["Config"]["ExposedPorts"]
    assert info["Config"]["StopSignal"] == "SIGTERM"
    print(f"\nimage size: {info['Size'] / 1e6:.0f} MB", file=sys.stderr)


def test_the_container_answers_then_drains_on_sigterm(iris_image: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # the image's user (not root) writes the SQLite store there
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("s3cret-token\n")
    with OtlpReceiver() as rx:
        box = Container(
            iris_image,
            free_port(),
            env={
                "GUARDED_SERVING_WORKERS": "2",
                "GUARDED_SERVING_TOKEN_FILE": "/run/secrets/gs/token",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rx.port}",
            },
            volumes={data: "/home/bentoml/data", secrets: "/run/secrets/gs:ro"},
        )
        try:
            box.start()
            cold_start = box.wait_ready()
            print(f"\ncold start (podman run to /readyz 200): {cold_start:.1f}s", file=sys.stderr)

            r = httpx.post(box.url + "/predict", json={"rows": iris_rows(2, 1)}, timeout=30.0)
            assert r.status_code == 200, r.text
            assert r.json()["routes"] == ["primary", "primary", "fallback"]
            assert "out_of_range:petal_length" in r.json()["reasons"][2]
            rid = r.json()["request_id"]
            fb = {"request_id": rid, "outcomes": ["setosa", "setosa", "virginica"]}
            assert httpx.post(box.url + "/feedback", json=fb, timeout=10.0).status_code == 401
            ok = httpx.post(
                box.url + "/feedback",
                json=fb,
                timeout=10.0,
                headers={"Authorization": "Bearer s3cret-token"},
            )
            assert ok.status_code == 200, ok.text  # the token came from the mounted file

            with Load(box.url, lambda i: {"rows": iris_rows(200, 50)}, threads=6) as load:
                wait_until(lambda: sum(o.status == 200 for o in load.snapshot()) >= 30, 60)
                box.signal("TERM")
                sigterm = time.monotonic()
                code = box.wait_exit(timeout=GRACE_SECONDS + 30)
                stopped_in = time.monotonic() - sigterm
            outcomes = load.snapshot()
        finally:
            logs = box.logs()
            box.remove()

        kinds = Counter(o.status if o.status is not None else o.error for o in outcomes)
        print(
            f"SIGTERM under load: exited with {code} in {stopped_in:.1f}s; client outcomes {dict(kinds)}",
            file=sys.stderr,
        )
        assert stopped_in < GRACE_SECONDS, logs
        assert code == 0, logs
        # In flight at SIGTERM: every request the service took was answered and logged. A
        # refused connection (ConnectError), or one reset while still queued in the listening
        # socket's backlog, is a request it never read (so never logged): safe to retry.
        store = Store(f"sqlite:///{data / 'iris-species.sqlite3'}")
        try:
            logged = Counter(store.joined()["request_id"])  # flushed before the exit
        finally:
            store.close()
        answered = [o for o in outcomes if o.status == 200]
        assert answered and [o for o in answered if o.started < sigterm]
        assert all(o.status in (200, None) for o in outcomes), kinds
        taken_but_unanswered = [o for o in outcomes if o.status is None and o.request_id in logged]
        assert not taken_but_unanswered, (kinds, logs)
        missing = [o.request_id for o in answered if logged.get(o.request_id) != o.rows]
        assert not missing, f"{len(missing)} answered requests not (fully) logged"
        traced = {
            s.attributes.get("guarded_serving.request.id")
            for s in rx.snapshot()
            if s.name == "guarded_serving.predict"
        }
        untraced = [o.request_id for o in answered if o.request_id not in traced]
        assert not untraced, f"{len(untraced)} of {len(answered)} answered requests have no span"
