"""Deploying for real: a bento of a model that is not the example, built into an image with podman
from the local base image (no registry), run, loaded, and stopped with SIGTERM under traffic.

Skipped, with the reason, only where podman cannot run containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from guarded_serving.bento import BUNDLE_DIR
from guarded_serving.config import load_config
from guarded_serving.drift.state import DriftState
from guarded_serving.drift.stats import DriftThresholds, evaluate
from guarded_serving.guard import GuardedModel
from guarded_serving.store.sql import Store

from .conftest import wait_until
from .containers import (
    BASE_IMAGE,
    Container,
    Load,
    Outcome,
    build_image,
    podman,
    podman_unavailable,
    post,
    retire_image,
)
from .iris_model import FEATURES as IRIS_FEATURES
from .iris_model import TARGET as IRIS_TARGET
from .iris_model import iris, make_iris_project
from .iris_model import rows as iris_rows
from .otlp_receiver import OtlpReceiver
from .server import ROOT, free_port

pytestmark = pytest.mark.e2e
#: What Kubernetes gives a pod by default between SIGTERM and SIGKILL.
GRACE_SECONDS = 30.0
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: The image's tables, in the SQLite of one container and in the PostgreSQL shared by the replicas.
PREFIX = f"gs_deploy_{uuid.uuid4().hex[:8]}_"


@pytest.fixture(scope="module")
def podman_ready() -> None:
    reason = podman_unavailable()
    if reason:
        print(f"\nskipping the container tests: {reason}", file=sys.stderr)
        pytest.skip(reason)


@dataclass(frozen=True)
class Built:
    image: str
    config: Path  # the serving config the image's bento was built from


@pytest.fixture(scope="module")
def iris_build(podman_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The image of a bento built by `guarded-serving build` for the iris model."""
    work = tmp_path_factory.mktemp("iris-image")
    # One open drift window (nothing compacted), quick flushes, tables of this run only.
    config = make_iris_project(
        work / "project",
        store={"table_prefix": PREFIX, "flush_seconds": 0.5},
        drift={"window_rows": 100_000, "min_rows": 100},
    )
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
    yield Built(image, config)
    retire_image(image)


@pytest.fixture
def iris_image(iris_build: Built) -> str:
    return iris_build.image


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

            def send(client: httpx.Client, i: int) -> list[Outcome]:
                # A new connection per request: a refused connection (never taken) is told apart
                # from a request dropped after the server read it.
                return [
                    post(
                        None,
                        box.url + "/predict",
                        "predict",
                        f"sigterm-{i}",
                        {"rows": iris_rows(200, 50)},
                        {"X-Request-ID": f"sigterm-{i}", "Connection": "close"},
                    )
                ]

            with Load(send, threads=6) as load:
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
        store = Store(f"sqlite:///{data / 'iris-species.sqlite3'}", prefix=PREFIX)
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


def test_a_mounted_config_and_store_url_file_override_the_image(
    iris_build: Built, tmp_path: Path
) -> None:
    """What deploy/k8s does: the serving config from a ConfigMap (models and profile stay in the
    image) and the store URL from a Secret file."""
    image_bundle = f"/home/bentoml/bento/src/{BUNDLE_DIR}"
    cfg = yaml.safe_load(iris_build.config.read_text())
    cfg.update(
        primary={"path": f"{image_bundle}/primary.onnx"},
        fallback={"path": f"{image_bundle}/fallback.onnx"},
        profile=f"{image_bundle}/profile.json",
        max_rows=7,
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "serving.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "store-url").write_text(
        "sqlite:////home/bentoml/data/from-secret.sqlite3\n"
    )
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    box = Container(
        iris_build.image,
        free_port(),
        env={
            "GUARDED_SERVING_CONFIG": "/etc/guarded-serving/serving.yaml",
            "GUARDED_SERVING_STORE_URL_FILE": "/run/secrets/gs/store-url",
        },
        volumes={
            tmp_path / "config": "/etc/guarded-serving:ro",
            tmp_path / "secrets": "/run/secrets/gs:ro",
            data: "/home/bentoml/data",
        },
    )
    try:
        box.start()
        box.wait_ready()
        assert (
            httpx.post(
                box.url + "/predict", json={"rows": iris_rows(8, 0)}, timeout=30.0
            ).status_code
            == 413
        )
        r = httpx.post(box.url + "/predict", json={"rows": iris_rows(2, 1)}, timeout=30.0)
        assert r.status_code == 200, r.text
        box.signal("TERM")
        assert box.wait_exit(GRACE_SECONDS) == 0
    finally:
        logs = box.logs()
        box.remove()
    store = Store(f"sqlite:///{data / 'from-secret.sqlite3'}", prefix=PREFIX)
    try:
        assert set(store.joined()["request_id"]) == {r.json()["request_id"]}, logs
    finally:
        store.close()


