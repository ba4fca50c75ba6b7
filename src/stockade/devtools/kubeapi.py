"""A fake Kubernetes API server for tests and benchmarks: enough of the real
API's HTTP and JSON behaviour that the real ``kubernetes_asyncio`` client
works against it unchanged. No API server can run on these machines; this is
the edge of our boundary, so it answers the way a real cluster answers (the
same paths, status codes, ``Status`` bodies, watch events and resourceVersion
rules), and simulates the controllers a workspace backend waits for.

Use it in a ``with`` block (it serves from a thread with its own event loop)::

    with FakeKubeAPI(namespaces=["default", "ws"]) as kube:
        path = kube.kubeconfig(tmp_path / "kubeconfig")   # http, bearer token
        ...  # drive it with kubernetes_asyncio
        kube.objects("Pod", "ws"); kube.set_pod_phase("ws", "p", "Failed", "Evicted")
        kube.expire_watches()       # the next resume gets 410 Expired
        kube.requests()             # "GET /api/v1/...?watch=True", .status, .body

or standalone: ``python -m stockade.devtools.kubeapi --port 0 --kubeconfig PATH``.

What is modelled
----------------
- Resources, all namespaced: core v1 ``pods``, ``secrets``,
  ``persistentvolumeclaims``; ``networking.k8s.io/v1`` ``networkpolicies``;
  ``namespaces`` read-only (a fixed set given at start, or, by default,
  every namespace exists and appears once used). Paths
  ``/api/v1/namespaces/{ns}/{resource}[/{name}]``, the all-namespaces
  collections (``/api/v1/pods``), the old ``/api/v1/watch/...`` prefix, the
  ``status`` subresource of pods and claims, and discovery (``/api``,
  ``/api/v1``, ``/apis``, ``/apis/networking.k8s.io[/v1]``, ``/version``);
  the typed ``kubernetes_asyncio`` APIs never call discovery, only its
  DynamicClient does.
- A bearer token on every request; otherwise 401 with an ``Unauthorized``
  Status.
- list (``labelSelector`` with ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``,
  ``k in (a,b)``, ``k notin (a,b)``, comma for AND; ``fieldSelector`` on
  ``metadata.name``, ``metadata.namespace`` and, for pods, ``status.phase``
  and ``spec.nodeName``), get, create (POST, 201; ``generateName``), replace
  (PUT), patch (JSON merge patch; a strategic merge patch, which is what
  ``kubernetes_asyncio`` sends for a dict body, is applied as a JSON merge
  patch, so lists are replaced whole rather than merged by key), delete.
- Errors as the real API's ``Status`` JSON: 404 ``NotFound`` (also for a
  namespace that does not exist), 409 ``AlreadyExists``, 409 ``Conflict``
  (stale ``metadata.resourceVersion`` on PUT/PATCH, failed delete
  preconditions), 422 ``Invalid`` with ``details.causes`` (missing name,
  names and label keys/values that are not valid, pods without containers or
  images, duplicate container names, claims without access modes or a
  storage request, secret keys, the 1 MiB secret limit, dockerconfigjson
  secrets without their key, changes to an immutable secret, pod spec changes
  other than images/activeDeadlineSeconds/tolerations, claim spec changes
  other than the storage request), 400 ``BadRequest`` (bad JSON, kind or
  namespace or name not matching the URL, bad selectors, bad base64 in a
  secret), 405, 415.
- One global resourceVersion counter, bumped by every write, as etcd does;
  a replace or patch that changes nothing writes nothing (same
  resourceVersion, no event), as the real API does. Server-set fields are
  kept on PUT (uid, creationTimestamp, deletion fields; the status of pods
  and claims, which only the status subresource changes).
- Defaults the real API fills in and clients read back: pod
  restartPolicy/dnsPolicy/schedulerName/terminationGracePeriodSeconds,
  container terminationMessagePath/Policy and imagePullPolicy, qosClass;
  secret ``type: Opaque`` and ``stringData`` folded into ``data``; claim
  ``volumeMode`` and the ``kubernetes.io/pvc-protection`` finalizer;
  network policy ``podSelector: {}`` and ``policyTypes``.
- Deletion: pods are deleted gracefully (``gracePeriodSeconds`` from the
  query or the DeleteOptions body, else the pod's
  terminationGracePeriodSeconds): they get ``metadata.deletionTimestamp``
  (a MODIFIED event) and go after min(grace, ``grace_cap`` = 0.5 s); grace 0
  or an unscheduled pod goes at once. Finalizers hold any object until they
  are removed; a claim is held by its pvc-protection finalizer while a pod
  that is not finished mounts it. DELETE answers with the object for pods
  and claims and with a ``Success`` Status for the others, as the real API
  does. DeleteOptions ``preconditions`` (uid, resourceVersion) are checked.
- Watch (``watch=1``/``true`` on a collection) with ``resourceVersion``,
  ``labelSelector``, ``fieldSelector``, ``timeoutSeconds`` (default 1800 s)
  and ``allowWatchBookmarks``: newline-delimited JSON events ``{"type":
  "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}``. Without
  a resourceVersion (or with "0") it first sends an ADDED for every matching
  object; with one, it replays the changes after it from a bounded history
  (``history`` events), then streams live ones. An object that starts or
  stops matching the selector arrives as ADDED or DELETED, as from the real
  watch cache. A resourceVersion older than the history (or any
  resourceVersion handed out before ``expire_watches()``) gets HTTP 200 and
  one ``{"type": "ERROR", "object": <Status 410, reason "Expired", message
  "too old resource version: X (Y)">}`` line, then the stream ends, as the
  real API does.
- A simulated scheduler, kubelet and volume binder. A new pod is Pending;
  after ``kubelet_delay`` (0.1 s) it is bound to node ``fake-node`` and
  Running: every container ``running`` and ready, conditions
  PodReadyToStartContainers/Initialized/Ready/ContainersReady/PodScheduled
  True, podIP/hostIP ``pod_ip``. An image starting with ``missing/`` keeps
  the pod Pending with that container ``waiting`` on ``ErrImagePull``, then
  ``ImagePullBackOff`` (where it stays; the real kubelet keeps alternating
  the two), each with a message like the kubelet's. A pod whose
  volume names a claim that does not exist or is not Bound stays Pending
  with PodScheduled False (``Unschedulable``); one that needs a secret that
  does not exist waits (``CreateContainerConfigError`` for env,
  ``ContainerCreating`` for a volume); both are retried until they can run.
  A claim becomes ``Bound`` (spec.volumeName, status capacity and access
  modes) after ``kubelet_delay``. Each change is a MODIFIED event.

What is not modelled
--------------------
Other resources and subresources (logs, exec, eviction, binding), other
API groups, deletecollection, server-side apply and JSON patch (415),
``dryRun`` (400, so nothing is written by mistake), pagination (``limit``
and ``continue`` are ignored: a list returns everything), list at an old
``resourceVersion`` (lists are always current), the "too large resource
version" error (a watch from the future just waits), ``sendInitialEvents``
(streaming lists), admission beyond the
namespace check (no quotas, limit ranges, pod security, service account
token volumes), RBAC (one token can do everything), garbage collection of
owner references, container restarts and exits (use ``set_pod_phase``),
init container statuses, strategic-merge list semantics, storage classes
that wait for the first consumer, TLS, and protobuf/CBOR.

How kubernetes_asyncio (36.1) surfaces errors from it
-----------------------------------------------------
- Every non-2xx answer to a normal call raises
  ``kubernetes_asyncio.client.exceptions.ApiException`` itself (never the
  ``NotFoundException``/``UnauthorizedException`` subclasses, which the
  client does not use): ``exc.status`` is the HTTP code (404, 409, 422...),
  ``exc.reason`` the HTTP phrase ("Not Found", "Conflict"), ``exc.body`` the
  Status JSON as ``str`` (``json.loads(exc.body)["reason"]`` is
  "NotFound", "AlreadyExists", "Conflict", "Invalid"...), ``exc.headers``
  the response headers.
- A watch (``watch.Watch().stream(...)``) turns an ERROR event into
  ``ApiException(status=code, reason=f"{reason}: {message}")`` with
  ``body`` and ``headers`` None: for 410 ``exc.status == 410`` and
  ``exc.reason == "Expired: too old resource version: X (Y)"``. With
  ``timeout_seconds`` it raises on the first 410; without it, it reconnects
  once from its last resourceVersion and raises on the second 410. A watch
  request refused outright (401, 400) is not raised by the HTTP layer (the
  watch asks with ``_preload_content=False``); the Watch reads the Status
  line and raises the same kind of ``ApiException(status, "Reason:
  message")``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hashlib
import json
import re
import socket
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Obj = dict[str, Any]
T = TypeVar("T")

DEFAULT_TOKEN = "stockade-fake-kube-token"  # a test credential, not a secret
NODE_NAME = "fake-node"
WATCH_DEFAULT_SECONDS = 1800  # the real API picks 1800-3600 s when none is asked
MISSING_IMAGE_PREFIX = "missing/"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
SECRET_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """A resource the fake serves."""

    plural: str
    kind: str
    group: str = ""
    namespaced: bool = True
    # Objects the API answers a DELETE with (the others get a Success Status).
    delete_returns_object: bool = False
    # Whose status only the status subresource changes.
    has_status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/v1" if self.group else "v1"

    @property
    def qualified(self) -> str:
        """How the real API names the resource in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, name: str, uid: str | None = None) -> Obj:
        details: Obj = {"name": name}
        if self.group:
            details["group"] = self.group
        details["kind"] = self.plural
        if uid:
            details["uid"] = uid
        return details


