"""The Kubernetes deployment (deploy/kubernetes/base): rendered with
`kubectl kustomize` as a user would, every object validated strictly against
the 1.30 and 1.35 schemas, and checked against the code it deploys (the
settings its environment names, the verbs the kubernetes backend uses, the
labels the workspaces' NetworkPolicy selects the control plane by)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stockade.provisioner.kubernetes.manifests import ClusterOptions
from stockade.server.settings import Settings
from tests.conftest import require

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base"
VERSIONS = ("1.30.0", "1.35.0")


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    require("kubectl", kubectl is not None, "install kubectl (it renders the kustomize base)")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(BASE)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(rendered: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered if doc["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_validates(rendered: list[dict[str, Any]], version: str) -> None:
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(
        ["Namespace", "Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment",
         "Service", "Ingress", "PodDisruptionBudget"]
    )  # fmt: skip
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_deployment_configures_real_settings_from_secrets(
    rendered: list[dict[str, Any]],
) -> None:
    (deployment,) = of_kind(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    fields = set(Settings.model_fields)
    env = {item["name"]: item for item in container["env"]}
    for name in env:
        if name == "POD_IP":  # only for STOCKADE_REPLICA_URL below
            continue
        assert name.startswith("STOCKADE_") and name[9:].lower() in fields, name
    assert list(env).index("POD_IP") < list(env).index("STOCKADE_REPLICA_URL")
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["STOCKADE_REPLICA_URL"]["value"] == "http://$(POD_IP):7080"
    assert deployment["spec"]["replicas"] >= 2
    assert env["STOCKADE_POSTGRES_URL"]["valueFrom"]["secretKeyRef"]["name"] == "stockade-postgres"
    assert env["STOCKADE_AUDIT_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "stockade-audit-key"
    assert env["STOCKADE_PROVISIONER_BACKENDS"]["value"] == "kubernetes"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_grants_what_the_backend_uses_where_workspaces_live(
    rendered: list[dict[str, Any]],
) -> None:
    (role,) = of_kind(rendered, "Role")
    cluster = ClusterOptions()
    assert role["metadata"]["namespace"] == cluster.namespace
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    needed = {"get", "list", "watch", "create", "update", "delete"}
    for key in [("", "pods"), ("", "secrets"), ("", "persistentvolumeclaims"),
                ("networking.k8s.io", "networkpolicies")]:  # fmt: skip
        assert granted[key] == needed, key
    (binding,) = of_kind(rendered, "RoleBinding")
    (subject,) = binding["subjects"]
    (deployment,) = of_kind(rendered, "Deployment")
    assert subject["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert subject["namespace"] == deployment["metadata"]["namespace"]


def test_workspaces_network_policy_selects_these_pods(rendered: list[dict[str, Any]]) -> None:
    """The NetworkPolicy the backend writes lets workspaces reach the control
    plane by namespace and labels: they must be the deployment's."""
    cluster = ClusterOptions()
    (deployment,) = of_kind(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["metadata"]["namespace"] == cluster.control_plane_namespace
    assert cluster.control_plane_labels.items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0]["containerPort"] == cluster.control_plane_port
