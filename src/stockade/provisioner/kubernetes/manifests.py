"""The Kubernetes objects of one workspace, as plain JSON-ready dicts.

Per workspace, all in the workspaces' namespace, named after the workspace id
and labelled with the deployment, the workspace and its owner:

* ``Secret`` ``stockade-agent-<id>``: the agent token (and the control
  plane's CA, when it has a private one), so that neither is in the Pod's
  spec, which anyone who may list Pods can read;
* ``PersistentVolumeClaim`` ``stockade-home-<id>``: the home directory,
  ``compute.home_size`` (10 GiB when unset), kept across stop and start;
* ``Pod`` ``stockade-ws-<id>``: the template's image, its main process the
  agent bootstrap every backend runs, CPU, memory and GPU (the template's
  extended resource, ``nvidia.com/gpu`` by default) requests and limits,
  node selector, tolerations, runtime class, image pull secrets and service
  account from the template's ``kubernetes:`` settings, and a restrictive
  security context: never root, no privilege escalation, every capability
  dropped, the runtime's seccomp profile, a read-only root filesystem (``/tmp``
  and the home writable) unless the template turns it off, no API token
  mounted unless the template names a service account;
* optionally a ``NetworkPolicy`` ``stockade-ws-<id>``: nothing comes in, and
  out only the control plane, the cluster's DNS and what the template allows.

Nothing here talks to a cluster: the objects are checked against the
Kubernetes OpenAPI schemas in the tests (kubernetes-validate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from stockade.agent.bundle import BOOTSTRAP_SCRIPT
from stockade.provisioner.backends.base import (
    AGENT_STOP_SECONDS,
    AGENT_TOKEN_ENV,
    WorkspaceSpec,
    agent_environment,
    token_fingerprint,
)
from stockade.sdk.templates import KubernetesSettings, egress_rule

HOME = "/home/workspace"
CA_DIR = "/etc/stockade"
CA_PATH = f"{CA_DIR}/ca.pem"
DEFAULT_HOME_BYTES = 10 * 1024**3
MANAGED_BY = "stockade"
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ClusterOptions:
    """How the cluster is set up for Stockade (server or provisionerd settings)."""

    namespace: str = "stockade-workspaces"
    # Where the control plane runs, for the NetworkPolicy: its Pods' labels
    # in its namespace (Stockade on the same cluster) and/or address blocks
    # (outside it), and the port agents connect to.
    control_plane_namespace: str = "stockade"
    control_plane_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "stockade"}
    )
    control_plane_cidrs: tuple[str, ...] = ()
    control_plane_port: int = 7080


def label_value(text: str) -> str:
    """``text`` as a valid label value (63 characters of [A-Za-z0-9._-],
    alphanumeric at both ends)."""
    cleaned = _LABEL_VALUE.sub("-", text)[:63].strip("-._")
    return cleaned or "none"


def names(workspace_id: str) -> dict[str, str]:
    return {
        "pod": f"stockade-ws-{workspace_id}",
        "secret": f"stockade-agent-{workspace_id}",
        "home": f"stockade-home-{workspace_id}",
        "policy": f"stockade-ws-{workspace_id}",
    }


def labels(spec: WorkspaceSpec) -> dict[str, str]:
    """What ties an object to its deployment and workspace (and selects it)."""
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "stockade.deployment": label_value(spec.deployment_id),
        "stockade.workspace_id": label_value(spec.workspace_id),
        "stockade.workspace_name": label_value(spec.workspace_name),
        "stockade.owner": label_value(spec.owner_username),
    }


def _metadata(spec: WorkspaceSpec, name: str, namespace: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(spec),
        "annotations": {
            "stockade.io/workspace": f"{spec.owner_username}/{spec.workspace_name}",
            "stockade.io/template": f"{spec.template_name}@{spec.template_version}",
        },
    }


def settings_of(spec: WorkspaceSpec) -> KubernetesSettings:
    return spec.manifest.kubernetes or KubernetesSettings()


def agent_secret(spec: WorkspaceSpec, namespace: str) -> dict[str, Any]:
    data = {"token": spec.agent_token or ""}
    if spec.agent_ca:
        data["ca.pem"] = spec.agent_ca
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(spec, names(spec.workspace_id)["secret"], namespace),
        "type": "Opaque",
        "stringData": data,
    }


def home_claim(spec: WorkspaceSpec, namespace: str) -> dict[str, Any]:
    size = spec.compute.home_bytes or DEFAULT_HOME_BYTES
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(spec, names(spec.workspace_id)["home"], namespace),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": str(size)}},
        },
    }
    storage_class = settings_of(spec).storage_class
    if storage_class:
        claim["spec"]["storageClassName"] = storage_class
    return claim


def _resources(spec: WorkspaceSpec, settings: KubernetesSettings) -> dict[str, Any]:
    compute = spec.compute
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if compute.cpu is not None:
        cores = f"{round(compute.cpu * 1000)}m"
        requests["cpu"] = limits["cpu"] = cores
    if compute.memory_bytes is not None:
        requests["memory"] = limits["memory"] = str(compute.memory_bytes)
    if compute.gpus:
        # Extended resources are asked as limits (requests default to them).
        limits[settings.gpu_resource] = str(compute.gpus)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def workspace_pod(spec: WorkspaceSpec, namespace: str) -> dict[str, Any]:
    """The Pod whose main process is the agent (see the module docstring)."""
    settings = settings_of(spec)
    workspace_names = names(spec.workspace_id)
    env: list[dict[str, Any]] = [
        {"name": name, "value": value}
        for name, value in sorted(
            agent_environment(spec, ca_path=CA_PATH if spec.agent_ca else None).items()
        )
        if name != AGENT_TOKEN_ENV
    ]
    env.append(
        {
            "name": AGENT_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": workspace_names["secret"], "key": "token"}},
        }
    )
    env += [{"name": "HOME", "value": HOME}, {"name": "USER", "value": "workspace"}]
    env += [{"name": name, "value": value} for name, value in sorted(spec.env.items())]
    mounts: list[dict[str, Any]] = [
        {"name": "home", "mountPath": HOME},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the Pod's own
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "home", "persistentVolumeClaim": {"claimName": workspace_names["home"]}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.agent_ca:
        mounts.append({"name": "ca", "mountPath": CA_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "ca",
                "secret": {
                    "secretName": workspace_names["secret"],
                    "items": [{"key": "ca.pem", "path": "ca.pem"}],
                },
            }
        )
    container: dict[str, Any] = {
        "name": "workspace",
        "image": spec.compute.image,
        # Offline clusters pull from their own registry, or have it loaded.
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", BOOTSTRAP_SCRIPT],
        "workingDir": HOME,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": settings.read_only_root,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = _resources(spec, settings)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "Always",
        # The agent reports shutting_down and off before it is killed.
        "terminationGracePeriodSeconds": int(AGENT_STOP_SECONDS * 2),
        "automountServiceAccountToken": settings.service_account is not None,
        "enableServiceLinks": False,
        "hostname": label_value(spec.workspace_name)[:63].lower().strip("-.") or "workspace",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [
            {
                camel: value
                for camel, value in (
                    ("key", t.key),
                    ("operator", t.operator),
                    ("value", t.value),
                    ("effect", t.effect),
                    ("tolerationSeconds", t.toleration_seconds),
                )
                if value is not None
            }
            for t in settings.tolerations
        ]
    if settings.runtime_class:
        pod_spec["runtimeClassName"] = settings.runtime_class
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    metadata = _metadata(spec, workspace_names["pod"], namespace)
    metadata["annotations"]["stockade.io/config-hash"] = spec.config_hash
    metadata["annotations"]["stockade.io/agent"] = token_fingerprint(spec.agent_token)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def network_policy(spec: WorkspaceSpec, cluster: ClusterOptions) -> dict[str, Any]:
    """Nothing in; out only to the control plane, DNS and ``allow_egress``."""
    control_port = [{"protocol": "TCP", "port": cluster.control_plane_port}]
    egress: list[dict[str, Any]] = [
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {
                            "kubernetes.io/metadata.name": cluster.control_plane_namespace
                        }
                    },
                    "podSelector": {"matchLabels": dict(cluster.control_plane_labels)},
                }
            ],
            "ports": control_port,
        },
        {
            "to": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    },
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
    ]
    if cluster.control_plane_cidrs:
        egress.append(
            {
                "to": [{"ipBlock": {"cidr": cidr}} for cidr in cluster.control_plane_cidrs],
                "ports": control_port,
            }
        )
    for rule in settings_of(spec).allow_egress:
        cidr, port = egress_rule(rule)
        allowed: dict[str, Any] = {"to": [{"ipBlock": {"cidr": cidr}}]}
        if port is not None:
            allowed["ports"] = [{"protocol": "TCP", "port": port}]
        egress.append(allowed)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, names(spec.workspace_id)["policy"], cluster.namespace),
        "spec": {
            "podSelector": {
                "matchLabels": {"stockade.workspace_id": label_value(spec.workspace_id)}
            },
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def workspace_objects(spec: WorkspaceSpec, cluster: ClusterOptions) -> list[dict[str, Any]]:
    """Everything a started workspace is made of, in the order to apply it."""
    objects = [
        agent_secret(spec, cluster.namespace),
        home_claim(spec, cluster.namespace),
        workspace_pod(spec, cluster.namespace),
    ]
    if settings_of(spec).network_policy:
        objects.append(network_policy(spec, cluster))
    return objects
