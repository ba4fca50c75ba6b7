"""The kubernetes backend's objects, checked against the Kubernetes OpenAPI
schemas of two minor releases (kubernetes-validate, strict: unknown fields
are errors), and for what they must and must not hold."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stockade.provisioner.backends.base import WorkspaceSpec
from stockade.provisioner.kubernetes.manifests import (
    ClusterOptions,
    names,
    workspace_objects,
)
from stockade.sdk.starters import render_starter
from tests.provisioner.conftest import SpecFactory, with_compute

# Two minor releases apart by a year: what the objects use must be in both.
VERSIONS = ("1.30.0", "1.35.0")
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
FULL = {
    "backend": "kubernetes",
    "compute": {"image": "registry.internal/ws:1", "cpu": 2, "memory": "4GiB",
                "home_size": "20GiB", "gpus": 1},
    "kubernetes": {
        "node_selector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "spot", "value": "yes", "toleration_seconds": 30,
                         "effect": "NoExecute"}],
        "runtime_class": "gvisor",
        "image_pull_secrets": ["internal-registry"],
        "service_account": "workspace",
        "gpu_resource": "amd.com/gpu",
        "storage_class": "fast",
        "network_policy": True,
        "allow_egress": ["10.20.0.0/16", "10.30.1.5/32:443"],
    },
}  # fmt: skip


def full_spec(make_spec: SpecFactory) -> WorkspaceSpec:
    fields = json.loads(json.dumps(FULL))
    compute = fields.pop("compute")
    spec = with_compute(make_spec(**fields), **compute)
    return dataclasses.replace(spec, agent_token="tok-" + "x" * 40, agent_ca=CA)


def minimal_spec(make_spec: SpecFactory) -> WorkspaceSpec:
    return with_compute(make_spec(backend="kubernetes"), image="ws:1")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_against_the_schemas(make_spec: SpecFactory, version: str) -> None:
    minimal = minimal_spec(make_spec)
    for spec in (minimal, full_spec(make_spec)):
        objects = workspace_objects(spec, ClusterOptions(control_plane_cidrs=("10.0.0.0/24",)))
        kinds = [o["kind"] for o in objects]
        expected = ["Secret", "PersistentVolumeClaim", "Pod"]
        assert kinds == expected + (["NetworkPolicy"] if spec is not minimal else [])
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_what_a_cluster_would(make_spec: SpecFactory) -> None:
    """The check can fail: a wrong type and an unknown field are both caught."""
    pod = workspace_objects(minimal_spec(make_spec),
                            ClusterOptions())[2]  # fmt: skip
    broken: dict[str, Any] = json.loads(json.dumps(pod))
    broken["spec"]["terminationGracePeriodSeconds"] = "soon"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    unknown = json.loads(json.dumps(pod))
    unknown["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[1], strict=True)


def test_the_pod_is_locked_down_and_holds_no_secret(make_spec: SpecFactory) -> None:
    spec = full_spec(make_spec)
    secret, claim, pod, policy = workspace_objects(spec, ClusterOptions())
    assert secret["stringData"] == {"token": spec.agent_token, "ca.pem": CA}
    assert spec.agent_token is not None and spec.agent_token not in json.dumps(pod)
    assert CA not in json.dumps(pod)
    (container,) = pod["spec"]["containers"]
    token_env = next(e for e in container["env"] if e["name"] == "STOCKADE_AGENT_TOKEN")
    assert token_env["valueFrom"]["secretKeyRef"] == {
        "name": names(spec.workspace_id)["secret"],
        "key": "token",
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"] == {
        "requests": {"cpu": "2000m", "memory": str(4 * 1024**3)},
        "limits": {"cpu": "2000m", "memory": str(4 * 1024**3), "amd.com/gpu": "1"},
    }
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["tolerations"][1] == {
        "key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
        "tolerationSeconds": 30,
    }  # fmt: skip
    assert pod["spec"]["imagePullSecrets"] == [{"name": "internal-registry"}]
    assert pod["spec"]["serviceAccountName"] == "workspace"
    assert pod["spec"]["automountServiceAccountToken"] is True
    assert claim["spec"]["resources"]["requests"]["storage"] == str(20 * 1024**3)
    assert claim["spec"]["storageClassName"] == "fast"
    # Every object carries the labels that tie it to the workspace.
    for obj in (secret, claim, pod, policy):
        assert obj["metadata"]["labels"]["stockade.workspace_id"] == spec.workspace_id
        assert obj["metadata"]["labels"]["stockade.deployment"] == spec.deployment_id
    # Nothing in; out only the control plane, DNS and the template's list.
    assert policy["spec"]["ingress"] == []
    blocks = [to.get("ipBlock", {}).get("cidr") for rule in policy["spec"]["egress"]
              for to in rule["to"]]  # fmt: skip
    assert [b for b in blocks if b] == ["10.20.0.0/16", "10.30.1.5/32"]
    assert policy["spec"]["egress"][-1]["ports"] == [{"protocol": "TCP", "port": 443}]


def test_without_a_service_account_no_api_token_is_mounted(make_spec: SpecFactory) -> None:
    pod = workspace_objects(minimal_spec(make_spec),
                            ClusterOptions())[2]  # fmt: skip
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod["spec"]
    assert "resources" not in pod["spec"]["containers"][0]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_starter_template_makes_objects_a_cluster_accepts(
    make_spec: SpecFactory, version: str
) -> None:
    """What `stockade templates init --backend kubernetes` writes, with its
    parameters' defaults, as the backend would send it."""
    fields = yaml.safe_load(render_starter("kubernetes", "k8s-dev"))
    # The spec holds the chosen values; the manifest's definitions are checked
    # when the template is pushed (tests/cli/test_templates_cli.py).
    defaults = {p["name"]: p["default"] for p in fields.pop("parameters")}
    compute = fields.pop("compute")
    spec = with_compute(make_spec(**fields, parameters=defaults), **compute)
    objects = workspace_objects(spec, ClusterOptions())
    assert [o["kind"] for o in objects] == [
        "Secret", "PersistentVolumeClaim", "Pod", "NetworkPolicy"
    ]  # fmt: skip
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    (container,) = objects[2]["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"] == "2000m"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