POD = Kind("pods", "Pod", delete_returns_object=True, has_status=True)
SECRET = Kind("secrets", "Secret")
PVC = Kind(
    "persistentvolumeclaims", "PersistentVolumeClaim", delete_returns_object=True, has_status=True
)
NETPOL = Kind("networkpolicies", "NetworkPolicy", group="networking.k8s.io")
NAMESPACE = Kind("namespaces", "Namespace", namespaced=False, has_status=True)
KINDS = {k.plural: k for k in (POD, SECRET, PVC, NETPOL, NAMESPACE)}
GROUPS = {"": (POD, SECRET, PVC, NAMESPACE), "networking.k8s.io": (NETPOL,)}
SHORT_NAMES = {
    "pods": ["po"],
    "persistentvolumeclaims": ["pvc"],
    "namespaces": ["ns"],
    "networkpolicies": ["netpol"],
}


def kind_named(name: str) -> Kind:
    """A kind by its name ("Pod") or resource ("pods"), any case."""
    lowered = name.lower()
    for kind in KINDS.values():
        if lowered in (kind.plural, kind.kind.lower()):
            return kind
    raise ValueError(f"the fake Kubernetes API has no kind {name!r}; it has {sorted(KINDS)}")


# --- errors ----------------------------------------------------------------------------


