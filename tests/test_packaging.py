"""The bento: bentofile.yaml matches the package, `bentoml build` works, and the built bento serves
from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from guarded_serving.bento import (
    BUNDLE_DIR,
    BuildOptions,
    bentofile,
    build_bento,
    bundled_config,
    stage_context,
)
from guarded_serving.config import load_config
from guarded_serving.errors import ConfigError

from . import _data
from .iris_model import make_iris_project
from .iris_model import rows as iris_rows
from .server import ROOT, Server


def test_bentofile_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    # bentoml itself comes with the bento's own runtime
    assert sorted(bento["python"]["packages"]) == sorted(d for d in deps if not d.startswith("bentoml"))


MODEL_STORE_SCRIPT = """
import shutil, sys
import bentoml
with bentoml.models.create("diamonds-gbr", labels={"from": "test"}) as m:
    shutil.copy(sys.argv[1], m.path)
print(m.tag)
"""

LOAD_SCRIPT = """
import sys
from guarded_serving.config import load_config
from guarded_serving.guard import GuardedModel
gm = GuardedModel.from_config(load_config(sys.argv[1]))
print(gm.primary.name, gm.primary.version)
"""


@pytest.mark.e2e
def test_a_model_from_the_bentoml_model_store_is_served_and_packed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDED_SERVING_")}
    env.update(BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="true")

    def run(*args: str, cwd: Path = tmp_path) -> str:
        out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    tag = run("-c", MODEL_STORE_SCRIPT, str(_data.EXAMPLE / "primary.onnx")).strip().splitlines()[-1]
    project = tmp_path / "project"
    project.mkdir()
    for name in ("fallback.onnx", "profile.json"):
        shutil.copy(_data.EXAMPLE / name, project / name)
    cfg = yaml.safe_load((_data.EXAMPLE / "serving.yaml").read_text())
    cfg["primary"] = {"bentoml_tag": "diamonds-gbr:latest"}
    (project / "serving.yaml").write_text(yaml.safe_dump(cfg))
    name, version = run("-c", LOAD_SCRIPT, str(project / "serving.yaml")).split()
    assert f"{name}:{version}" == tag  # loaded from the store, named by its tag
    (project / "bentofile.yaml").write_text(yaml.safe_dump({
        "service": "guarded_serving.service:GuardedService",
        "name": "store-guarded",
        "include": ["serving.yaml", "profile.json", "fallback.onnx"],
        "envs": [{"name": "GUARDED_SERVING_CONFIG", "value": "serving.yaml"}],
        "python": {"packages": ["onnxruntime"], "lock_packages": False},
    }))
    env["GUARDED_SERVING_CONFIG"] = str(project / "serving.yaml")
    bento_tag = run("-m", "bentoml", "build", "-o", "tag", cwd=project).strip().splitlines()[-1].removeprefix("__tag__:")
    bento = tmp_path / "home" / "bentos" / "store-guarded" / bento_tag.split(":")[1]
    services = yaml.safe_load((bento / "bento.yaml").read_text())["services"]
    listed = [m["tag"] for svc in services for m in svc["models"]]
    assert tag in listed, listed
    # BentoML copies store models into the artifact at export (and containerize) time.
    archive = tmp_path / "store-guarded.bento"
    run("-m", "bentoml", "export", bento_tag, str(archive))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any("diamonds-gbr" in n and n.endswith(".onnx") for n in names), names[:20]


@pytest.mark.e2e
def test_bentoml_build_then_serve_the_bento_elsewhere(tmp_path: Path) -> None:
    home = {"BENTOML_HOME": str(tmp_path / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "true"}
    build_env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDED_SERVING_")} | home
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=ROOT, env=build_env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("diamonds-guarded:")
    bento_dir = Path(tmp_path / "bentoml-home" / "bentos" / "diamonds-guarded" / tag.split(":")[1])
    src = bento_dir / "src"
    for needed in ("models/diamonds/primary.onnx", "models/diamonds/fallback.onnx",
                   "models/diamonds/profile.json", "models/diamonds/serving.yaml", "guarded_serving/service.py",
                   "models/diamonds/profile.estimation/estimation.json"):
        assert (src / needed).exists(), needed
    assert not (src / "models/diamonds/data").exists(), "training data does not belong in the bento"
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile or "pip install" in dockerfile or "uv pip" in dockerfile
    reqs = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in reqs and "opentelemetry-sdk" in reqs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env: dict[str, str | None] = {
        **home,
        "GUARDED_SERVING_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": "",  # import from the bento, not from this checkout
        "GUARDED_SERVING_CONFIG": None,  # the bento finds its own config
        "GUARDED_SERVING_STORE_URL": None,
        "GUARDED_SERVING_WORKERS": None,
    }
    # The config path only names where the server log goes; the bento brings its own config.
    with Server(elsewhere / "unused.yaml", target=tag, cwd=elsewhere, env=env) as srv:
        big = _data.features(_data.serve()).query("carat > 2.0").head(1)
        rows = _data.json_rows(pd.concat([_data.features(_data.holdout()).head(1), big]))
        r = httpx.post(srv.url + "/predict", json={"rows": rows}, timeout=30.0)
    assert r.status_code == 200, r.text
    assert r.json()["routes"] == ["primary", "fallback"]
    assert (tmp_path / "data" / "diamonds-price.sqlite3").exists()  # the store, outside the bento
    assert not list(bento_dir.rglob("*.sqlite3"))


# -- guarded-serving build: a bento for any serving config ------------------------------------


def test_the_staged_context_bakes_in_the_config_its_profile_and_models(tmp_path: Path) -> None:
    config = make_iris_project(tmp_path / "project", store={"table_prefix": "iris_"})
    ctx = tmp_path / "ctx"
    raw = stage_context(config, ctx)
    bundle = ctx / BUNDLE_DIR
    assert raw["primary"] == {"path": "primary.onnx"} and raw["fallback"] == {"path": "fallback.onnx"}
    assert raw["profile"] == "profile.json" and raw["store"] == {"table_prefix": "iris_"}
    assert {p.name for p in bundle.iterdir()} == {"serving.yaml", "primary.onnx", "fallback.onnx", "profile.json"}
    assert (bundle / "primary.onnx").read_bytes() == (config.parent / "forest.onnx").read_bytes()
    assert bundled_config(ctx / "guarded_serving") == bundle / "serving.yaml"
    assert load_config(bundle / "serving.yaml").name == "iris-species"
    # The estimator's artefacts travel with the profile they were fitted for.
    (config.parent / "iris-profile.estimation").mkdir()
    (config.parent / "iris-profile.estimation" / "estimation.json").write_text("{}")
    stage_context(config, tmp_path / "ctx2")
    assert (tmp_path / "ctx2" / BUNDLE_DIR / "profile.estimation" / "estimation.json").read_text() == "{}"
    assert (ctx / "guarded_serving" / "container" / "entrypoint.sh").exists()
    spec = bentofile(raw, BuildOptions(base_image="localhost/base:1"))
    assert spec["name"] == "iris-species" and spec["service"] == "guarded_serving.service:GuardedService"
    assert spec["docker"]["base_image"] == "localhost/base:1"
    assert not any(p.startswith("bentoml") for p in spec["python"]["packages"])
    assert any(p.startswith("onnxruntime") for p in spec["python"]["packages"])


def test_a_bad_bento_name_or_config_fails_before_building(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bento name"):
        BuildOptions(name="Not A Name").bento_name("x")
    assert BuildOptions().bento_name("Diamonds Price v2") == "diamonds-price-v2"
    bad = tmp_path / "serving.yaml"
    bad.write_text("name: x\ntask: regression\n")
    with pytest.raises(ConfigError, match="required key missing"):
        build_bento(bad)


def test_the_default_store_is_in_the_data_dir_not_beside_the_config(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_iris_project(tmp_path / "project")
    monkeypatch.delenv("GUARDED_SERVING_STORE_URL", raising=False)
    monkeypatch.setenv("GUARDED_SERVING_DATA_DIR", str(tmp_path / "data"))
    assert load_config(config).store.url == f"sqlite:///{tmp_path / 'data' / 'iris-species.sqlite3'}"
    monkeypatch.delenv("GUARDED_SERVING_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load_config(config).store.url == f"sqlite:///{tmp_path / 'xdg' / 'guarded-serving' / 'iris-species.sqlite3'}"
    assert (tmp_path / "xdg" / "guarded-serving").is_dir()
    monkeypatch.setenv("GUARDED_SERVING_STORE_URL", "sqlite:////elsewhere.sqlite3")
    assert load_config(config).store.url == "sqlite:////elsewhere.sqlite3"


@pytest.mark.e2e
def test_guarded_serving_build_serves_its_own_config_without_env_vars(tmp_path: Path) -> None:
    config = make_iris_project(tmp_path / "project")
    home = {"BENTOML_HOME": str(tmp_path / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "true"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDED_SERVING_")} | home
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "guarded_serving.cli", "build", str(config), "--version", "t1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1]
    assert tag == "iris-species:t1"
    bento_dir = tmp_path / "bentoml-home" / "bentos" / "iris-species" / "t1"
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["labels"]["model"] == "iris-species" and not info.get("envs")
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()  # for `bentoml containerize`
    assert "USER bentoml" in dockerfile and "EXPOSE 3000" in dockerfile
    assert 'ENTRYPOINT [ "/home/bentoml/bento/src/guarded_serving/container/entrypoint.sh" ]' in dockerfile
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    served_env: dict[str, str | None] = {
        **home, "PYTHONPATH": "", "GUARDED_SERVING_DATA_DIR": str(tmp_path / "data"),
        "GUARDED_SERVING_CONFIG": None, "GUARDED_SERVING_STORE_URL": None, "GUARDED_SERVING_WORKERS": None,
    }
    shutil.rmtree(tmp_path / "project")  # the bento carries everything it serves
    with Server(elsewhere / "unused.yaml", target=tag, cwd=elsewhere, env=served_env) as srv:
        r = httpx.post(srv.url + "/predict", json={"rows": iris_rows(2, 1)}, timeout=30.0)
        assert r.status_code == 200, r.text
        assert r.json()["routes"] == ["primary", "primary", "fallback"]
        assert r.json()["predictions"][:2] == ["setosa", "setosa"]
        assert httpx.get(srv.url + "/profile", timeout=10.0).json()["target"] == "species"
    assert (tmp_path / "data" / "iris-species.sqlite3").exists()
    assert not list(bento_dir.rglob("*.sqlite3"))


@pytest.mark.e2e
def test_guarded_serving_build_pins_and_packs_a_model_store_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDED_SERVING_")}
    env.update(BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(ROOT))

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    model_tag = run("-c", MODEL_STORE_SCRIPT, str(_data.EXAMPLE / "primary.onnx"))
    cfg = yaml.safe_load((_data.EXAMPLE / "serving.yaml").read_text())
    cfg.update(primary={"bentoml_tag": "diamonds-gbr:latest"}, fallback={"path": str(_data.EXAMPLE / "fallback.onnx")},
               profile=str(_data.EXAMPLE / "profile.json"))
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(cfg))
    tag = run("-m", "guarded_serving.cli", "build", str(tmp_path / "serving.yaml"), "--version", "p1")
    bento = tmp_path / "home" / "bentos" / tag.split(":")[0] / "p1"
    bundled = yaml.safe_load((bento / "src" / BUNDLE_DIR / "serving.yaml").read_text())
    assert bundled["primary"] == {"bentoml_tag": model_tag}  # the version packed, not "latest"
    services = yaml.safe_load((bento / "bento.yaml").read_text())["services"]
    assert model_tag in [m["tag"] for svc in services for m in svc["models"]]
