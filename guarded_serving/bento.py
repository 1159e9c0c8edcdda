"""Build a bento for any serving config: the package, the config, its profile and its models.

``guarded-serving build CONFIG`` stages a build context with this package and a ``guarded_model/``
folder (the serving config, rewritten to point at copies of its profile and model files beside
it), writes a bentofile for it and runs ``bentoml build``. The served config is then found without
any environment variable: :func:`bundled_config` looks for ``guarded_model/serving.yaml`` next to
the package, which is where it sits in the bento's ``src/``.

>>> bundled_config() is None  # in a checkout, no bundled config: the example (or $GUARDED_SERVING_CONFIG) is served
True
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import load_config
from .errors import ConfigError, GuardedServingError
from .estimation import estimation_dir

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
#: In a bento's src/ (and in a build context), the folder holding the served config and its files.
BUNDLE_DIR = "guarded_model"
BUNDLED_CONFIG = "serving.yaml"
#: The container entrypoint and the Dockerfile template that uses it, shipped in the package.
CONTAINER_DIR = PACKAGE_DIR / "container"
SERVICE = "guarded_serving.service:GuardedService"
#: The image's Python: Debian bookworm's, so that the local base image (deploy/container) fits.
PYTHON_VERSION = "3.11"
_BENTO_NAME_OK = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def bundled_config(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The serving config baked into the bento this package runs from, or None outside a bento."""
    path = package_dir.parent / BUNDLE_DIR / BUNDLED_CONFIG
    return path if path.is_file() else None


@dataclass(frozen=True)
class BuildOptions:
    """What ``guarded-serving build`` was asked for.

    >>> BuildOptions(name="iris").bento_name("iris-classifier")
    'iris'
    """

    name: str | None = None
    version: str | None = None
    base_image: str | None = None

    def bento_name(self, config_name: str) -> str:
        name = self.name or re.sub(r"[^a-z0-9._-]+", "-", config_name.lower()).strip("-._")
        if not _BENTO_NAME_OK.match(name):
            raise ConfigError(
                f"bento name {name!r}: must be lowercase letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit, at most 63 characters"
            )
        return name


def python_requirements() -> list[str]:
    """This package's runtime requirements, less BentoML (the bento brings its own)."""
    try:
        reqs = importlib.metadata.requires("guarded-serving") or []
    except importlib.metadata.PackageNotFoundError:
        raise GuardedServingError(
            "guarded-serving is not installed in this Python, so its requirements "
            "are unknown: pip install guarded-serving (or pip install -e .)"
        ) from None
    return [r for r in reqs if ";" not in r and not r.startswith("bentoml")]


def stage_context(config_path: str | Path, ctx: Path) -> dict[str, Any]:
    """Copy the package and the config's files into ``ctx``; return the bundled config as written.

    Model files and the profile are copied beside the rewritten config and named by their role
    (``primary.onnx``, ``profile.json``); models named by ``bentoml_tag`` stay tags, pinned to the
    version ``bentoml build`` packs from the model store, and ``callable`` models stay import paths (their
    module must be installed in the bento's Python)."""
    config_path = Path(config_path)
    cfg = load_config(config_path)  # fails here, with the key named, rather than in the image
    raw = yaml.safe_load(config_path.read_text())
    shutil.copytree(
        PACKAGE_DIR, ctx / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    bundle = ctx / BUNDLE_DIR
    bundle.mkdir(parents=True)
    for role in ("primary", "fallback"):
        spec = getattr(cfg, role)
        if spec.bentoml_tag:
            # Pinned: the bento packs this version, and a local `bentoml serve` must not pick a
            # newer "latest" from the model store.
            import bentoml

            raw[role] = {**raw[role], "bentoml_tag": str(bentoml.models.get(spec.bentoml_tag).tag)}
        if spec.path is None:
            continue
        target = f"{role}{''.join(spec.path.suffixes)}"
        shutil.copy2(spec.path, bundle / target)
        entry = raw[role] if isinstance(raw[role], dict) else {}
        raw[role] = {**entry, "path": target}
    shutil.copy2(cfg.profile, bundle / "profile.json")
    raw["profile"] = "profile.json"
    estimation = estimation_dir(cfg.profile)
    if estimation.is_dir():  # the performance estimator's artefacts travel with their profile
        shutil.copytree(estimation, estimation_dir(bundle / "profile.json"))
    (bundle / BUNDLED_CONFIG).write_text(yaml.safe_dump(raw, sort_keys=False))
    return dict(raw)


def bentofile(raw_config: dict[str, Any], options: BuildOptions) -> dict[str, Any]:
    """The bentofile for a staged context (see :func:`stage_context`)."""
    name = options.bento_name(str(raw_config["name"]))
    docker: dict[str, Any] = {
        "python_version": PYTHON_VERSION,
        "dockerfile_template": f"{PACKAGE_DIR.name}/container/Dockerfile.j2",
    }
    if options.base_image:
        docker["base_image"] = options.base_image
    return {
        "service": SERVICE,
        "name": name,
        "labels": {
            "project": "guarded-serving",
            "model": str(raw_config["name"]),
            "task": str(raw_config["task"]),
        },
        "description": f"{raw_config['name']} behind guarded-serving: each row is checked against "
        "the training profile and routed to the fallback when it is out of range.",
        "include": [f"{PACKAGE_DIR.name}/**", f"{BUNDLE_DIR}/**"],
        "exclude": ["**/__pycache__", "**/*.pyc"],
        "python": {"packages": python_requirements(), "lock_packages": False},
        "docker": docker,
    }


def build_bento(config_path: str | Path, options: BuildOptions = BuildOptions()) -> str:
    """Build a bento for ``config_path`` into the BentoML store ($BENTOML_HOME); return its tag."""
    with tempfile.TemporaryDirectory(prefix="guarded-serving-build-") as tmp:
        ctx = Path(tmp)
        raw = stage_context(config_path, ctx)
        (ctx / "bentofile.yaml").write_text(
            yaml.safe_dump(bentofile(raw, options), sort_keys=False)
        )
        cmd = [sys.executable, "-m", "bentoml", "build", str(ctx), "-o", "tag"]
        if options.version:
            cmd += ["--version", options.version]
        run_env = dict(os.environ)
        # The build imports the service to find the models it packs: the staged package, serving
        # the staged config.
        run_env["GUARDED_SERVING_CONFIG"] = str(ctx / BUNDLE_DIR / BUNDLED_CONFIG)
        run_env["PYTHONPATH"] = os.pathsep.join([str(ctx), run_env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        run_env.setdefault("BENTOML_DO_NOT_TRACK", "true")
        log.info("bentoml build %s", ctx)
        out = subprocess.run(cmd, cwd=ctx, env=run_env, capture_output=True, text=True)
    tags = [
        line.removeprefix("__tag__:")
        for line in out.stdout.splitlines()
        if line.startswith("__tag__:")
    ]
    if out.returncode != 0 or not tags:
        raise GuardedServingError(
            f"bentoml build failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}"
        )
    return tags[-1]
