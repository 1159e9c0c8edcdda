"""The guard core stays pure: no BentoML, HTTP, database or OpenTelemetry SDK imports."""

import subprocess
import sys

CORE = ["profile", "checks", "policy", "scoring", "fallback", "errors", "performance", "replay", "retrain",
        "estimation", "drift.state", "drift.stats", "drift.windows", "feedback", "payload", "openapi"]
FORBIDDEN = ["bentoml", "starlette", "httpx", "sqlalchemy", "psycopg", "opentelemetry.sdk", "prometheus_client"]


def test_core_modules_import_nothing_of_the_adapters() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}: importlib.import_module('guarded_serving.' + m)\n"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