class Problem(Exception):
    """An answer with a failure Status."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        body["details"] = details
    body["code"] = code
    return body


def not_found(kind: Kind, name: str) -> Problem:
    return Problem(404, "NotFound", f'{kind.qualified} "{name}" not found', kind.details(name))


def bad_request(message: str) -> Problem:
    return Problem(400, "BadRequest", message)


def conflict(kind: Kind, name: str, why: str) -> Problem:
    return Problem(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {kind.qualified} "{name}": {why}',
        kind.details(name),
    )


@dataclass(frozen=True)
class FieldError:
    field: str
    reason: str  # FieldValueRequired, FieldValueInvalid, ...
    text: str  # "Required value", 'Invalid value: "x": why', ...


def required(field: str, why: str = "") -> FieldError:
    return FieldError(field, "FieldValueRequired", "Required value" + (f": {why}" if why else ""))


def invalid_value(field: str, value: Any, why: str) -> FieldError:
    return FieldError(field, "FieldValueInvalid", f"Invalid value: {json.dumps(value)}: {why}")


def forbidden(field: str, why: str) -> FieldError:
    return FieldError(field, "FieldValueForbidden", f"Forbidden: {why}")


def invalid(kind: Kind, name: str, errors: list[FieldError]) -> Problem:
    texts = [f"{e.field}: {e.text}" for e in errors]
    joined = texts[0] if len(texts) == 1 else f"[{', '.join(texts)}]"
    causes = [{"reason": e.reason, "message": e.text, "field": e.field} for e in errors]
    details: Obj = {"name": name} if name else {}
    if kind.group:
        details["group"] = kind.group
    details |= {"kind": kind.kind, "causes": causes}
    return Problem(422, "Invalid", f'{kind.kind} "{name}" is invalid: {joined}', details)


# --- validation ------------------------------------------------------------------------

_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
SUBDOMAIN_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE_HELP = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
NAME_PART_HELP = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


def _subdomain_errors(field: str, value: str) -> list[FieldError]:
    if len(value) > 253:
        return [invalid_value(field, value, "must be no more than 253 characters")]
    if not _SUBDOMAIN.fullmatch(value):
        return [invalid_value(field, value, SUBDOMAIN_HELP)]
    return []


def _qualified_name_errors(field: str, key: str) -> list[FieldError]:
    prefix, _, name = key.rpartition("/")
    errors: list[FieldError] = []
    if "/" in key and (not prefix or len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix)):
        errors.append(invalid_value(field, key, "prefix part " + SUBDOMAIN_HELP))
    if not name:
        errors.append(invalid_value(field, key, "name part must be non-empty"))
    elif len(name) > 63:
        errors.append(invalid_value(field, key, "name part must be no more than 63 characters"))
    elif not _QUALIFIED.fullmatch(name):
        errors.append(invalid_value(field, key, NAME_PART_HELP))
    return errors


def _metadata_errors(meta: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    name = meta.get("name", "")
    if not name:
        errors.append(required("metadata.name", "name or generateName is required"))
    elif not isinstance(name, str):
        errors.append(invalid_value("metadata.name", name, "must be a string"))
    else:
        errors += _subdomain_errors("metadata.name", name)
    for section in ("labels", "annotations"):
        given = meta.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            errors.append(invalid_value(f"metadata.{section}", given, "must be a map"))
            continue
        for key, value in given.items():
            errors += _qualified_name_errors(f"metadata.{section}", key)
            if not isinstance(value, str):
                errors.append(invalid_value(f"metadata.{section}", value, "must be a string"))
            elif section == "labels" and len(value) > 63:
                errors.append(
                    invalid_value("metadata.labels", value, "must be no more than 63 characters")
                )
            elif section == "labels" and value and not _QUALIFIED.fullmatch(value):
                errors.append(invalid_value("metadata.labels", value, LABEL_VALUE_HELP))
    finalizers = meta.get("finalizers")
    if finalizers is not None and not (
        isinstance(finalizers, list) and all(isinstance(f, str) for f in finalizers)
    ):
        errors.append(invalid_value("metadata.finalizers", finalizers, "must be a list of names"))
    return errors


def _containers(spec: Obj, section: str = "containers") -> list[Obj]:
    given = spec.get(section)
    return [c for c in given if isinstance(c, dict)] if isinstance(given, list) else []


def _pod_errors(pod: Obj) -> list[FieldError]:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [required("spec.containers")]
    errors: list[FieldError] = []
    if not spec.get("containers"):
        errors.append(required("spec.containers"))
    seen: set[str] = set()
    for section in ("initContainers", "containers"):
        given = spec.get(section)
        if given is not None and not isinstance(given, list):
            errors.append(invalid_value(f"spec.{section}", given, "must be a list"))
            continue
        for i, container in enumerate(given or []):
            where = f"spec.{section}[{i}]"
            if not isinstance(container, dict):
                errors.append(invalid_value(where, container, "must be an object"))
                continue
            name = container.get("name")
            if not name:
                errors.append(required(f"{where}.name"))
            elif not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.fullmatch(name):
                errors.append(
                    invalid_value(
                        f"{where}.name",
                        name,
                        "a lowercase RFC 1123 label "
                        "must consist of lower case alphanumeric characters or '-', and "
                        "must start and end with an alphanumeric character",
                    )
                )
            elif name in seen:
                errors.append(
                    FieldError(
                        f"{where}.name",
                        "FieldValueDuplicate",
                        f"Duplicate value: {json.dumps(name)}",
                    )
                )
            else:
                seen.add(name)
            if not container.get("image"):
                errors.append(required(f"{where}.image"))
    for i, volume in enumerate(spec.get("volumes") or []):
        if not isinstance(volume, dict) or not volume.get("name"):
            errors.append(required(f"spec.volumes[{i}].name"))
    return errors


def _pvc_errors(pvc: Obj) -> list[FieldError]:
    spec = pvc.get("spec") if isinstance(pvc.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    errors: list[FieldError] = []
    if not spec.get("accessModes"):
        errors.append(required("spec.accessModes", "at least 1 access mode is required"))
    requests = (spec.get("resources") or {}).get("requests") or {}
    if not requests.get("storage"):
        errors.append(required("spec.resources[storage]"))
    return errors


def _secret_errors(secret: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    data = secret.get("data") or {}
    size = 0
    for key, value in data.items():
        if not _CONFIG_KEY.fullmatch(key) or key in (".", ".."):
            errors.append(
                invalid_value(
                    f"data[{key}]",
                    key,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                )
            )
        size += len(base64.b64decode(value))
    if size > SECRET_LIMIT:
        errors.append(
            FieldError(
                "data", "FieldValueTooLong", f"Too long: must have at most {SECRET_LIMIT} bytes"
            )
        )
    kind = secret.get("type")
    if kind == "kubernetes.io/dockerconfigjson" and ".dockerconfigjson" not in data:
        errors.append(required("data[.dockerconfigjson]"))
    return errors


def _pod_update_errors(old: Obj, new: Obj) -> list[FieldError]:
    def munged(pod: Obj) -> Obj:
        spec = copy.deepcopy(pod.get("spec") or {})
        for section in ("containers", "initContainers"):
            for container in _containers(spec, section):
                container.pop("image", None)
        for mutable in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
            spec.pop(mutable, None)
        return spec

    if munged(old) != munged(new):
        return [
            forbidden(
                "spec",
                "pod updates may not change fields other than "
                "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
                "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it "
                "to be set to 1 if it was previously negative)",
            )
        ]
    return []


def _pvc_update_errors(old: Obj, new: Obj) -> list[FieldError]:
    def munged(pvc: Obj, other: Obj) -> Obj:
        spec = copy.deepcopy(pvc.get("spec") or {})
        spec.get("resources", {}).pop("requests", None)
        other_spec = other.get("spec") or {}
        # Fields the binder or defaulting fill in may be left out by the client.
        for filled in ("volumeName", "storageClassName", "volumeMode"):
            if filled not in other_spec:
                spec.pop(filled, None)
        return spec

    if munged(old, new) != munged(new, old):
        return [
            forbidden(
                "spec",
                "spec is immutable after creation except resources.requests "
                "and volumeAttributesClassName for bound claims",
            )
        ]
    return []


def _secret_update_errors(old: Obj, new: Obj) -> list[FieldError]:
    if old.get("immutable"):
        errors = []
        for field in ("data", "type"):
            if old.get(field) != new.get(field):
                errors.append(forbidden(field, "field is immutable when `immutable` is set"))
        if not new.get("immutable"):
            errors.append(forbidden("immutable", "field is immutable when `immutable` is set"))
        return errors
    if old.get("type", "Opaque") != new.get("type", "Opaque"):
        return [invalid_value("type", new.get("type"), "field is immutable")]
    return []


# --- defaults --------------------------------------------------------------------------


def _pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    return "Always" if ":" not in last or last.endswith(":latest") else "IfNotPresent"


def _default_pod(pod: Obj) -> None:
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for section in ("initContainers", "containers"):
        for container in _containers(spec, section):
            container.setdefault("resources", {})
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", _pull_policy(str(container.get("image"))))


def _qos_class(pod: Obj) -> str:
    resources = [c.get("resources") or {} for c in _containers(pod["spec"])]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        if not all(limits.get(x) for x in ("cpu", "memory")):
            return "Burstable"
        if any(requests.get(x, limits[x]) != limits[x] for x in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def _default_secret(secret: Obj) -> None:
    secret.setdefault("type", "Opaque")
    data = secret.get("data")
    if data is not None and not isinstance(data, dict):
        raise bad_request(
            'Secret in version "v1" cannot be handled as a Secret: data must be a map'
        )
    data = dict(data or {})
    for key, value in data.items():
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: '
                f"illegal base64 data in data[{key}]: {exc}"
            ) from exc
    string_data = secret.pop("stringData", None) or {}
    if not isinstance(string_data, dict):
        raise bad_request(
            'Secret in version "v1" cannot be handled as a Secret: stringData must be a map'
        )
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data or "data" in secret:
        secret["data"] = data


def _default_pvc(pvc: Obj) -> None:
    pvc["spec"].setdefault("volumeMode", "Filesystem")


def _default_netpol(policy: Obj) -> None:
    spec = policy.setdefault("spec", {})
    spec.setdefault("podSelector", {})
    if "policyTypes" not in spec:
        spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])


# --- selectors -------------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"""\s*(?:
        !\s*(?P<absent>[^\s,!=()]+)
      | (?P<key>[^\s,!=()]+)\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>[^\s,!=()]*)
          | \s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
        )?
    )\s*(?:,|$)""",
    re.X,
)

Requirement = tuple[str, str, frozenset[str]]


def parse_label_selector(text: str) -> list[Requirement]:
    """A label selector as requirements (key, operator, values); BadRequest
    when it does not parse."""
    requirements: list[Requirement] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _REQUIREMENT.match(text, position)
        if not match or match.end() == position:
            raise bad_request(
                f"unable to parse requirement: found {text[position:]!r} in "
                f"label selector {text!r}: expected k=v, k!=v, k, !k, "
                "k in (v1,v2) or k notin (v1,v2), separated by commas"
            )
        position = match.end()
        if match["absent"]:
            requirements.append((match["absent"], "!", frozenset()))
        elif match["op"]:
            requirements.append(
                (match["key"], "!=" if match["op"] == "!=" else "=", frozenset([match["value"]]))
            )
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append((match["key"], match["setop"], values))
        else:
            requirements.append((match["key"], "exists", frozenset()))
    for key, _, _ in requirements:
        if _qualified_name_errors("labelSelector", key):
            raise bad_request(f"unable to parse requirement: invalid label key {key!r}")
    return requirements


def labels_match(requirements: list[Requirement], labels: dict[str, str]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if (
            (op == "=" and value not in values)
            or (op == "!=" and value in values)
            or (op == "in" and value not in values)
            or (op == "notin" and present and value in values)
            or (op == "exists" and not present)
            or (op == "!" and present)
        ):
            return False
    return True


_FIELDS: dict[str, Callable[[Obj], str]] = {
    "metadata.name": lambda o: str(o["metadata"].get("name", "")),
    "metadata.namespace": lambda o: str(o["metadata"].get("namespace", "")),
}
_POD_FIELDS: dict[str, Callable[[Obj], str]] = {
    "status.phase": lambda o: str((o.get("status") or {}).get("phase", "")),
    "spec.nodeName": lambda o: str((o.get("spec") or {}).get("nodeName", "")),
}

FieldRequirement = tuple[Callable[[Obj], str], bool, str]  # getter, equal?, value


def parse_field_selector(text: str, kind: Kind) -> list[FieldRequirement]:
    known = _FIELDS | (_POD_FIELDS if kind is POD else {})
    requirements: list[FieldRequirement] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", part)
        if not match:
            raise bad_request(
                f"invalid field selector: {part!r}: expected field=value or field!=value"
            )
        if match[1] not in known:
            raise bad_request(
                f'"{match[1]}" is not a known field selector: only '
                + ", ".join(f'"{f}"' for f in known)
            )
        requirements.append((known[match[1]], match[2] != "!=", match[3]))
    return requirements


@dataclass(frozen=True)
class Selection:
    """Which objects a list or watch is about."""

    kind: Kind
    namespace: str | None
    labels: list[Requirement]
    fields: list[FieldRequirement]

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace", "") != self.namespace:
            return False
        if not labels_match(self.labels, meta.get("labels") or {}):
            return False
        return all((get(obj) == value) == equal for get, equal, value in self.fields)


# --- the cluster -----------------------------------------------------------------------


def now_text(delta: float = 0.0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=delta)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _with_kind(kind: Kind, obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    return {"kind": kind.kind, "apiVersion": kind.api_version} | out


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: Kind
    obj: Obj  # after the change; for DELETED, the object as it went
    prev: Obj | None  # before it


Key = tuple[str, str, str]  # plural, namespace, name


class LoggedRequest(str):
    """One request, as the text ``METHOD /path?query`` (so a test can match
    it as a string), with its parts as attributes: ``method``, ``path``,
    ``query`` (a dict), ``watch``, ``status`` (None until answered) and
    ``body`` (the JSON sent, or None)."""

    method: str
    path: str
    query: dict[str, str]
    watch: bool
    status: int | None
    body: Any

    @classmethod
    def of(cls, request: Request) -> LoggedRequest:
        query = request.url.query
        made = cls(f"{request.method} {request.url.path}" + (f"?{query}" if query else ""))
        made.method, made.path = request.method, request.url.path
        made.query = dict(request.query_params)
        made.watch, made.status, made.body = False, None, None
        return made


class Cluster:
    """The API's state and its simulated controllers; used from one event loop."""

    def __init__(
        self,
        namespaces: Iterable[str] | None,
        *,
        history: int,
        kubelet_delay: float,
        grace_cap: float,
        pod_ip: str,
    ) -> None:
        self.rv = 0
        self.store: dict[Key, Obj] = {}
        self.history: deque[Event] = deque()
        self.history_limit = history
        self.compacted = 0  # a watch from a resourceVersion below this gets 410
        self.watchers: set[asyncio.Queue[Event | None]] = set()
        self.tasks: dict[Key, asyncio.Task[None]] = {}  # controllers working on an object
        self.grace: dict[Key, asyncio.Task[None]] = {}  # pods in their grace period
        self.log: list[LoggedRequest] = []
        self.kubelet_delay = kubelet_delay
        self.grace_cap = grace_cap
        self.pod_ip = pod_ip
        # None: every namespace exists (it is made when first used).
        self.any_namespace = namespaces is None
        for name in dict.fromkeys(["default", *(namespaces or []), "kube-system"]):
            self._make_namespace(name)

    def _make_namespace(self, name: str) -> Obj:
        meta = {"name": name, "labels": {"kubernetes.io/metadata.name": name}}
        namespace = {
            "metadata": meta,
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self._stamp(namespace, "")
        return self.write("ADDED", NAMESPACE, namespace, None)

    # --- storage ----------------------------------------------------------------------

    @staticmethod
    def key(kind: Kind, namespace: str, name: str) -> Key:
        return (kind.plural, namespace if kind.namespaced else "", name)

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        obj = self.store.get(self.key(kind, namespace, name))
        if obj is None and kind is NAMESPACE and self.any_namespace:
            self._check_namespace(name)
            obj = self.store.get(self.key(kind, namespace, name))
        if obj is None:
            raise not_found(kind, name)
        return obj

    def _exists(self, kind: Kind, namespace: str, name: str) -> bool:
        return self.key(kind, namespace, name) in self.store

    def list(self, selection: Selection) -> list[Obj]:
        found = [
            obj
            for (plural, _, _), obj in self.store.items()
            if plural == selection.kind.plural and selection.matches(obj)
        ]
        return sorted(
            found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def _stamp(self, obj: Obj, namespace: str) -> None:
        meta = obj["metadata"]
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_text()

    def write(self, type_: str, kind: Kind, obj: Obj, prev: Obj | None) -> Obj:
        """Store (or, for DELETED, drop) an object under a new resourceVersion
        and tell the watches."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        key = self.key(kind, meta.get("namespace", ""), meta["name"])
        if type_ == "DELETED":
            self.store.pop(key, None)
        else:
            self.store[key] = obj
        event = Event(self.rv, type_, kind, copy.deepcopy(obj), prev)
        self.history.append(event)
        while len(self.history) > self.history_limit:
            self.compacted = self.history.popleft().rv
        for queue in self.watchers:
            queue.put_nowait(event)
        return obj

    def expire(self, close: bool) -> None:
        """Forget the history, as an etcd compaction does after writes
        elsewhere: every resourceVersion handed out so far becomes too old."""
        self.rv += 1
        self.compacted = self.rv
        self.history.clear()
        if close:
            self.close_watches()

    def close_watches(self) -> None:
        for queue in self.watchers:
            queue.put_nowait(None)

    def shutdown(self) -> None:
        self.close_watches()
        for task in [*self.tasks.values(), *self.grace.values()]:
            task.cancel()

    def _spawn(self, key: Key, work: Coroutine[Any, Any, None], table: dict[Key, Any]) -> None:
        old = table.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(work)
        table[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if table.get(key) is finished:
                del table[key]

        task.add_done_callback(done)

    def _cancel(self, key: Key) -> None:
        for table in (self.tasks, self.grace):
            task = table.pop(key, None)
            if task is not None:
                task.cancel()

    # --- verbs ------------------------------------------------------------------------

    def _decode(self, kind: Kind, namespace: str, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise bad_request(
                f"the body must be a JSON object (a {kind.kind}), got {type(body).__name__}"
            )
        obj = copy.deepcopy(body)
        if obj.get("kind", kind.kind) != kind.kind:
            raise bad_request(
                f'{obj.get("kind")} in version "{obj.get("apiVersion", "")}" cannot '
                f"be handled as a {kind.kind}: the URL is for {kind.plural}"
            )
        if obj.get("apiVersion", kind.api_version) != kind.api_version:
            raise bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not "
                f"match the expected API version ({kind.api_version})"
            )
        obj.pop("kind", None)
        obj.pop("apiVersion", None)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be a JSON object")
        if meta.get("namespace", namespace) != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace "
                "sent on the request"
            )
        return obj

    def _check_namespace(self, namespace: str) -> None:
        if self.key(NAMESPACE, "", namespace) in self.store:
            return
        if self.any_namespace and len(namespace) <= 63 and _DNS_LABEL.fullmatch(namespace):
            self._make_namespace(namespace)
            return
        raise not_found(NAMESPACE, namespace)

    def _validate(self, kind: Kind, obj: Obj, old: Obj | None) -> None:
        errors = _metadata_errors(obj["metadata"])
        if kind is POD:
            errors += _pod_errors(obj)
        elif kind is PVC:
            errors += _pvc_errors(obj)
        elif kind is SECRET:
            errors += _secret_errors(obj)
        if old is not None and not errors:
            if kind is POD:
                errors += _pod_update_errors(old, obj)
            elif kind is PVC:
                errors += _pvc_update_errors(old, obj)
            elif kind is SECRET:
                errors += _secret_update_errors(old, obj)
        if errors:
            raise invalid(kind, str(obj["metadata"].get("name") or ""), errors)

    def _default(self, kind: Kind, obj: Obj) -> None:
        if kind is SECRET:
            _default_secret(obj)
        elif kind is NETPOL:
            _default_netpol(obj)
        elif kind is POD and isinstance(obj.get("spec"), dict):
            _default_pod(obj)
        elif kind is PVC and isinstance(obj.get("spec"), dict):
            _default_pvc(obj)

    def create(self, kind: Kind, namespace: str, body: Any) -> Obj:
        obj = self._decode(kind, namespace, body)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        self._check_namespace(namespace)
        self._default(kind, obj)
        self._validate(kind, obj, None)
        name = meta["name"]
        there = self.store.get(self.key(kind, namespace, name))
        if there is not None:
            # A terminating object still holds its name, as in the real API.
            going = "object is being deleted: " if "deletionTimestamp" in there["metadata"] else ""
            message = f'{going}{kind.qualified} "{name}" already exists'
            raise Problem(409, "AlreadyExists", message, kind.details(name))
        for server_set in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(server_set, None)
        self._stamp(obj, namespace)
        if kind is POD:
            obj["status"] = {"phase": "Pending", "qosClass": _qos_class(obj)}
        elif kind is PVC:
            meta["finalizers"] = [*(meta.get("finalizers") or []), PVC_PROTECTION]
            obj["status"] = {"phase": "Pending"}
        self.write("ADDED", kind, obj, None)
        key = self.key(kind, namespace, name)
        if kind is POD:
            self._spawn(key, self._kubelet(namespace, name), self.tasks)
        elif kind is PVC:
            self._spawn(key, self._binder(namespace, name), self.tasks)
        return obj

    def replace(
        self, kind: Kind, namespace: str, name: str, body: Any, *, subresource: str = ""
    ) -> Obj:
        obj = self._decode(kind, namespace, body)
        meta = obj["metadata"]
        if meta.get("name") != name:
            raise bad_request(
                f"the name of the object ({meta.get('name', '')}) does not match "
                f"the name on the URL ({name})"
            )
        old = self.get(kind, namespace, name)
        given = meta.get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise conflict(
                kind,
                name,
                "the object has been modified; please apply your changes "
                "to the latest version and try again",
            )
        if subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = obj.get("status") or {}
        else:
            new = obj
            for server_set in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
            ):
                if server_set in old["metadata"]:
                    meta[server_set] = old["metadata"][server_set]
                else:
                    meta.pop(server_set, None)
            if kind.has_status:
                new["status"] = copy.deepcopy(old.get("status", {}))
            self._default(kind, new)
            if kind is POD and "nodeName" in old["spec"] and "nodeName" not in new["spec"]:
                new["spec"]["nodeName"] = old["spec"]["nodeName"]
            self._validate(kind, new, old)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # nothing changed: the real API writes nothing either
        self.write("MODIFIED", kind, new, old)
        self._finish_if_done(kind, namespace, name)
        if kind is POD and old["spec"].get("containers") != new["spec"].get("containers"):
            # A new image: the kubelet pulls it.
            self._spawn(self.key(kind, namespace, name), self._kubelet(namespace, name), self.tasks)
        return new

    def patch(
        self, kind: Kind, namespace: str, name: str, patch: Any, *, subresource: str = ""
    ) -> Obj:
        if not isinstance(patch, dict):
            raise bad_request("a merge patch must be a JSON object")
        old = self.get(kind, namespace, name)
        merged = merge_patch(_with_kind(kind, old), patch)
        if "resourceVersion" not in (patch.get("metadata") or {}):
            merged["metadata"]["resourceVersion"] = ""
        return self.replace(kind, namespace, name, merged, subresource=subresource)

    def delete(self, kind: Kind, namespace: str, name: str, options: Obj) -> tuple[int, Obj]:
        obj = self.get(kind, namespace, name)
        meta = obj["metadata"]
        preconditions = options.get("preconditions") or {}
        for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field)
            if wanted and wanted != meta.get(field):
                raise conflict(
                    kind,
                    name,
                    f"Precondition failed: {label} in precondition: "
                    f"{wanted}, {label} in object meta: {meta.get(field)}",
                )
        key = self.key(kind, namespace, name)
        if kind is POD:
            grace = options.get("gracePeriodSeconds")
            if grace is None:
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            grace = max(int(grace), 0)
            if not obj["spec"].get("nodeName"):
                grace = 0  # never scheduled: nothing to stop
            current = meta.get("deletionGracePeriodSeconds")
            if "deletionTimestamp" not in meta or (current is not None and grace < current):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_text(grace)
                new["metadata"]["deletionGracePeriodSeconds"] = grace
                self._cancel(key)  # the kubelet stops starting it
                if grace == 0 and not meta.get("finalizers"):
                    return self._remove(kind, new)
                self.write("MODIFIED", kind, new, obj)
                if grace > 0:
                    self._spawn(key, self._grace_period(namespace, name, grace), self.grace)
                obj = new
            return 200, _with_kind(kind, obj)
        if "deletionTimestamp" not in meta:
            if meta.get("finalizers"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = now_text()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                self.write("MODIFIED", kind, new, obj)
                obj = new
                if kind is PVC:
                    asyncio.get_running_loop().call_soon(self._protect_claims, namespace)
            else:
                self._cancel(key)
                return self._remove(kind, obj)
        if kind.delete_returns_object:
            return 200, _with_kind(kind, obj)
        return 200, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": kind.details(name, meta.get("uid")),
        }

    def _remove(self, kind: Kind, obj: Obj) -> tuple[int, Obj]:
        prev = self.store.get(
            self.key(kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        )
        gone = self.write("DELETED", kind, copy.deepcopy(obj), prev)
        if kind is POD:
            asyncio.get_running_loop().call_soon(
                self._protect_claims, gone["metadata"]["namespace"]
            )
        if kind.delete_returns_object:
            return 200, _with_kind(kind, gone)
        return 200, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": kind.details(gone["metadata"]["name"], gone["metadata"].get("uid")),
        }

    def _finish_if_done(self, kind: Kind, namespace: str, name: str) -> None:
        """Remove a terminating object once its finalizers and grace period
        are over."""
        key = self.key(kind, namespace, name)
        obj = self.store.get(key)
        if obj is None or "deletionTimestamp" not in obj["metadata"]:
            return
        if obj["metadata"].get("finalizers") or key in self.grace:
            return
        self._cancel(key)
        self._remove(kind, obj)

    # --- controllers ------------------------------------------------------------------

    async def _grace_period(self, namespace: str, name: str, grace: float) -> None:
        await asyncio.sleep(min(grace, self.grace_cap))
        key = self.key(POD, namespace, name)
        self.grace.pop(key, None)
        self._finish_if_done(POD, namespace, name)

    def _protect_claims(self, namespace: str) -> None:
        """The pvc-protection controller: a terminating claim that no unfinished
        pod mounts loses its finalizer, and so goes."""
        in_use = set()
        for (plural, ns, _), pod in self.store.items():
            if plural != "pods" or ns != namespace:
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            for volume in pod["spec"].get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim:
                    in_use.add(claim)
        for (plural, ns, name), pvc in list(self.store.items()):
            meta = pvc["metadata"]
            if plural != PVC.plural or ns != namespace or "deletionTimestamp" not in meta:
                continue
            if name in in_use or PVC_PROTECTION not in (meta.get("finalizers") or []):
                continue
            new = copy.deepcopy(pvc)
            new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != PVC_PROTECTION]
            if new["metadata"]["finalizers"]:
                self.write("MODIFIED", PVC, new, pvc)
            else:
                self._cancel(self.key(PVC, ns, name))
                self._remove(PVC, new)

    def _update_status(
        self, kind: Kind, namespace: str, name: str, status: Obj, spec: Obj | None = None
    ) -> bool:
        old = self.store.get(self.key(kind, namespace, name))
        if old is None:
            return False
        new = copy.deepcopy(old)
        new["status"] = status
        if spec is not None:
            new["spec"] = spec
        if new != old:
            self.write("MODIFIED", kind, new, old)
        return True

    async def _binder(self, namespace: str, name: str) -> None:
        await asyncio.sleep(self.kubelet_delay)
        pvc = self.store.get(self.key(PVC, namespace, name))
        if pvc is None or "deletionTimestamp" in pvc["metadata"]:
            return
        spec = copy.deepcopy(pvc["spec"])
        spec["volumeName"] = f"pvc-{pvc['metadata']['uid']}"
        status = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes"),
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
        }
        self._update_status(PVC, namespace, name, status, spec)

    def _blocker(self, pod: Obj) -> tuple[str, str, str] | None:
        """Why the pod cannot start yet: (stage, reason, message), or None."""
        namespace = pod["metadata"]["namespace"]
        spec = pod["spec"]
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                pvc = self.store.get(self.key(PVC, namespace, claim))
                if pvc is None:
                    return (
                        "schedule",
                        "Unschedulable",
                        f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found.',
                    )
                if "deletionTimestamp" in pvc["metadata"]:
                    return (
                        "schedule",
                        "Unschedulable",
                        f"0/1 nodes are available: "
                        f'persistentvolumeclaim "{claim}" is being deleted.',
                    )
                if (pvc.get("status") or {}).get("phase") != "Bound":
                    return (
                        "schedule",
                        "Unschedulable",
                        "0/1 nodes are available: pod has "
                        "unbound immediate PersistentVolumeClaims.",
                    )
        for volume in spec.get("volumes") or []:
            secret = volume.get("secret") or {}
            name = secret.get("secretName")
            if name and not secret.get("optional") and not self._exists(SECRET, namespace, name):
                return ("mount", "ContainerCreating", "")
        for container in _containers(spec, "initContainers") + _containers(spec):
            refs = [
                (e.get("valueFrom") or {}).get("secretKeyRef") for e in container.get("env") or []
            ]
            refs += [e.get("secretRef") for e in container.get("envFrom") or []]
            for ref in refs:
                if not isinstance(ref, dict):
                    continue
                name = ref.get("name")
                if name and not ref.get("optional") and not self._exists(SECRET, namespace, name):
                    return ("env", "CreateContainerConfigError", f'secret "{name}" not found')
        return None

    async def _kubelet(self, namespace: str, name: str) -> None:
        """The scheduler and kubelet for one pod: polls while the pod waits
        for a claim or a secret, as they retry."""
        pulls = 0
        while True:
            await asyncio.sleep(self.kubelet_delay)
            pod = self.store.get(self.key(POD, namespace, name))
            if pod is None or "deletionTimestamp" in pod["metadata"]:
                return
            state = self._step(pod, pulls)
            if state == "running":
                return
            if state == "pulling":
                pulls += 1
                if pulls >= 2:
                    return  # ImagePullBackOff for good: the image never appears

    def _step(self, pod: Obj, pulls: int) -> str:
        """Move a pod on: "running", "pulling" (an image is missing) or
        "blocked" (a claim or secret is)."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        at = now_text()
        spec = copy.deepcopy(pod["spec"])
        status = copy.deepcopy(pod.get("status") or {})
        old_conditions = {c["type"]: c for c in status.get("conditions") or []}

        def condition(kind: str, ok: bool, reason: str = "", message: str = "") -> Obj:
            value = "True" if ok else "False"
            previous = old_conditions.get(kind)
            since = (
                previous["lastTransitionTime"] if previous and previous["status"] == value else at
            )
            made: Obj = {
                "type": kind,
                "status": value,
                "lastProbeTime": None,
                "lastTransitionTime": since,
            }
            if reason:
                made["reason"] = reason
            if message:
                made["message"] = message
            return made

        blocker = self._blocker(pod)
        if blocker and blocker[0] == "schedule":
            status["conditions"] = [condition("PodScheduled", False, blocker[1], blocker[2])]
            self._update_status(POD, namespace, name, status)
            return "blocked"
        spec["nodeName"] = NODE_NAME
        status |= {
            "hostIP": self.pod_ip,
            "hostIPs": [{"ip": self.pod_ip}],
            "startTime": status.get("startTime", at),
        }
        containers = _containers(spec)
        statuses: list[Obj] = []
        for container in containers:
            image = str(container.get("image"))
            entry: Obj = {
                "name": container["name"],
                "image": image,
                "imageID": "",
                "lastState": {},
                "ready": False,
                "restartCount": 0,
                "started": False,
            }
            if blocker:
                reason, message = blocker[1], blocker[2]
                entry["state"] = {
                    "waiting": {"reason": reason, **({"message": message} if message else {})}
                }
            elif image.startswith(MISSING_IMAGE_PREFIX):
                reference = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
                if pulls == 0:
                    waiting = {
                        "reason": "ErrImagePull",
                        "message": (
                            f"rpc error: code = NotFound desc = failed to pull and unpack image "
                            f'"docker.io/{reference}": failed to resolve reference '
                            f'"docker.io/{reference}": docker.io/{reference}: not found'
                        ),
                    }
                else:
                    waiting = {
                        "reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{image}"',
                    }
                entry["state"] = {"waiting": waiting}
            else:
                digest = hashlib.sha256(image.encode()).hexdigest()
                container_id = hashlib.sha256(
                    f"{namespace}/{name}/{container['name']}/{pod['metadata']['uid']}".encode()
                ).hexdigest()
                entry |= {
                    "imageID": f"docker.io/{image}@sha256:{digest}",
                    "containerID": f"containerd://{container_id}",
                    "ready": True,
                    "started": True,
                    "state": {"running": {"startedAt": at}},
                }
            statuses.append(entry)
        unready = [s["name"] for s in statuses if not s["ready"]]
        running = not unready
        if running:
            status |= {"phase": "Running", "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}]}
        else:
            status["phase"] = "Pending"
        why = f"containers with unready status: [{' '.join(unready)}]"
        status["conditions"] = [
            condition("PodReadyToStartContainers", blocker is None or blocker[0] == "env"),
            condition("Initialized", True),
            condition(
                "Ready", running, "" if running else "ContainersNotReady", "" if running else why
            ),
            condition(
                "ContainersReady",
                running,
                "" if running else "ContainersNotReady",
                "" if running else why,
            ),
            condition("PodScheduled", True),
        ]
        status["containerStatuses"] = statuses
        self._update_status(POD, namespace, name, status, spec)
        if running:
            return "running"
        return "blocked" if blocker else "pulling"

    def set_pod_phase(
        self, namespace: str, name: str, phase: str, reason: str | None, message: str | None
    ) -> Obj:
        pod = self.get(POD, namespace, name)
        task = self.tasks.pop(self.key(POD, namespace, name), None)
        if task is not None:
            task.cancel()
        status = copy.deepcopy(pod.get("status") or {})
        status["phase"] = phase
        for field, value in (("reason", reason), ("message", message)):
            if value:
                status[field] = value
            else:
                status.pop(field, None)
        if phase in ("Succeeded", "Failed"):
            code = 0 if phase == "Succeeded" else 1
            for entry in status.get("containerStatuses") or []:
                started = (entry.get("state") or {}).get("running", {}).get("startedAt", now_text())
                entry["state"] = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else (reason or "Error"),
                        "startedAt": started,
                        "finishedAt": now_text(),
                        "containerID": entry.get("containerID", ""),
                    }
                }
                entry["ready"] = False
                entry["started"] = False
            for condition in status.get("conditions") or []:
                if condition["type"] in ("Ready", "ContainersReady"):
                    condition |= {
                        "status": "False",
                        "reason": "PodCompleted" if code == 0 else "PodFailed",
                        "lastTransitionTime": now_text(),
                    }
        self._update_status(POD, namespace, name, status)
        asyncio.get_running_loop().call_soon(self._protect_claims, namespace)
        return self.get(POD, namespace, name)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- HTTP ------------------------------------------------------------------------------


def _json(body: Obj, code: int = 200) -> Response:
    return JSONResponse(body, status_code=code)


def _line(event: Obj) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


class KubeAPI:
    """The HTTP face of a Cluster."""

    def __init__(self, cluster: Cluster, token: str, bookmark_seconds: float) -> None:
        self.cluster = cluster
        self.token = token
        self.bookmark_seconds = bookmark_seconds

    def app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=methods)])

    async def handle(self, request: Request) -> Response:
        entry = LoggedRequest.of(request)
        self.cluster.log.append(entry)
        try:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise Problem(401, "Unauthorized", "Unauthorized")
            raw = await request.body()
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise bad_request(
                        f"couldn't get version/kind; json parse error: {exc}"
                    ) from exc
                entry.body = body
            response = await self.route(request, entry, body)
        except Problem as problem:
            response = _json(problem.status(), problem.code)
        entry.status = response.status_code
        return response

    async def route(self, request: Request, entry: LoggedRequest, body: Any) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        params = request.query_params
        if parts == ["version"]:
            return _json(
                {
                    "major": "1",
                    "minor": "33",
                    "gitVersion": "v1.33.0-stockade-fake",
                    "platform": "linux/amd64",
                }
            )
        if parts == ["api"]:
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.netloc}
                    ],
                }
            )
        if parts == ["apis"]:
            return _json(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self._group("networking.k8s.io")],
                }
            )
        if parts == ["apis", "networking.k8s.io"]:
            return _json({"kind": "APIGroup", "apiVersion": "v1"} | self._group(parts[1]))
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:3] == ["apis", "networking.k8s.io", "v1"]:
            group, rest = "networking.k8s.io", parts[3:]
        else:
            raise Problem(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return _json(self._resources(group))
        watch = _truthy(params.get("watch"))
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        if not rest:
            raise Problem(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        kind = KINDS.get(rest[0])
        if kind is None or kind not in GROUPS[group] or len(rest) > 3:
            raise Problem(
                404,
                "NotFound",
                f"the server could not find the requested resource "
                f"({request.method} {request.url.path}): this fake Kubernetes API "
                "serves pods, secrets, persistentvolumeclaims, namespaces and "
                "networkpolicies",
            )
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else ""
        if subresource and (subresource != "status" or not kind.has_status or kind is NAMESPACE):
            raise Problem(
                404,
                "NotFound",
                f"the server could not find the requested resource: "
                f"{kind.plural}/{subresource} is not modelled by this fake",
            )
        method = request.method
        if kind is NAMESPACE and method != "GET":
            raise Problem(
                405,
                "MethodNotAllowed",
                "the fake Kubernetes API has a fixed set of "
                "namespaces, chosen when it starts; they cannot be changed",
            )
        if params.get("dryRun"):
            raise bad_request("dryRun is not supported by the fake Kubernetes API; leave it out")
        ns = namespace or ""
        if name is None:
            if method == "GET":
                selection = self._selection(kind, namespace, params)
                if watch:
                    entry.watch = True
                    return self.watch(selection, params)
                items = [copy.deepcopy(o) for o in self.cluster.list(selection)]
                return _json(
                    {
                        "kind": f"{kind.kind}List",
                        "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self.cluster.rv)},
                        "items": items,
                    }
                )
            if method == "POST" and namespace is not None:
                return _json(_with_kind(kind, self.cluster.create(kind, ns, body)), 201)
            raise Problem(
                405,
                "MethodNotAllowed",
                f"{method} on a collection of {kind.plural} "
                "is not supported by the fake Kubernetes API",
            )
        if watch:
            raise bad_request(
                "watch a single object with fieldSelector=metadata.name=NAME on its collection"
            )
        if kind.namespaced and namespace is None:
            raise Problem(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            return _json(_with_kind(kind, self.cluster.get(kind, ns, name)))
        if method == "PUT":
            return _json(
                _with_kind(
                    kind, self.cluster.replace(kind, ns, name, body, subresource=subresource)
                )
            )
        if method == "PATCH":
            media = request.headers.get("content-type", "").split(";")[0].strip()
            if media not in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                raise Problem(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an "
                    f"unknown format ({media or 'no content type'}) - accepted media "
                    "types of this fake include: application/merge-patch+json, "
                    "application/strategic-merge-patch+json",
                )
            return _json(
                _with_kind(kind, self.cluster.patch(kind, ns, name, body, subresource=subresource))
            )
        if method == "DELETE" and not subresource:
            options = dict(body) if isinstance(body, dict) else {}
            if params.get("gracePeriodSeconds") is not None:
                options["gracePeriodSeconds"] = self._int(params, "gracePeriodSeconds")
            code, answer = self.cluster.delete(kind, ns, name, options)
            return _json(answer, code)
        raise Problem(405, "MethodNotAllowed", f"{method} is not supported here")

    @staticmethod
    def _int(params: Any, name: str) -> int:
        try:
            return int(params.get(name))
        except ValueError as exc:
            raise bad_request(f"{name} must be an integer, got {params.get(name)!r}") from exc

    @staticmethod
    def _group(group: str) -> Obj:
        version = {"groupVersion": f"{group}/v1", "version": "v1"}
        return {"name": group, "versions": [version], "preferredVersion": version}

    @staticmethod
    def _resources(group: str) -> Obj:
        resources = []
        for kind in GROUPS[group]:
            verbs = (
                ["get", "list", "watch"]
                if kind is NAMESPACE
                else ["create", "delete", "get", "list", "patch", "update", "watch"]
            )
            entry = {
                "name": kind.plural,
                "singularName": kind.kind.lower(),
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": verbs,
            }
            if kind.plural in SHORT_NAMES:
                entry["shortNames"] = SHORT_NAMES[kind.plural]
            resources.append(entry)
            if kind.has_status and kind is not NAMESPACE:
                resources.append(
                    {
                        "name": f"{kind.plural}/status",
                        "singularName": "",
                        "namespaced": True,
                        "kind": kind.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/v1" if group else "v1",
            "resources": resources,
        }

    @staticmethod
    def _selection(kind: Kind, namespace: str | None, params: Any) -> Selection:
        return Selection(
            kind,
            namespace,
            parse_label_selector(params.get("labelSelector", "")),
            parse_field_selector(params.get("fieldSelector", ""), kind),
        )

    def watch(self, selection: Selection, params: Any) -> Response:
        cluster = self.cluster
        timeout = self._int(params, "timeoutSeconds") if params.get("timeoutSeconds") else None
        timeout = WATCH_DEFAULT_SECONDS if timeout is None or timeout <= 0 else timeout
        bookmarks = _truthy(params.get("allowWatchBookmarks"))
        given = params.get("resourceVersion", "")
        first: list[Obj] = []
        if given in ("", "0"):
            # No position: the current state as ADDED events, then changes.
            first = [
                {"type": "ADDED", "object": _with_kind(selection.kind, o)}
                for o in cluster.list(selection)
            ]
        else:
            try:
                since = int(given)
            except ValueError as exc:
                raise bad_request(
                    f"resourceVersion {given!r} is not one this API gave out; "
                    "leave it out or use one from a list or an event"
                ) from exc
            if since < cluster.compacted:
                message = f"too old resource version: {since} ({cluster.compacted})"
                expired = status_object(410, "Expired", message)

                async def gone() -> AsyncIterator[bytes]:
                    yield _line({"type": "ERROR", "object": expired})

                return StreamingResponse(gone(), media_type="application/json")
            for event in cluster.history:
                if event.rv > since and event.kind is selection.kind:
                    translated = self._translate(selection, event)
                    if translated:
                        first.append(translated)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        cluster.watchers.add(queue)  # no await since the snapshot: nothing is missed
        bookmark_rv = cluster.rv
        kind = selection.kind

        async def events() -> AsyncIterator[bytes]:
            nonlocal bookmark_rv
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                for event in first:
                    yield _line(event)
                while (remaining := deadline - loop.time()) > 0:
                    wait = min(remaining, self.bookmark_seconds) if bookmarks else remaining
                    try:
                        change = await asyncio.wait_for(queue.get(), wait)
                    except TimeoutError:
                        if bookmarks and cluster.rv != bookmark_rv and loop.time() < deadline:
                            bookmark_rv = cluster.rv
                            yield _line(
                                {
                                    "type": "BOOKMARK",
                                    "object": {
                                        "kind": kind.kind,
                                        "apiVersion": kind.api_version,
                                        "metadata": {"resourceVersion": str(bookmark_rv)},
                                    },
                                }
                            )
                        continue
                    if change is None:
                        return
                    if change.kind is kind:
                        translated = self._translate(selection, change)
                        if translated:
                            yield _line(translated)
            finally:
                cluster.watchers.discard(queue)

        return StreamingResponse(events(), media_type="application/json")

    @staticmethod
    def _translate(selection: Selection, event: Event) -> Obj | None:
        """The event as this watch sees it: an object entering or leaving the
        selection is ADDED or DELETED."""
        now, before = selection.matches(event.obj), selection.matches(event.prev)
        if event.type == "DELETED":
            kind = "DELETED" if now else None
        elif event.type == "ADDED":
            kind = "ADDED" if now else None
        elif now:
            kind = "MODIFIED" if before else "ADDED"
        else:
            kind = "DELETED" if before else None
        if kind is None:
            return None
        return {"type": kind, "object": _with_kind(event.kind, event.obj)}


# --- the test fixture ------------------------------------------------------------------


class FakeKubeAPI:
    """The fake Kubernetes API on a free loopback port, served from a
    background thread with its own event loop; for a ``with`` block.

    ``namespaces``: the namespaces that exist ("default" and "kube-system"
    always do; creating in any other is 404 ``namespaces "x" not found``);
    None (the default) makes every namespace exist, made on first use.
    ``history``: how many changes a watch can resume across;
    ``kubelet_delay``: the pause before each simulated controller step;
    ``grace_cap``: the longest a deleted pod lingers; ``bookmark_seconds``:
    how often a watch that allows bookmarks gets one; ``pod_ip``: the podIP
    and hostIP of running pods.

    ``url`` is set once started. The inspection helpers are safe to call from
    any thread (including a test's event loop) while it runs."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        namespaces: Iterable[str] | None = None,
        history: int = 1000,
        kubelet_delay: float = 0.1,
        grace_cap: float = 0.5,
        bookmark_seconds: float = 60.0,
        pod_ip: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.namespaces = None if namespaces is None else list(namespaces)
        self.url = ""
        self._history = history
        self._kubelet_delay = kubelet_delay
        self._grace_cap = grace_cap
        self._pod_ip = pod_ip
        self._bookmark_seconds = bookmark_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cluster: Cluster | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> FakeKubeAPI:
        """Serve on 127.0.0.1 on a free port; return once it answers."""
        if self._thread is not None:
            raise RuntimeError("the fake Kubernetes API is already running")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._cluster = Cluster(
                self.namespaces,
                history=self._history,
                kubelet_delay=self._kubelet_delay,
                grace_cap=self._grace_cap,
                pod_ip=self._pod_ip,
            )
            api = KubeAPI(self._cluster, self.token, self._bookmark_seconds)
            config = uvicorn.Config(
                api.app(),
                log_level="warning",
                lifespan="off",
                ws="none",
                timeout_graceful_shutdown=2,
            )
            self._server = uvicorn.Server(config)
            starting = asyncio.create_task(self._server.serve(sockets=[listener]))
            # uvicorn says it listens only through this flag.
            while not self._server.started and not starting.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            ready.set()
            await starting

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
            finally:
                listener.close()
                ready.set()

        self._thread = threading.Thread(target=run, name="fake-kube-api", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure or not (self._server and self._server.started):
            self.stop()
            raise RuntimeError(f"the fake Kubernetes API did not start: {failure or 'timeout'}")
        return self

    def stop(self) -> None:
        """End every watch, stop serving and join the thread."""
        if self._loop is not None and self._server is not None and self._cluster is not None:
            cluster, server = self._cluster, self._server

            def halt() -> None:
                cluster.shutdown()
                server.should_exit = True

            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(halt)
        if self._thread is not None:
            self._thread.join(15)
        self._thread = self._loop = self._server = None

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (plain http, the bearer token,
        the given namespace) and return its path."""
        if not self.url:
            raise RuntimeError("start the fake Kubernetes API before writing its kubeconfig")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stockade-fake", "cluster": {"server": self.url}}],
            "users": [{"name": "stockade-fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "stockade-fake",
                    "context": {
                        "cluster": "stockade-fake",
                        "user": "stockade-fake",
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": "stockade-fake",
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # --- inspection (run on the server's loop, so never racing a request) -------------

    def _call(self, work: Callable[[Cluster], T]) -> T:
        loop, cluster = self._loop, self._cluster
        if loop is None or cluster is None:
            raise RuntimeError("the fake Kubernetes API is not running")

        async def run() -> T:
            return work(cluster)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(10)

    def objects(self, kind: str, namespace: str | None = None) -> list[Obj]:
        """Stored objects of a kind ("Pod" or "pods"), in one namespace or all,
        as the API would answer a GET (with kind and apiVersion)."""
        found = kind_named(kind)

        def work(cluster: Cluster) -> list[Obj]:
            selection = Selection(found, namespace, [], [])
            return [_with_kind(found, o) for o in cluster.list(selection)]

        return self._call(work)

    def set_pod_phase(
        self,
        namespace: str,
        name: str,
        phase: str,
        reason: str | None = None,
        message: str | None = None,
    ) -> Obj:
        """Set a pod's status.phase (and reason, message), as the kubelet
        would: Succeeded/Failed also terminate its containers and make it
        unready. Stops the simulated kubelet for that pod; a MODIFIED event."""
        if phase not in ("Pending", "Running", "Succeeded", "Failed", "Unknown"):
            raise ValueError(
                f"{phase!r} is not a pod phase: Pending, Running, Succeeded, Failed or Unknown"
            )
        return self._call(
            lambda c: _with_kind(POD, c.set_pod_phase(namespace, name, phase, reason, message))
        )

    def expire_watches(self, *, close: bool = False) -> None:
        """Make every resourceVersion handed out so far too old: the next watch
        from one gets the 410 Expired ERROR event. With ``close``, also end the
        open watch streams (as an API server restart does) so clients resume
        now."""
        self._call(lambda c: c.expire(close))

    def close_watches(self) -> None:
        """End the open watch streams cleanly (clients see the end of the stream)."""
        self._call(lambda c: c.close_watches())

    def resource_version(self) -> str:
        """The current global resourceVersion."""
        return self._call(lambda c: str(c.rv))

    def requests(self) -> list[LoggedRequest]:
        """Every request so far, oldest first: each is the text ``METHOD
        /path?query`` with attributes method, path, query, watch, status and
        body (see LoggedRequest)."""
        return self._call(lambda c: list(c.log))


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Kubernetes API server for tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        help="a namespace that exists (repeat); without it, every namespace does",
    )
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for it here")
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", args.port))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    fake = FakeKubeAPI(token=args.token, namespaces=args.namespaces)
    fake.url = url
    if args.kubeconfig:
        fake.kubeconfig(args.kubeconfig)

    async def serve() -> None:
        cluster = Cluster(
            fake.namespaces, history=1000, kubelet_delay=0.1, grace_cap=0.5, pod_ip="127.0.0.1"
        )
        api = KubeAPI(cluster, args.token, 60.0)
        config = uvicorn.Config(
            api.app(), log_level="warning", lifespan="off", ws="none", timeout_graceful_shutdown=2
        )
        server = uvicorn.Server(config)
        print(f"listening on {url}", flush=True)
        try:
            await server.serve(sockets=[listener])
        finally:
            cluster.shutdown()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
