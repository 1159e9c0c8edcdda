"""The Kubernetes manifests (deploy/k8s): valid against the newest Kubernetes schemas that
kubernetes-validate ships, and consistent with the image and the service they deploy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from guarded_serving.bento import BUNDLE_DIR, stage_context
from guarded_serving.config import AuthConfig, load_config
from guarded_serving.service import CONFIG_ENV, WORKERS_ENV

from . import _data
from .server import ROOT

K8S = ROOT / "deploy" / "k8s"
#: Where `guarded-serving build` puts the bundled config and its files in the image.
IMAGE_BUNDLE = f"/home/bentoml/bento/src/{BUNDLE_DIR}"
kubernetes_validate = pytest.importorskip("kubernetes_validate")


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            doc = yaml.safe_load(path.read_text())
            docs[doc["kind"]] = doc
    return docs


def test_every_manifest_is_valid_for_the_current_kubernetes() -> None:
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 33)
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert set(manifests()) == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_an_invalid_manifest_is_caught() -> None:
    from kubernetes_validate.utils import latest_version

    bad = manifests()["Deployment"]
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, latest_version(), strict=True)


def test_the_deployment_probes_drains_and_is_scraped() -> None:
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 3000}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    drain = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    # preStop, then up to 30 s for in-flight requests and the flush, before SIGKILL.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= drain + 30
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "3000"
    assert ann["prometheus.io/path"] == "/metrics"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    assert int(env[WORKERS_ENV]) >= 1
    # Secrets arrive as files named by GUARDED_SERVING_<X>_FILE, which the entrypoint reads.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    secret = docs["Secret"]
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    files = {f"{mounts['secrets']}/{k}" for k in secret["stringData"]}
    assert {env["GUARDED_SERVING_STORE_URL_FILE"], env[f"{AuthConfig().token_env}_FILE"]} == files
    config_map = docs["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert env[CONFIG_ENV] == f"{mounts['config']}/{next(iter(config_map['data']))}"


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    docs = manifests()
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_configmap_config_loads_against_the_bundled_files(tmp_path: Path) -> None:
    stage_context(_data.CONFIG, tmp_path)  # the image's guarded_model/ for the example
    text = manifests()["ConfigMap"]["data"]["serving.yaml"].replace(
        IMAGE_BUNDLE, str(tmp_path / BUNDLE_DIR)
    )
    (tmp_path / "serving.yaml").write_text(text)
    config = load_config(tmp_path / "serving.yaml")
    assert config.name == load_config(_data.CONFIG).name
    assert config.primary.path == tmp_path / BUNDLE_DIR / "primary.onnx"
