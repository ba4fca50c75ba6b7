"""The kubernetes backend's client code against a test server that answers
like the Kubernetes API (``stockade.devtools.kubeapi``: its JSON, status
codes, watch streams, 404, 409 and resourceVersion expiry): no API server
can run on these machines. The lifecycle test runs against a real cluster
instead when ``KUBECONFIG`` points at one (never skipped)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.devtools.kubeapi import FakeKubeAPI
from stockade.provisioner.backends.base import BackendError, BackendOptions, WorkspaceSpec
from stockade.provisioner.backends.kubernetes import KubernetesBackend
from tests.provisioner.conftest import RecordedProgress, SpecFactory, with_compute

NAMESPACE = "stockade-workspaces"


@pytest.fixture
def kubeapi() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def spec(make_spec: SpecFactory) -> WorkspaceSpec:
    made = with_compute(make_spec(backend="kubernetes"), image="registry.internal/ws:1")
    return dataclasses.replace(made, agent_token="first-token-" + "a" * 30)


@pytest.fixture
async def backend(
    kubeapi: FakeKubeAPI, spec: WorkspaceSpec, tmp_path: Path
) -> AsyncIterator[KubernetesBackend]:
    options = BackendOptions(
        workspaces_dir=tmp_path / "workspaces",
        kubernetes_config=str(kubeapi.kubeconfig(tmp_path / "kubeconfig")),
        kubernetes_namespace=NAMESPACE,
    )
    made = KubernetesBackend(options, deployment_id=spec.deployment_id)
    made.reconcile_grace_seconds = 0
    yield made
    await made.close()


def named(kubeapi: FakeKubeAPI, kind: str) -> dict[str, Any]:
    return {o["metadata"]["name"]: o for o in kubeapi.objects(kind, NAMESPACE)}


async def test_start_stop_start_delete(
    backend: KubernetesBackend,
    kubeapi: FakeKubeAPI,
    spec: WorkspaceSpec,
    progress: RecordedProgress,
) -> None:
    state = await backend.start(spec, {}, progress)
    pod_name = f"stockade-ws-{spec.workspace_id}"
    assert state["kubernetes"]["pod"] == pod_name
    pods = named(kubeapi, "pods")
    assert pods[pod_name]["status"]["phase"] == "Running"
    secret = named(kubeapi, "secrets")[f"stockade-agent-{spec.workspace_id}"]
    assert base64.b64decode(secret["data"]["token"]).decode() == spec.agent_token
    assert f"stockade-home-{spec.workspace_id}" in named(kubeapi, "persistentvolumeclaims")
    assert (await backend.status(spec.workspace_id, state)).state == "running"
    first_uid = pods[pod_name]["metadata"]["uid"]

    # The same build again (a retry): the running Pod is adopted.
    state = await backend.start(spec, state, progress)
    assert named(kubeapi, "pods")[pod_name]["metadata"]["uid"] == first_uid
    assert any("adopted" in line for _, line in progress.lines)

    # A new start build brings a new token: the Pod is replaced.
    renewed = dataclasses.replace(spec, agent_token="second-token-" + "b" * 30)
    state = await backend.start(renewed, state, progress)
    assert named(kubeapi, "pods")[pod_name]["metadata"]["uid"] != first_uid

    state = await backend.stop(renewed, state, progress)
    assert pod_name not in named(kubeapi, "pods")
    assert f"stockade-agent-{spec.workspace_id}" not in named(kubeapi, "secrets")
    assert f"stockade-home-{spec.workspace_id}" in named(kubeapi, "persistentvolumeclaims")
    assert (await backend.status(spec.workspace_id, state)).state == "missing"

    await backend.start(renewed, state, progress)
    await backend.delete(renewed, state, progress)
    for kind in ("pods", "secrets", "persistentvolumeclaims"):
        assert not [name for name in named(kubeapi, kind) if spec.workspace_id in name], kind


async def test_an_image_that_cannot_be_pulled_fails_the_build_with_the_kubelets_words(
    backend: KubernetesBackend, spec: WorkspaceSpec, progress: RecordedProgress
) -> None:
    missing = with_compute(spec, image="missing/ws:1")
    with pytest.raises(BackendError) as failed:
        await backend.start(missing, {}, progress)
    assert failed.value.reason == "image_missing"
    assert "missing/ws:1" in failed.value.message


async def test_status_follows_one_watch_across_an_expired_resource_version(
    backend: KubernetesBackend,
    kubeapi: FakeKubeAPI,
    spec: WorkspaceSpec,
    progress: RecordedProgress,
) -> None:
    state = await backend.start(spec, {}, progress)
    kubeapi.expire_watches()
    kubeapi.set_pod_phase(NAMESPACE, f"stockade-ws-{spec.workspace_id}", "Failed", "Evicted")
    deadline = asyncio.get_running_loop().time() + 15
    while (await backend.status(spec.workspace_id, state)).state != "stopped":
        assert asyncio.get_running_loop().time() < deadline, "the watch never saw the change"
        await asyncio.sleep(0.05)
    status = await backend.status(spec.workspace_id, state)
    assert "Failed" in status.detail
    # One watch for the namespace, not a request per workspace per status.
    watches = [r for r in kubeapi.requests() if "watch" in r]
    reads = [r for r in kubeapi.requests() if r.startswith("GET") and spec.workspace_id in r]
    assert watches
    assert len(reads) <= 3, reads


async def test_reconcile_removes_what_a_gone_workspace_left(
    backend: KubernetesBackend,
    kubeapi: FakeKubeAPI,
    spec: WorkspaceSpec,
    progress: RecordedProgress,
) -> None:
    await backend.start(spec, {}, progress)
    assert await backend.reconcile({spec.workspace_id}) == []
    removed = await backend.reconcile(set())
    assert {o.kind for o in removed} == {"pod", "secret", "persistentvolumeclaim"}
    assert all(o.workspace_id == spec.workspace_id for o in removed)


async def test_the_whole_lifecycle_on_a_cluster_or_the_test_api(
    make_spec: SpecFactory, kubeapi: FakeKubeAPI, tmp_path: Path
) -> None:
    """Never skipped: with ``KUBECONFIG`` set it runs against that cluster
    (the image from STOCKADE_TEST_K8S_IMAGE, the namespace from
    STOCKADE_TEST_K8S_NAMESPACE), otherwise against the test API, through the
    same steps: a workspace starts, runs, and is deleted with nothing left."""
    live = os.environ.get("KUBECONFIG")
    image = os.environ.get("STOCKADE_TEST_K8S_IMAGE", "stockade-base:bookworm")
    spec = with_compute(make_spec(backend="kubernetes"), image=image)
    options = BackendOptions(
        workspaces_dir=tmp_path,
        kubernetes_config=live or str(kubeapi.kubeconfig(tmp_path / "kubeconfig")),
        kubernetes_namespace=os.environ.get("STOCKADE_TEST_K8S_NAMESPACE", NAMESPACE),
    )
    backend = KubernetesBackend(options, deployment_id=spec.deployment_id)
    progress = RecordedProgress()
    try:
        state = await backend.start(spec, {}, progress)
        assert (await backend.status(spec.workspace_id, state)).state == "running"
        await backend.delete(spec, state, progress)
        assert (await backend.status(spec.workspace_id, {})).state == "missing"
        backend.reconcile_grace_seconds = 0
        assert await backend.reconcile(set()) == []
    finally:
        await backend.close()