# -- replicas behind HAProxy on one PostgreSQL ------------------------------------------------


@pytest.fixture
def pg_tables() -> Iterator[None]:
    """PostgreSQL reachable; this run's tables (PREFIX) dropped afterwards."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL)
    try:
        engine.connect().close()
    except Exception as e:  # pragma: no cover - .ci/run starts PostgreSQL first
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}: {e}")
    yield
    with engine.begin() as conn:
        for (name,) in conn.execute(
            sa.text("select tablename from pg_tables where tablename like :p"), {"p": PREFIX + "%"}
        ).all():
            conn.execute(sa.text(f'drop table if exists "{name}" cascade'))
    engine.dispose()


class Replicas:
    """``deploy/replicas/replicas.sh`` on free loopback ports."""

    def __init__(self, image: str, n: int, state: Path) -> None:
        self.image, self.n = image, n
        self.ports = [free_port() for _ in range(n)]
        self.lb_port, admin = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.lb_port}"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(ROOT / "deploy/container/containers.conf"),
            "GUARDED_SERVING_STORE_URL": PG_URL,
            "LB_PORT": str(self.lb_port),
            "ADMIN_PORT": str(admin),
            "REPLICA_PORTS": " ".join(map(str, self.ports)),
            "STATE_DIR": str(state),
            "GRACE": str(int(GRACE_SECONDS)),
        }

    def run(self, *args: str, timeout: float = 600) -> str:
        out = subprocess.run(
            ["bash", str(ROOT / "deploy/replicas/replicas.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def container(self, i: int) -> str:
        return f"gs-replica-{self.lb_port}-r{i}"


def mixed_batches(n: int = 48) -> list[pd.DataFrame]:
    """Batches of 5 to 40 iris rows; every third with petals half again as long (many of them out of
    the training range, so routed to the fallback)."""
    data = iris()
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        df = data.sample(int(rng.integers(5, 41)), replace=True, random_state=i).reset_index(
            drop=True
        )
        if i % 3 == 0:
            df["petal_length"] = df["petal_length"] * 1.5
        # As the service reads them: JSON numbers (the local computation must bin the same values).
        out.append(pd.DataFrame(json.loads(df.to_json(orient="records", double_precision=15))))
    return out


def local_drift(config: Path, batches: list[pd.DataFrame]) -> dict[str, dict[str, Any]]:
    """The drift evaluation computed in this process over all the traffic."""
    cfg = load_config(config)
    gm = GuardedModel.from_config(cfg)
    state = DriftState.empty(gm.profile)
    for df in batches:
        r = gm.predict(df[IRIS_FEATURES])
        assert r.verdicts is not None
        state.update(r.verdicts.columns, r.primary_predictions)
    ev = evaluate(state, gm.profile, DriftThresholds(min_rows=cfg.drift.min_rows))
    return {f["name"]: f for f in ev["features"]}


def predict_then_feedback(
    url: str, rows: list[dict[str, Any]], labels: list[str], client: httpx.Client
) -> list[Outcome]:
    rid = uuid.uuid4().hex
    p = post(client, url + "/predict", "predict", rid, {"rows": rows}, {"X-Request-ID": rid},
             retry_dropped=True)
    if p.status != 200:
        return [p]
    return [
        p,
        post(client, url + "/feedback", "feedback", rid, {"request_id": rid, "outcomes": labels},
             retry_dropped=True),
    ]


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


@pytest.mark.postgres
def test_three_replicas_behind_haproxy_on_one_postgresql(
    iris_build: Built, pg_tables: None, tmp_path: Path
) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    reps = Replicas(iris_build.image, 3, tmp_path / "replicas")
    figures: dict[str, Any] = {}
    try:
        reps.run("up", iris_build.image, "3")

        # Mixed traffic through the balancer, then the outcomes of every row through it too.
        batches = mixed_batches()
        with httpx.Client() as client, ThreadPoolExecutor(4) as ex:
            served = list(
                ex.map(
                    lambda df: predict_then_feedback(
                        reps.url,
                        df[IRIS_FEATURES].to_dict("records"),
                        df[IRIS_TARGET].tolist(),
                        client,
                    ),
                    batches,
                )
            )
        assert all(o.status == 200 for pair in served for o in pair), [failed(p) for p in served]
        predictions = [pair[0] for pair in served]
        feedback = [pair[1] for pair in served]
        assert {o.served_by for o in predictions} == {"r1", "r2", "r3"}
        elsewhere = sum(
            p.served_by != f.served_by for p, f in zip(predictions, feedback, strict=True)
        )
        assert elsewhere > 0  # outcomes joined on a replica that did not serve the prediction
        figures["feedback joined on another replica"] = f"{elsewhere}/{len(feedback)}"

        # /drift from any replica is the drift of all the traffic.
        total = sum(len(df) for df in batches)
        local = local_drift(iris_build.config, batches)
        for port in reps.ports:
            view = wait_until(
                lambda p=port: (lambda b: b if b["cumulative"]["rows"] >= total else None)(
                    httpx.get(f"http://127.0.0.1:{p}/drift", timeout=30.0).json()
                ),
                30,
            )
            assert view["cumulative"]["rows"] == total
            for f in view["cumulative"]["features"]:
                assert f["live_rows"] == local[f["name"]]["live_rows"], f["name"]
                assert f["psi"] == pytest.approx(local[f["name"]]["psi"], rel=1e-9, abs=1e-12), f[
                    "name"
                ]

        # SIGKILL of one replica under load, then a rolling restart (SIGTERM one at a time).
        data = iris()

        def send(client: httpx.Client, i: int) -> list[Outcome]:
            df = data.sample(5, random_state=i % 10_000)
            return predict_then_feedback(
                reps.url,
                json.loads(df[IRIS_FEATURES].to_json(orient="records")),
                df[IRIS_TARGET].tolist(),
                client,
            )

        with Load(send, threads=4) as load:
            wait_until(lambda: len(load.snapshot()) >= 40, 60)
            podman("kill", "--signal", "KILL", reps.container(2))
            before = len(load.snapshot())
            wait_until(lambda: len(load.snapshot()) >= before + 80, 60)
        kill_phase = load.snapshot()
        figures["haproxy after sigkill"] = reps.run("status").splitlines()
        with Load(send, threads=4) as load:
            wait_until(lambda: len(load.snapshot()) >= 20, 60)
            started = time.monotonic()
            reps.run("restart")
            figures["rolling restart seconds"] = round(time.monotonic() - started, 1)
        rolling_phase = load.snapshot()
    finally:
        subprocess.run(
            ["bash", str(ROOT / "deploy/replicas/replicas.sh"), "down"],
            env=reps.env,
            capture_output=True,
            timeout=300,
        )

    store = Store(PG_URL, prefix=PREFIX)
    try:
        log = store.joined(features=False)
    finally:
        store.close()
    stored = Counter(log.loc[log["outcome"].notna(), "request_id"])
    logged = set(log["request_id"])
    acked = [
        o
        for o in (*feedback, *kill_phase, *rolling_phase)
        if o.kind == "feedback" and o.status == 200
    ]
    lost = [o.request_id for o in acked if stored.get(o.request_id) != o.rows]
    for phase, outs in (("sigkill", kill_phase), ("rolling restart", rolling_phase)):
        figures[f"{phase}: requests"] = len(outs)
        figures[f"{phase}: failed"] = dict(
            Counter(f"{o.kind} {o.status or o.error}" for o in failed(outs))
        )
        # A connection the balancer closed unanswered, retried once with the same request id.
        figures[f"{phase}: retried after a dropped connection"] = sum(o.retried for o in outs)
    answered = [
        o
        for o in (*predictions, *kill_phase, *rolling_phase)
        if o.kind == "predict" and o.status == 200
    ]
    # Not a target here: a replica killed with SIGKILL loses the log rows it had not written yet.
    figures["answered predictions not in the log"] = dict(
        Counter(o.served_by for o in answered if o.request_id not in logged)
    )
    figures["acknowledged outcomes"] = len(acked)
    figures["lost acknowledged outcomes"] = len(lost)
    print(f"\nreplica figures: {json.dumps(figures)}", file=sys.stderr)
    assert not lost
    assert not failed(rolling_phase), figures
