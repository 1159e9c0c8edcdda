"""A peer's own virtualenv under ``.bench-venvs/``, made once: the peers pin numpy, pandas and
friends to versions that cannot share this environment."""

from __future__ import annotations

import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_venv(name: str, *installs: Sequence[str]) -> Path:
    """The Python of ``.bench-venvs/NAME``, created on first use with one ``pip install`` per
    argument list of ``installs`` (in order, e.g. a ``--no-deps`` step after the dependencies)."""
    path = ROOT / ".bench-venvs" / name
    py = path / "bin" / "python"
    if not py.exists():
        print(f"creating {path} for {name} (one-off, a few minutes)...", file=sys.stderr)
        venv.create(path, with_pip=True)
        for args in installs:
            subprocess.run([str(py), "-m", "pip", "install", "-q", *args], check=True)
    return py
