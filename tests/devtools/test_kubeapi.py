"""The fake Kubernetes API, driven by the real kubernetes_asyncio client: the
answers, errors and watch events a workspace backend relies on."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from stockade.devtools.kubeapi import FakeKubeAPI

NS = "ws"


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI(namespaces=[NS]) as fake:
        yield fake


async def _api_client(kubeconfig: Path) -> client.ApiClient:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture
async def api(kube: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    api_client = await _api_client(kube.kubeconfig(tmp_path / "kubeconfig", namespace=NS))
    yield api_client
    await api_client.close()


def core(api_client: client.ApiClient) -> Any:
    """The core API, typed loosely: the client takes plain dicts as bodies,
    which its annotations (models only) do not say."""
    return client.CoreV1Api(api_client)


def networking(api_client: client.ApiClient) -> Any:
    return client.NetworkingV1Api(api_client)


def pod(name: str, image: str = "python:3.12", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": image}]},
    }


def body_of(exc: ApiException) -> dict[str, Any]:
    assert isinstance(exc.body, str), exc.body
    decoded: dict[str, Any] = json.loads(exc.body)
    return decoded


async def wait_for(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def collect(
    stream: watch.Watch, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Events from a watch until ``until`` holds (or the stream ends)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout), stream:
        async for event in stream:
            events.append(event)
            if until(events):
                break
    return events


# --- basic verbs ----------------------------------------------------------------------


async def test_kubeconfig_points_at_the_fake_with_its_token(
    kube: FakeKubeAPI, tmp_path: Path
) -> None:
    path = kube.kubeconfig(tmp_path / "kc")
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == kube.url
    assert configuration.host.startswith("http://127.0.0.1:")
    assert configuration.api_key["BearerToken"] == f"Bearer {kube.token}"
    assert "namespace: default" in path.read_text()


async def test_pod_create_get_list_replace_delete(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    created = await v1.create_namespaced_pod(NS, pod("p1", app="a", tier="web"))
    meta = created.metadata
    assert meta.uid and meta.resource_version and meta.creation_timestamp
    assert meta.namespace == NS
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"  # defaulted like the real API
    await v1.create_namespaced_pod(NS, pod("p2", app="a"))
    await v1.create_namespaced_pod(NS, pod("p3", app="b", tier="web"))
    await v1.create_namespaced_pod("default", pod("elsewhere", app="a"))

    read = await v1.read_namespaced_pod("p1", NS)
    assert read.metadata.uid == meta.uid

    async def names(selector: str = "") -> list[str]:
        listed = await v1.list_namespaced_pod(NS, label_selector=selector)
        # The list's resourceVersion is the store's at that moment.
        assert int(listed.metadata.resource_version) <= int(kube.resource_version())
        assert int(listed.metadata.resource_version) >= int(meta.resource_version)
        return [p.metadata.name for p in listed.items]

    assert await names() == ["p1", "p2", "p3"]
    assert await names("app=a") == ["p1", "p2"]
    assert await names("app!=a") == ["p3"]
    assert await names("tier") == ["p1", "p3"]
    assert await names("app=a,tier") == ["p1"]
    assert await names("!tier") == ["p2"]
    assert await names("app in (b, c)") == ["p3"]
    assert await names("app notin (a)") == ["p3"]
    every = await v1.list_pod_for_all_namespaces(label_selector="app=a")
    assert sorted(p.metadata.name for p in every.items) == ["elsewhere", "p1", "p2"]

    # A replace with the current resourceVersion; then one with the old one.
    current = await v1.read_namespaced_pod("p1", NS)
    current.metadata.labels["tier"] = "db"
    replaced = await v1.replace_namespaced_pod("p1", NS, current)
    assert replaced.metadata.labels["tier"] == "db"
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)
    with pytest.raises(ApiException) as stale:
        await v1.replace_namespaced_pod("p1", NS, current)
    assert stale.value.status == 409
    assert body_of(stale.value)["reason"] == "Conflict"
    assert "the object has been modified" in body_of(stale.value)["message"]

    # The same object again writes nothing: the resourceVersion stays.
    again = await v1.replace_namespaced_pod("p1", NS, replaced)
    assert again.metadata.resource_version == replaced.metadata.resource_version

    # A pod's spec cannot change but for its images.
    changed = await v1.read_namespaced_pod("p1", NS)
    changed.spec.containers[0].command = ["sleep", "1"]
    with pytest.raises(ApiException) as forbidden:
        await v1.replace_namespaced_pod("p1", NS, changed)
    assert forbidden.value.status == 422
    assert body_of(forbidden.value)["reason"] == "Invalid"
    assert "pod updates may not change fields" in body_of(forbidden.value)["message"]

    deleted = await v1.delete_namespaced_pod("p2", NS)
    assert isinstance(deleted, client.V1Pod)
    assert deleted.metadata.deletion_timestamp is not None
    assert "p2" in [p["metadata"]["name"] for p in kube.objects("Pod", NS)]
    with pytest.raises(ApiException) as terminating:
        await v1.create_namespaced_pod(NS, pod("p2"))
    assert body_of(terminating.value)["reason"] == "AlreadyExists"
    assert body_of(terminating.value)["message"].startswith("object is being deleted: ")
    await wait_for(lambda: "p2" not in [p["metadata"]["name"] for p in kube.objects("pods", NS)])
    with pytest.raises(ApiException) as gone:
        await v1.read_namespaced_pod("p2", NS)
    assert gone.value.status == 404


async def test_errors_are_status_objects(api: client.ApiClient) -> None:
    v1 = core(api)
    with pytest.raises(ApiException) as missing:
        await v1.read_namespaced_pod("x", NS)
    exc = missing.value
    assert type(exc) is ApiException  # not the NotFoundException subclass
    assert (exc.status, exc.reason) == (404, "Not Found")
    assert body_of(exc) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "x" not found',
        "reason": "NotFound",
        "details": {"name": "x", "kind": "pods"},
        "code": 404,
    }

    await v1.create_namespaced_pod(NS, pod("dup"))
    with pytest.raises(ApiException) as exists:
        await v1.create_namespaced_pod(NS, pod("dup"))
    assert (exists.value.status, exists.value.reason) == (409, "Conflict")
    assert body_of(exists.value)["reason"] == "AlreadyExists"
    assert body_of(exists.value)["message"] == 'pods "dup" already exists'
    assert body_of(exists.value)["details"] == {"name": "dup", "kind": "pods"}

    nameless = pod("")
    del nameless["metadata"]["name"]
    with pytest.raises(ApiException) as unnamed:
        await v1.create_namespaced_pod(NS, nameless)
    assert unnamed.value.status == 422
    status = body_of(unnamed.value)
    assert status["reason"] == "Invalid"
    assert "metadata.name: Required value" in status["message"]
    assert status["details"]["causes"][0]["field"] == "metadata.name"

    generated = pod("")
    generated["metadata"] = {"generateName": "gen-"}
    made = await v1.create_namespaced_pod(NS, generated)
    assert made.metadata.name.startswith("gen-") and len(made.metadata.name) == 9

    with pytest.raises(ApiException) as bad_label:
        await v1.create_namespaced_pod(NS, pod("lbl", owner="x" * 64))
    assert bad_label.value.status == 422
    assert "must be no more than 63 characters" in body_of(bad_label.value)["message"]

    no_image = pod("noimage")
    del no_image["spec"]["containers"][0]["image"]
    with pytest.raises(ApiException) as imageless:
        await v1.create_namespaced_pod(NS, no_image)
    assert "spec.containers[0].image: Required value" in body_of(imageless.value)["message"]

    with pytest.raises(ApiException) as no_namespace:
        await v1.create_namespaced_pod("nope", pod("p"))
    assert no_namespace.value.status == 404
    assert body_of(no_namespace.value)["message"] == 'namespaces "nope" not found'

    with pytest.raises(ApiException) as selector:
        await v1.list_namespaced_pod(NS, label_selector="a=b=c")
    assert selector.value.status == 400
    assert body_of(selector.value)["reason"] == "BadRequest"

    with pytest.raises(ApiException) as on_delete:
        await v1.delete_namespaced_secret("never", NS)
    assert on_delete.value.status == 404
    with pytest.raises(ApiException) as on_replace:
        await v1.replace_namespaced_secret("never", NS, {"metadata": {"name": "never"}})
    assert on_replace.value.status == 404


async def test_secret_create_read_list_replace_patch_delete(api: client.ApiClient) -> None:
    v1 = core(api)
    body = {"metadata": {"name": "s1", "labels": {"app": "a"}}, "stringData": {"token": "t0k"}}
    created = await v1.create_namespaced_secret(NS, body)
    assert created.type == "Opaque"
    assert created.data == {"token": base64.b64encode(b"t0k").decode()}
    assert created.string_data is None

    listed = await v1.list_namespaced_secret(NS, label_selector="app=a")
    assert [s.metadata.name for s in listed.items] == ["s1"]

    read = await v1.read_namespaced_secret("s1", NS)
    read.data["more"] = base64.b64encode(b"x").decode()
    replaced = await v1.replace_namespaced_secret("s1", NS, read)
    assert set(replaced.data) == {"token", "more"}

    patched = await v1.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"b": "2"}}})
    assert patched.metadata.labels == {"app": "a", "b": "2"}

    with pytest.raises(ApiException) as bad_base64:
        await v1.create_namespaced_secret(NS, {"metadata": {"name": "s2"}, "data": {"k": "!!"}})
    assert bad_base64.value.status == 400

    deleted = await v1.delete_namespaced_secret("s1", NS)
    assert isinstance(deleted, client.V1Status)
    assert deleted.status == "Success"
    assert deleted.details.name == "s1" and deleted.details.kind == "secrets"
    with pytest.raises(ApiException) as gone:
        await v1.read_namespaced_secret("s1", NS)
    assert body_of(gone.value)["message"] == 'secrets "s1" not found'


async def test_claim_binds_and_is_protected_while_a_pod_mounts_it(
    kube: FakeKubeAPI, api: client.ApiClient
) -> None:
    v1 = core(api)
    claim = {
        "metadata": {"name": "home"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    # A pod that mounts a claim that is not there yet waits, unschedulable.
    user = pod("user")
    user["spec"]["volumes"] = [{"name": "home", "persistentVolumeClaim": {"claimName": "home"}}]
    await v1.create_namespaced_pod(NS, user)
    unschedulable = await wait_for(
        lambda: [
            c
            for p in kube.objects("Pod", NS)
            for c in p["status"].get("conditions", [])
            if c["type"] == "PodScheduled" and c["status"] == "False"
        ]
    )
    assert 'persistentvolumeclaim "home" not found' in unschedulable[0]["message"]

    created = await v1.create_namespaced_persistent_volume_claim(NS, claim)
    assert created.status.phase == "Pending"
    assert created.metadata.finalizers == ["kubernetes.io/pvc-protection"]

    async def phase(kind: str, name: str) -> str:
        if kind == "pvc":
            return str((await v1.read_namespaced_persistent_volume_claim(name, NS)).status.phase)
        return str((await v1.read_namespaced_pod(name, NS)).status.phase)

    async def until(kind: str, name: str, wanted: str) -> None:
        for _ in range(100):
            if await phase(kind, name) == wanted:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{kind} {name} never became {wanted}")

    await until("pvc", "home", "Bound")
    bound = await v1.read_namespaced_persistent_volume_claim("home", NS)
    assert bound.status.capacity == {"storage": "1Gi"}
    assert bound.spec.volume_name
    await until("pod", "user", "Running")

    listed = await v1.list_namespaced_persistent_volume_claim(NS)
    assert [c.metadata.name for c in listed.items] == ["home"]

    # Deleting the claim while the pod mounts it only marks it.
    answer = await v1.delete_namespaced_persistent_volume_claim("home", NS)
    assert isinstance(answer, client.V1PersistentVolumeClaim)
    assert answer.metadata.deletion_timestamp is not None
    await asyncio.sleep(0.3)
    still = await v1.read_namespaced_persistent_volume_claim("home", NS)
    assert still.metadata.deletion_timestamp is not None
    # Once the pod is gone, so is the claim.
    await v1.delete_namespaced_pod("user", NS, grace_period_seconds=0)
    await wait_for(lambda: not kube.objects("PersistentVolumeClaim", NS))


async def test_network_policy_verbs(api: client.ApiClient) -> None:
    net = networking(api)
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np", "labels": {"app": "a"}},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "egress": [{}]},
    }
    created = await net.create_namespaced_network_policy(NS, policy)
    assert created.spec.policy_types == ["Ingress", "Egress"]
    assert created.metadata.uid
    listed = await net.list_namespaced_network_policy(NS, label_selector="app")
    assert [p.metadata.name for p in listed.items] == ["np"]
    created.spec.policy_types = ["Egress"]
    replaced = await net.replace_namespaced_network_policy("np", NS, created)
    assert replaced.spec.policy_types == ["Egress"]
    with pytest.raises(ApiException) as exists:
        await net.create_namespaced_network_policy(NS, policy)
    assert body_of(exists.value)["details"] == {
        "name": "np",
        "group": "networking.k8s.io",
        "kind": "networkpolicies",
    }
    deleted = await net.delete_namespaced_network_policy("np", NS)
    assert deleted.status == "Success"
    with pytest.raises(ApiException) as gone:
        await net.read_namespaced_network_policy("np", NS)
    assert gone.value.status == 404
    assert body_of(gone.value)["message"] == 'networkpolicies.networking.k8s.io "np" not found'


async def test_namespaces_are_fixed(api: client.ApiClient) -> None:
    v1 = core(api)
    listed = await v1.list_namespace()
    assert [n.metadata.name for n in listed.items] == ["default", "kube-system", NS]
    assert (await v1.read_namespace(NS)).status.phase == "Active"
    with pytest.raises(ApiException) as refused:
        await v1.create_namespace({"metadata": {"name": "new"}})
    assert refused.value.status == 405
    with pytest.raises(ApiException) as missing:
        await v1.read_namespace("new")
    assert body_of(missing.value)["message"] == 'namespaces "new" not found'


async def test_every_namespace_exists_unless_a_set_is_given(tmp_path: Path) -> None:
    with FakeKubeAPI() as kube:
        api_client = await _api_client(kube.kubeconfig(tmp_path / "kc"))
        try:
            v1 = core(api_client)
            await v1.create_namespaced_secret("anything", {"metadata": {"name": "s"}})
            assert (await v1.read_namespace("else")).metadata.name == "else"
            listed = [n.metadata.name for n in (await v1.list_namespace()).items]
            assert listed == ["anything", "default", "else", "kube-system"]
            with pytest.raises(ApiException) as bad:
                await v1.create_namespaced_secret("Not_A_Name", {"metadata": {"name": "s"}})
            assert bad.value.status == 404
        finally:
            await api_client.close()


async def test_bearer_token_is_checked(kube: FakeKubeAPI, tmp_path: Path) -> None:
    wrong = FakeKubeAPI(token="not-the-token")
    wrong.url = kube.url
    api_client = await _api_client(wrong.kubeconfig(tmp_path / "wrong"))
    try:
        v1 = core(api_client)
        with pytest.raises(ApiException) as refused:
            await v1.list_namespaced_pod(NS)
        assert refused.value.status == 401
        assert body_of(refused.value)["reason"] == "Unauthorized"
        # A watch is refused too; the Watch reads the Status line and raises.
        stream = watch.Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=2)
        with pytest.raises(ApiException) as watch_refused:
            await collect(stream, lambda events: True)
        assert watch_refused.value.status == 401
        assert watch_refused.value.reason == "Unauthorized: Unauthorized"
    finally:
        await api_client.close()
    assert {r.status for r in kube.requests()} == {401}


# --- watches --------------------------------------------------------------------------


def phase_now(kube: FakeKubeAPI, name: str) -> str | None:
    found = [p for p in kube.objects("Pod", NS) if p["metadata"]["name"] == name]
    return str(found[0]["status"]["phase"]) if found else None


def phase_of(event: dict[str, Any]) -> str:
    return str(event["object"].status.phase)


async def test_watch_sees_a_pod_start_and_go(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    await v1.create_namespaced_pod(NS, pod("other", app="b"))
    listed = await v1.list_namespaced_pod(NS, label_selector="app=a")
    stream = watch.Watch().stream(
        v1.list_namespaced_pod,
        NS,
        label_selector="app=a",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=10,
    )
    await v1.create_namespaced_pod(NS, pod("p", app="a"))

    async def go_when_running() -> None:
        await wait_for(lambda: phase_now(kube, "p") == "Running")
        await v1.delete_namespaced_pod("p", NS)

    deleter = asyncio.create_task(go_when_running())
    events = await collect(stream, lambda e: e[-1]["type"] == "DELETED")
    await deleter
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "p"),
        ("MODIFIED", "p"),  # Running
        ("MODIFIED", "p"),  # deletionTimestamp set: the grace period
        ("DELETED", "p"),
    ]
    added, running, terminating, _ = events
    assert phase_of(added) == "Pending"
    assert phase_of(running) == "Running"
    state = running["object"].status.container_statuses[0].state
    assert state.running is not None and state.running.started_at is not None
    conditions = {c.type: c.status for c in running["object"].status.conditions}
    assert conditions["Ready"] == "True"
    assert running["object"].spec.node_name == "fake-node"
    assert terminating["object"].metadata.deletion_timestamp is not None
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 4
    # The raw JSON is there too, as the API sent it.
    assert added["raw_object"]["kind"] == "Pod"


async def test_watch_with_no_grace_period_and_replay(
    kube: FakeKubeAPI, api: client.ApiClient
) -> None:
    v1 = core(api)
    start = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    await v1.create_namespaced_pod(NS, pod("p", app="a"))
    await wait_for(lambda: kube.objects("Pod", NS)[0]["status"]["phase"] == "Running")
    await v1.delete_namespaced_pod("p", NS, grace_period_seconds=0)
    await wait_for(lambda: not kube.objects("Pod", NS))
    # Every change after the list is replayed from history.
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=start, timeout_seconds=5
    )
    events = await collect(stream, lambda e: e[-1]["type"] == "DELETED")
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert phase_of(events[1]) == "Running"


async def test_watch_without_resource_version_starts_with_the_current_state(
    api: client.ApiClient,
) -> None:
    v1 = core(api)
    await v1.create_namespaced_secret(NS, {"metadata": {"name": "a", "labels": {"k": "1"}}})
    await v1.create_namespaced_secret(NS, {"metadata": {"name": "b", "labels": {"k": "2"}}})
    stream = watch.Watch().stream(v1.list_namespaced_secret, NS, timeout_seconds=5)
    events = await collect(stream, lambda e: len(e) == 2)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


async def test_watch_selector_entry_and_exit(api: client.ApiClient) -> None:
    v1 = core(api)
    listed = await v1.list_namespaced_secret(NS)
    await v1.create_namespaced_secret(NS, {"metadata": {"name": "s", "labels": {"k": "no"}}})
    await v1.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"k": "yes"}}})
    await v1.patch_namespaced_secret("s", NS, {"data": {"x": "eA=="}})
    await v1.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"k": "no"}}})
    stream = watch.Watch().stream(
        v1.list_namespaced_secret,
        NS,
        label_selector="k=yes",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=5,
    )
    events = await collect(stream, lambda e: e[-1]["type"] == "DELETED")
    # Entering the selection is ADDED, leaving it DELETED, as from the watch cache.
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[-1]["object"].metadata.labels == {"k": "no"}


async def test_watch_ends_after_its_timeout(api: client.ApiClient) -> None:
    v1 = core(api)
    started = time.monotonic()
    stream = watch.Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=1)
    events = await collect(stream, lambda e: False, timeout=5)
    assert events == []
    assert 0.9 < time.monotonic() - started < 3


async def test_watch_from_an_expired_resource_version_raises_410(
    kube: FakeKubeAPI, api: client.ApiClient
) -> None:
    v1 = core(api)
    old = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    kube.expire_watches()
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=old, timeout_seconds=5
    )
    with pytest.raises(ApiException) as expired:
        await collect(stream, lambda e: False)
    exc = expired.value
    assert exc.status == 410
    assert isinstance(exc.reason, str)
    assert exc.reason.startswith(f"Expired: too old resource version: {old} (")
    assert exc.body is None and exc.headers is None

    # Without timeout_seconds the Watch reconnects once, then raises.
    before = len([r for r in kube.requests() if r.watch])
    stream = watch.Watch().stream(v1.list_namespaced_pod, NS, resource_version=old)
    with pytest.raises(ApiException) as again:
        await collect(stream, lambda e: False)
    assert again.value.status == 410
    assert len([r for r in kube.requests() if r.watch]) - before == 2

    # A fresh list gives a resourceVersion that works.
    fresh = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=fresh, timeout_seconds=5
    )
    await v1.create_namespaced_pod(NS, pod("after"))
    events = await collect(stream, lambda e: True)
    assert events[0]["type"] == "ADDED"


async def test_history_is_bounded(tmp_path: Path) -> None:
    with FakeKubeAPI(history=3) as kube:
        api_client = await _api_client(kube.kubeconfig(tmp_path / "kc"))
        try:
            v1 = core(api_client)
            first = await v1.create_namespaced_secret(NS, {"metadata": {"name": "s0"}})
            for i in range(1, 5):
                await v1.create_namespaced_secret(NS, {"metadata": {"name": f"s{i}"}})
            stream = watch.Watch().stream(
                v1.list_namespaced_secret,
                NS,
                resource_version=first.metadata.resource_version,
                timeout_seconds=5,
            )
            with pytest.raises(ApiException) as expired:
                await collect(stream, lambda e: False)
            assert expired.value.status == 410
            # The raw line, as the real API sends it: HTTP 200 and one ERROR event.
            raw = await v1.list_namespaced_secret(
                NS,
                watch=True,
                resource_version=first.metadata.resource_version,
                _preload_content=False,
            )
            assert raw.status == 200
            line = json.loads(await raw.content.readline())
            raw.release()
            assert line["type"] == "ERROR"
            assert line["object"]["code"] == 410
            assert line["object"]["reason"] == "Expired"
            assert line["object"]["kind"] == "Status"
        finally:
            await api_client.close()


async def test_expire_watches_can_close_open_streams(
    kube: FakeKubeAPI, api: client.ApiClient
) -> None:
    v1 = core(api)
    version = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=version, timeout_seconds=30
    )
    collecting = asyncio.create_task(collect(stream, lambda e: False, timeout=10))
    await wait_for(lambda: any(r.watch for r in kube.requests()))
    started = time.monotonic()
    kube.expire_watches(close=True)
    assert await collecting == []
    assert time.monotonic() - started < 2
    resumed = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=version, timeout_seconds=5
    )
    with pytest.raises(ApiException) as expired:
        await collect(resumed, lambda e: False)
    assert expired.value.status == 410


# --- the simulated kubelet -------------------------------------------------------------


async def test_missing_image_waits_on_image_pull(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    version = (await v1.list_namespaced_pod(NS)).metadata.resource_version
    stream = watch.Watch().stream(
        v1.list_namespaced_pod, NS, resource_version=version, timeout_seconds=5
    )
    await v1.create_namespaced_pod(NS, pod("bad", image="missing/x"))

    def waiting(event: dict[str, Any]) -> Any:
        statuses = event["object"].status.container_statuses or []
        return statuses[0].state.waiting if statuses else None

    events = await collect(
        stream, lambda e: (w := waiting(e[-1])) is not None and w.reason == "ImagePullBackOff"
    )
    reasons = [w.reason for e in events if (w := waiting(e))]
    assert reasons == ["ErrImagePull", "ImagePullBackOff"]
    assert all(phase_of(e) == "Pending" for e in events)
    pulled = [waiting(e) for e in events if waiting(e)]
    assert 'failed to pull and unpack image "docker.io/missing/x:latest"' in pulled[0].message
    assert pulled[1].message == 'Back-off pulling image "missing/x"'
    await asyncio.sleep(0.3)
    final = await v1.read_namespaced_pod("bad", NS)
    assert final.status.phase == "Pending"
    assert final.status.container_statuses[0].state.waiting.reason == "ImagePullBackOff"
    ready = {c.type: c.status for c in final.status.conditions}
    assert ready["Ready"] == "False"


async def test_set_pod_phase(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    await v1.create_namespaced_pod(NS, pod("p"))
    await wait_for(lambda: kube.objects("Pod", NS)[0]["status"]["phase"] == "Running")
    changed = kube.set_pod_phase(NS, "p", "Failed", reason="Evicted", message="low on memory")
    assert changed["status"]["phase"] == "Failed"
    read = await v1.read_namespaced_pod("p", NS)
    assert (read.status.phase, read.status.reason, read.status.message) == (
        "Failed",
        "Evicted",
        "low on memory",
    )
    assert read.status.container_statuses[0].state.terminated.exit_code == 1
    with pytest.raises(ValueError, match="not a pod phase"):
        kube.set_pod_phase(NS, "p", "Exploded")


async def test_pod_waits_for_a_missing_secret(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    needs = pod("needs")
    needs["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "agent"}}]
    await v1.create_namespaced_pod(NS, needs)

    def waiting_reason() -> str | None:
        statuses = kube.objects("Pod", NS)[0]["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    await wait_for(lambda: waiting_reason() == "CreateContainerConfigError")
    await v1.create_namespaced_secret(NS, {"metadata": {"name": "agent"}})
    await wait_for(lambda: kube.objects("Pod", NS)[0]["status"]["phase"] == "Running")


async def test_requests_are_logged(kube: FakeKubeAPI, api: client.ApiClient) -> None:
    v1 = core(api)
    await v1.create_namespaced_secret(NS, {"metadata": {"name": "s"}})
    with pytest.raises(ApiException):
        await v1.read_namespaced_secret("none", NS)
    log = kube.requests()
    assert [(r.method, r.path, r.status) for r in log] == [
        ("POST", f"/api/v1/namespaces/{NS}/secrets", 201),
        ("GET", f"/api/v1/namespaces/{NS}/secrets/none", 404),
    ]
    assert log[0].body["metadata"] == {"name": "s"}
    # Each entry is also its request line, to match as text.
    assert log[1] == f"GET /api/v1/namespaces/{NS}/secrets/none"
    stream = watch.Watch().stream(v1.list_namespaced_pod, NS, timeout_seconds=1)
    await collect(stream, lambda e: False)
    watched = kube.requests()[-1]
    assert watched.watch and watched.status == 200
    assert watched.startswith(f"GET /api/v1/namespaces/{NS}/pods?")
    assert "watch=True" in watched and watched.query["timeoutSeconds"] == "1"


async def test_runs_as_a_subprocess(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc"
    process = subprocess.Popen(  # noqa: ASYNC220 - it prints one line at once
        [sys.executable, "-m", "stockade.devtools.kubeapi", "--port", "0",
         "--namespace", NS, "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        api_client = await _api_client(kubeconfig)
        try:
            v1 = core(api_client)
            await v1.create_namespaced_pod(NS, pod("p"))
            assert (await v1.read_namespaced_pod("p", NS)).metadata.namespace == NS
        finally:
            await api_client.close()
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


async def test_bookmarks_when_asked(tmp_path: Path) -> None:
    with FakeKubeAPI(bookmark_seconds=0.2) as kube:
        api_client = await _api_client(kube.kubeconfig(tmp_path / "kc"))
        try:
            v1 = core(api_client)
            version = (await v1.list_namespaced_secret(NS)).metadata.resource_version
            stream = watch.Watch().stream(
                v1.list_namespaced_secret,
                NS,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=5,
            )
            # A write the watch does not see moves the resourceVersion on.
            await v1.create_namespaced_pod(NS, pod("elsewhere"))
            events = await collect(stream, lambda e: True)
            assert events[0]["type"] == "BOOKMARK"
            bookmarked = events[0]["raw_object"]["metadata"]["resourceVersion"]
            assert int(bookmarked) > int(version)
            assert stream.resource_version == bookmarked
        finally:
            await api_client.close()


async def test_delete_preconditions_patch_types_and_status(
    kube: FakeKubeAPI, api: client.ApiClient
) -> None:
    v1 = core(api)
    secret = await v1.create_namespaced_secret(NS, {"metadata": {"name": "s"}})
    with pytest.raises(ApiException) as precondition:
        await v1.delete_namespaced_secret("s", NS, body={"preconditions": {"uid": "other"}})
    assert precondition.value.status == 409
    assert (
        "Precondition failed: UID in precondition: other" in body_of(precondition.value)["message"]
    )
    # A list body is a JSON patch, which the fake refuses plainly.
    with pytest.raises(ApiException) as json_patch:
        await v1.patch_namespaced_secret("s", NS, [{"op": "add", "path": "/x", "value": 1}])
    assert json_patch.value.status == 415
    # A patch that names a stale resourceVersion conflicts.
    stale = {"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}}
    with pytest.raises(ApiException) as conflict:
        await v1.patch_namespaced_secret("s", NS, stale)
    assert body_of(conflict.value)["reason"] == "Conflict"
    deleted = await v1.delete_namespaced_secret(
        "s", NS, body={"preconditions": {"uid": secret.metadata.uid}}
    )
    assert deleted.status == "Success"

    # The main resource keeps a pod's status; the status subresource changes it.
    await v1.create_namespaced_pod(NS, pod("p"))
    await wait_for(lambda: phase_now(kube, "p") == "Running")
    current = await v1.read_namespaced_pod("p", NS)
    current.status.phase = "Failed"
    kept = await v1.replace_namespaced_pod("p", NS, current)
    assert kept.status.phase == "Running"
    changed = await v1.patch_namespaced_pod_status("p", NS, {"status": {"phase": "Succeeded"}})
    assert changed.status.phase == "Succeeded"


async def test_raw_http_paths(kube: FakeKubeAPI) -> None:
    headers = {"Authorization": f"Bearer {kube.token}"}
    async with httpx.AsyncClient(base_url=kube.url, headers=headers, trust_env=False) as http:
        assert (await http.get("/api")).json()["versions"] == ["v1"]
        groups = (await http.get("/apis")).json()["groups"]
        assert [g["name"] for g in groups] == ["networking.k8s.io"]
        core_resources = (await http.get("/api/v1")).json()["resources"]
        assert {"pods", "secrets", "persistentvolumeclaims", "namespaces"} <= {
            r["name"] for r in core_resources
        }
        dry = await http.post(
            f"/api/v1/namespaces/{NS}/secrets?dryRun=All", json={"metadata": {"name": "s"}}
        )
        assert dry.status_code == 400
        assert "dryRun" in dry.json()["message"]
        unknown = await http.get(f"/api/v1/namespaces/{NS}/configmaps")
        assert unknown.status_code == 404
        assert unknown.json()["kind"] == "Status"
        # The old watch prefix streams too.
        async with http.stream(
            "GET", f"/api/v1/watch/namespaces/{NS}/secrets?timeoutSeconds=2"
        ) as stream:
            await http.post(f"/api/v1/namespaces/{NS}/secrets", json={"metadata": {"name": "w"}})
            async for line in stream.aiter_lines():
                event = json.loads(line)
                assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "w")
                assert event["object"]["kind"] == "Secret"
                break
