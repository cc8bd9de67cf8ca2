"""The deployment artefacts: the Serve config that `serve deploy` takes (checked with Ray Serve's
own schema) and the KubeRay RayService manifest (checked for what KubeRay requires; against the
RayService CRD's openAPIV3Schema too when KUBERAY_CRD names a copy of ray.io_rayservices.yaml)."""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_apps" / "serve_config.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_the_serve_config_is_a_valid_serve_deploy_config():
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    builder = _builder(app.import_path)
    # an application builder: Serve calls it with the `args` mapping on the cluster
    assert callable(builder) and list(inspect.signature(builder).parameters) == ["args"]
    assert set(app.args) <= {"store", "config", "set"} and "://" in app.args["store"]
    assert config.http_options.host == "0.0.0.0"  # reachable from outside the head node


def test_a_serve_config_with_a_bad_import_path_is_refused_by_the_same_schema():
    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    raw["applications"][0]["import_path"] = "serve_apps_imoe_app"
    with pytest.raises(ValueError, match="import path"):
        ServeDeploySchema.model_validate(raw)


def _rayservice() -> dict:
    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    return doc


def test_the_rayservice_manifest_has_what_kuberay_requires():
    doc = _rayservice()
    name = doc["metadata"]["name"]
    # KubeRay's ValidateRayServiceMetadata: a DNS-1035 label of at most 47 characters
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    spec = doc["spec"]

    # serveConfigV2 is a string holding a Serve config: the same application as serve_apps/
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    ours = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert [a.model_dump() for a in serve.applications] == [a.model_dump() for a in ours.applications]

    cluster = spec["rayClusterConfig"]
    version = cluster["rayVersion"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head, "headGroupSpec should have at least one container"
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert g["template"]["spec"]["containers"], f"worker group {g['groupName']} has no container"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    containers = head + [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert all(version in c["image"] for c in containers), "every image runs the Ray of rayVersion"

    def gpus(c: dict) -> int:
        return int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))

    assert not any(gpus(c) for c in head), "the head stays a CPU node"
    gpu_groups = [g for g in groups if any(gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups)  # GPU workers autoscale
    assert cluster["enableInTreeAutoscaling"] is True
    # credentials reach every node from a Secret, never from the manifest
    assert all(any("secretRef" in e for e in c.get("envFrom", [])) for c in containers)
    assert "AWS_SECRET_ACCESS_KEY" not in RAYSERVICE.read_text().split("kubectl apply")[1]


def _strict(schema):
    """Kubernetes rejects unknown fields (kubectl's strict field validation): so does the schema."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()}) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD"), reason="KUBERAY_CRD names no copy of the RayService CRD")
def test_the_rayservice_manifest_validates_against_the_kuberay_crd():
    import jsonschema

    doc = _rayservice()
    crd = yaml.safe_load(Path(os.environ["KUBERAY_CRD"]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == doc["apiVersion"].split("/")[1])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert not jsonschema.Draft7Validator(schema).is_valid(doc)  # the check can fail
