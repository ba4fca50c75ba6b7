"""The kubernetes backend: a Pod per workspace, its home a PersistentVolumeClaim.

The objects are built by :mod:`stockade.provisioner.kubernetes.manifests`
(agent Secret, home PVC, Pod, optional NetworkPolicy) and applied with
kubernetes-asyncio in the workspaces' namespace, found by name and labelled
with the deployment and the workspace, so that every call is idempotent:

* ``start`` writes the Secret (the new agent token), makes the PVC when
  missing, adopts a Pod with the same config hash and agent token
  (annotations) or replaces it, writes or removes the NetworkPolicy, and
  returns once the Pod runs. An image that cannot be pulled fails the build
  with the kubelet's message.
* ``stop`` deletes the Pod (its grace period lets the agent report that it
  shuts down), the Secret and the NetworkPolicy; the PVC stays.
* ``delete`` deletes everything, the PVC included.
* ``status`` answers from one watch of the namespace's Pods shared by every
  workspace (list, then watch from its resourceVersion; relist when the API
  says 410 Gone), never a request per workspace.
* ``reconcile`` lists the deployment's objects of each kind and deletes those
  whose workspace is gone.

The agent connects out to the control plane as on every backend: the Pod
needs no Service. Where the cluster's API is: ``--kubernetes-config`` (a
kubeconfig), else the in-cluster service account when running in a Pod, else
``~/.kube/config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from stockade.provisioner.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ComputeStatus,
    Orphan,
    Progress,
    WorkspaceSpec,
)
from stockade.provisioner.kubernetes.manifests import (
    ClusterOptions,
    label_value,
    names,
    workspace_objects,
)

log = logging.getLogger("stockade.provisioner.kubernetes")
START_TIMEOUT_SECONDS = 300.0
GONE_TIMEOUT_SECONDS = 120.0
WATCH_SECONDS = 240  # a watch request's server-side timeout; then it resumes
_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_START_FAILURES = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")


def _api_error(exc: ApiException, doing: str) -> BackendError:
    reason = exc.reason or ""
    return BackendError(
        f"the Kubernetes API refused to {doing}: {exc.status} {reason}".strip(),
        reason="kubernetes_forbidden" if exc.status in (401, 403) else "kubernetes_error",
        log_message=f"{doing}: {exc.status} {reason} {exc.body!r}",
    )


class PodWatcher:
    """One watch of the deployment's Pods in a namespace; a cache by name."""

    def __init__(self, core: client.CoreV1Api, namespace: str, selector: str) -> None:
        self.core = core
        self.namespace = namespace
        self.selector = selector
        self.pods: dict[str, Any] = {}
        self.synced = asyncio.Event()
        self.changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stockade:kubernetes-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        from kubernetes_asyncio import watch

        while True:
            try:
                listed = await self.core.list_namespaced_pod(
                    self.namespace, label_selector=self.selector
                )
                async with self.changed:
                    self.pods = {pod.metadata.name: pod for pod in listed.items}
                    self.changed.notify_all()
                self.synced.set()
                version = listed.metadata.resource_version
                while True:
                    stream = watch.Watch().stream(
                        self.core.list_namespaced_pod,
                        self.namespace,
                        label_selector=self.selector,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                    )
                    async with stream:
                        async for event in stream:
                            pod = event["object"]
                            version = pod.metadata.resource_version
                            async with self.changed:
                                if event["type"] == "DELETED":
                                    self.pods.pop(pod.metadata.name, None)
                                else:
                                    self.pods[pod.metadata.name] = pod
                                self.changed.notify_all()
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                # 410 Gone: the resourceVersion is too old; list again.
                if exc.status != 410:
                    log.warning("pod watch failed (%s %s); retrying", exc.status, exc.reason)
                    await asyncio.sleep(2.0)
            except Exception as exc:  # the API went away: list again after a pause
                self.synced.clear()
                log.warning("pod watch failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(2.0)

    async def wait(self, check: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``check()`` (which reads :attr:`pods`) returns something
        truthy, after each change the watch sees; it may raise to stop."""
        async with asyncio.timeout(timeout):
            await self.synced.wait()
            async with self.changed:
                while True:
                    result = check()
                    if result:
                        return result
                    await self.changed.wait()


class KubernetesBackend(Backend):
    """Pods, PVCs and Secrets through the Kubernetes API; see the module docstring."""

    name: ClassVar[str] = "kubernetes"

    def __init__(self, options: BackendOptions, *, deployment_id: str) -> None:
        self.options = options
        self.deployment_id = deployment_id
        self.cluster = ClusterOptions(
            namespace=options.kubernetes_namespace,
            control_plane_cidrs=options.kubernetes_control_plane_cidrs,
        )
        self.selector = (
            "app.kubernetes.io/managed-by=stockade,"
            f"stockade.deployment={label_value(deployment_id)}"
        )
        self._api: client.ApiClient | None = None
        self._watcher: PodWatcher | None = None
        self._lock = asyncio.Lock()

    # --- the client -----------------------------------------------------------------

    async def _client(self) -> client.ApiClient:
        async with self._lock:
            if self._api is None:
                configuration = client.Configuration()
                try:
                    if self.options.kubernetes_config:
                        await config.load_kube_config(
                            config_file=self.options.kubernetes_config,
                            client_configuration=configuration,
                            persist_config=False,
                        )
                    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                        config.load_incluster_config(  # type: ignore[no-untyped-call]
                            client_configuration=configuration
                        )
                    else:
                        await config.load_kube_config(
                            client_configuration=configuration, persist_config=False
                        )
                except (config.ConfigException, OSError, ValueError) as exc:
                    raise BackendError(
                        "no usable Kubernetes configuration: set the server's (or "
                        f"provisionerd's) --kubernetes-config to a kubeconfig ({exc})",
                        reason="kubernetes_config",
                    ) from exc
                self._api = client.ApiClient(configuration)
        return self._api

    async def _watch(self) -> PodWatcher:
        api = await self._client()
        if self._watcher is None:
            self._watcher = PodWatcher(client.CoreV1Api(api), self.cluster.namespace, self.selector)
        self._watcher.start()
        return self._watcher

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        if self._api is not None:
            await self._api.close()

    # --- the contract -----------------------------------------------------------------

    async def start(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        api = await self._client()
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        ns = self.cluster.namespace
        objects = {obj["kind"]: obj for obj in workspace_objects(spec, self.cluster)}
        await progress.stage("Writing the agent secret and home volume")
        await self._upsert(
            objects["Secret"],
            read=core.read_namespaced_secret,
            create=core.create_namespaced_secret,
            replace=core.replace_namespaced_secret,
        )
        await self._create_missing(
            objects["PersistentVolumeClaim"],
            create=core.create_namespaced_persistent_volume_claim,
        )
        await progress.stage("Starting the pod")
        pod_body = objects["Pod"]
        pod_name = pod_body["metadata"]["name"]
        watcher = await self._watch()
        existing = await self._read(core.read_namespaced_pod, pod_name)
        wanted = pod_body["metadata"]["annotations"]
        adopt = (
            existing is not None
            and existing.metadata.deletion_timestamp is None
            and (existing.status.phase if existing.status else None) in ("Pending", "Running")
            and (existing.metadata.annotations or {}).get("stockade.io/config-hash")
            == wanted["stockade.io/config-hash"]
            and (existing.metadata.annotations or {}).get("stockade.io/agent")
            == wanted["stockade.io/agent"]
        )
        if adopt:
            await progress.log(f"pod {pod_name} already runs this configuration: adopted")
        else:
            if existing is not None:
                await progress.log(f"replacing pod {pod_name}")
                await self._delete(core.delete_namespaced_pod, pod_name)
                await self._gone(watcher, pod_name)
            try:
                # The client takes the JSON body as it is (typed as its model).
                await core.create_namespaced_pod(ns, pod_body)  # type: ignore[arg-type]
            except ApiException as exc:
                raise _api_error(exc, f"create pod {pod_name}") from exc
        policy = objects.get("NetworkPolicy")
        policy_name = names(spec.workspace_id)["policy"]
        if policy is not None:
            await self._upsert(
                policy,
                read=net.read_namespaced_network_policy,
                create=net.create_namespaced_network_policy,
                replace=net.replace_namespaced_network_policy,
            )
        else:
            await self._delete(net.delete_namespaced_network_policy, policy_name)
        await progress.stage("Waiting for the pod to run")
        pod = await self._running(watcher, pod_name)
        await progress.log(
            f"pod {pod_name} runs on node {pod.spec.node_name or '?'} in namespace {ns}"
        )
        return {"kubernetes": {"namespace": ns, "pod": pod_name, "uid": pod.metadata.uid}}

    async def stop(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        await self._remove(spec, progress, keep_home=True)
        return {"kubernetes": {"namespace": self.cluster.namespace}}

    async def delete(self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress) -> None:
        await self._remove(spec, progress, keep_home=False)

    async def status(self, workspace_id: str, state: dict[str, Any]) -> ComputeStatus:
        watcher = await self._watch()
        try:
            async with asyncio.timeout(10):
                await watcher.synced.wait()
        except TimeoutError:
            raise BackendError(
                "the Kubernetes API does not answer", reason="kubernetes_unreachable"
            ) from None
        pod = watcher.pods.get(names(workspace_id)["pod"])
        if pod is None:
            return ComputeStatus("missing")
        phase = pod.status.phase if pod.status else None
        if phase in ("Running", "Pending") and pod.metadata.deletion_timestamp is None:
            return ComputeStatus("running")
        return ComputeStatus("stopped", f"pod phase {phase}")

    async def reconcile(self, live: set[str]) -> list[Orphan]:
        api = await self._client()
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        ns = self.cluster.namespace
        kinds: list[tuple[str, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]]] = [
            ("pod", core.list_namespaced_pod, core.delete_namespaced_pod),
            ("secret", core.list_namespaced_secret, core.delete_namespaced_secret),
            (
                "persistentvolumeclaim",
                core.list_namespaced_persistent_volume_claim,
                core.delete_namespaced_persistent_volume_claim,
            ),
            (
                "networkpolicy",
                net.list_namespaced_network_policy,
                net.delete_namespaced_network_policy,
            ),
        ]
        removed: list[Orphan] = []
        now = datetime.now(UTC)
        for kind, lister, deleter in kinds:
            try:
                listed = await lister(ns, label_selector=self.selector)
            except ApiException as exc:
                raise _api_error(exc, f"list {kind}s") from exc
            for item in listed.items:
                workspace_id = (item.metadata.labels or {}).get("stockade.workspace_id", "")
                if workspace_id in live:
                    continue
                created = item.metadata.creation_timestamp
                if created is not None and (now - created).total_seconds() < (
                    self.reconcile_grace_seconds
                ):
                    continue
                await self._delete(deleter, item.metadata.name)
                removed.append(Orphan(kind, item.metadata.name, workspace_id))
        return removed

    # --- helpers ----------------------------------------------------------------------

    async def _remove(self, spec: WorkspaceSpec, progress: Progress, *, keep_home: bool) -> None:
        api = await self._client()
        core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
        workspace = names(spec.workspace_id)
        await progress.stage("Stopping the pod" if keep_home else "Deleting the workspace")
        watcher = await self._watch()
        await self._delete(core.delete_namespaced_pod, workspace["pod"])
        await self._gone(watcher, workspace["pod"])
        await self._delete(net.delete_namespaced_network_policy, workspace["policy"])
        await self._delete(core.delete_namespaced_secret, workspace["secret"])
        if not keep_home:
            await self._delete(core.delete_namespaced_persistent_volume_claim, workspace["home"])
            await progress.log(f"deleted the home volume claim {workspace['home']}")

    async def _read(self, reader: Callable[..., Awaitable[Any]], name: str) -> Any:
        try:
            return await reader(name, self.cluster.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read {name}") from exc

    async def _delete(self, deleter: Callable[..., Awaitable[Any]], name: str) -> None:
        try:
            await deleter(name, self.cluster.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"delete {name}") from exc

    async def _create_missing(self, body: dict[str, Any], *, create: Callable[..., Any]) -> None:
        try:
            await create(self.cluster.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise _api_error(exc, f"create {body['metadata']['name']}") from exc

    async def _upsert(
        self,
        body: dict[str, Any],
        *,
        read: Callable[..., Awaitable[Any]],
        create: Callable[..., Awaitable[Any]],
        replace: Callable[..., Awaitable[Any]],
    ) -> None:
        """Create, or replace what is there (with its resourceVersion, retried
        once when someone else wrote it in between)."""
        name = body["metadata"]["name"]
        for _attempt in range(3):
            try:
                await create(self.cluster.namespace, body)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise _api_error(exc, f"create {name}") from exc
            current = await self._read(read, name)
            if current is None:
                continue
            replacement = {
                **body,
                "metadata": {
                    **body["metadata"],
                    "resourceVersion": current.metadata.resource_version,
                },
            }
            try:
                await replace(name, self.cluster.namespace, replacement)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise _api_error(exc, f"replace {name}") from exc
        raise BackendError(
            f"{name} kept changing while Stockade wrote it; retry the build",
            reason="kubernetes_conflict",
        )

    async def _gone(self, watcher: PodWatcher, name: str) -> None:
        try:
            await watcher.wait(lambda: name not in watcher.pods, GONE_TIMEOUT_SECONDS)
        except TimeoutError:
            raise BackendError(
                f"pod {name} was still terminating after {GONE_TIMEOUT_SECONDS:.0f} s",
                reason="kubernetes_slow",
            ) from None

    async def _running(self, watcher: PodWatcher, name: str) -> Any:
        started = time.monotonic()

        def check() -> Any:
            pod = watcher.pods.get(name)
            if pod is None or pod.status is None:
                return None
            for container in pod.status.container_statuses or []:
                waiting = container.state.waiting if container.state else None
                if waiting is not None and waiting.reason in _PULL_FAILURES:
                    raise BackendError(
                        f"the image {pod.spec.containers[0].image} cannot be pulled "
                        f"({waiting.reason}: {waiting.message or 'no message'}); push it to "
                        "the registry the cluster pulls from, or name one it has",
                        reason="image_missing",
                    )
                if waiting is not None and waiting.reason in _START_FAILURES:
                    raise BackendError(
                        f"the workspace container cannot start ({waiting.reason}: "
                        f"{waiting.message or 'no message'})",
                        reason="container_failed",
                    )
            if pod.status.phase == "Running":
                return pod
            if pod.status.phase in ("Failed", "Succeeded"):
                raise BackendError(
                    f"the pod ended ({pod.status.phase}: {pod.status.reason or 'no reason'})",
                    reason="container_failed",
                )
            return None

        try:
            return await watcher.wait(check, START_TIMEOUT_SECONDS)
        except TimeoutError:
            raise BackendError(
                f"pod {name} was not running after {time.monotonic() - started:.0f} s "
                "(unschedulable? see `kubectl describe pod`)",
                reason="kubernetes_slow",
            ) from None
