"""The image's entrypoint (guarded_serving/container/entrypoint.sh): settings from mounted secret
files and OpenTelemetry's variables, then BentoML's entrypoint with the same arguments. Run here
with a stand-in for BentoML's entrypoint that prints what it was given; the container tests run
the real one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from guarded_serving.bento import CONTAINER_DIR

ENTRYPOINT = CONTAINER_DIR / "entrypoint.sh"


def run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    docker = tmp_path / "bento" / "env" / "docker"
    docker.mkdir(parents=True, exist_ok=True)
    (docker / "entrypoint.sh").write_text(
        '#!/usr/bin/env bash\npython3 -c \'import json, os, sys; print(json.dumps({"args": sys.argv[1:], '
        '"env": {k: v for k, v in os.environ.items() if k.startswith(("GUARDED", "BENTOML_CONFIG"))}}))\' "$@"\n'
    )
    (docker / "entrypoint.sh").chmod(0o755)
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "BENTO_PATH": str(tmp_path / "bento"), **env},
    )


def test_secret_files_become_variables_and_arguments_pass_through(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("postgresql+psycopg://u:p@db/guarded\n")
    (tmp_path / "token").write_text("t0ken")
    out = run(
        tmp_path,
        {
            "GUARDED_SERVING_STORE_URL_FILE": str(tmp_path / "url"),
            "GUARDED_SERVING_TOKEN_FILE": str(tmp_path / "token"),
            "GUARDED_SERVING_WORKERS": "2",
        },
        "--port",
        "3000",
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["args"] == ["--port", "3000"]
    assert (
        got["env"]["GUARDED_SERVING_STORE_URL"] == "postgresql+psycopg://u:p@db/guarded"
    )  # no newline
    assert got["env"]["GUARDED_SERVING_TOKEN"] == "t0ken"
    assert got["env"]["GUARDED_SERVING_WORKERS"] == "2"
    assert "BENTOML_CONFIG_OPTIONS" not in got["env"]  # no endpoint: no tracing settings


def test_an_unreadable_secret_file_stops_the_container_with_its_name(tmp_path: Path) -> None:
    out = run(tmp_path, {"GUARDED_SERVING_TOKEN_FILE": str(tmp_path / "missing")})
    assert out.returncode == 64
    assert "GUARDED_SERVING_TOKEN_FILE" in out.stderr and "missing" in out.stderr


def test_the_otlp_endpoint_becomes_bentomls_tracing_settings(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        },
    )
    options = json.loads(out.stdout)["env"]["BENTOML_CONFIG_OPTIONS"].split()
    svc = "services.GuardedService.tracing"
    assert options == [
        f"{svc}.exporter_type=otlp",
        f"{svc}.otlp.protocol=http",
        f"{svc}.otlp.endpoint=http://collector:4318/v1/traces",
        f"{svc}.sample_rate=0.25",
    ]
    out = run(tmp_path, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"})
    assert (
        f"{svc}.otlp.endpoint=http://c:4318/custom"
        in json.loads(out.stdout)["env"]["BENTOML_CONFIG_OPTIONS"]
    )
