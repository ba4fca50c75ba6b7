"""Templates: push, list, versions, download, activation, archive, and the
archives and manifests a push refuses."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import httpx
import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from stockade.sdk.templates import build_archive
from tests.conftest import UserFactory, unique

MANIFEST = """\
name: {name}
display_name: Demo
description: a test template
backend: local
parameters:
  - name: size
    type: number
    default: 2
    validation: {{min: 1, max: 8}}
"""


def manifest(name: str, extra: str = "") -> str:
    return MANIFEST.format(name=name) + extra


def tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, content in entries:
            if content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def file_entry(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), content


def link_entry(
    name: str, target: str, kind: bytes = tarfile.SYMTYPE
) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def simple_archive(name: str, *extra: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    return tar_gz([file_entry("stockade.yaml", manifest(name).encode()), *extra])


def write_template(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stockade.yaml").write_text(manifest(name))
    (directory / "scripts").mkdir(exist_ok=True)
    (directory / "scripts" / "start.sh").write_text("#!/bin/sh\necho hi\n")
    (directory / "scripts" / "start.sh").chmod(0o755)
    (directory / "link.sh").symlink_to("scripts/start.sh")
    (directory / ".git").mkdir(exist_ok=True)
    (directory / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return directory


def test_push_list_versions_download_round_trip(owner: Client, tmp_path: Path) -> None:
    name = unique("tpl")
    src = write_template(tmp_path / "src", name)
    first = owner.push_template(name, build_archive(src), message="first")
    assert first.number == 1 and first.active and first.template_name == name
    assert first.manifest["parameters"][0]["name"] == "size"

    (src / "scripts" / "start.sh").write_text("#!/bin/sh\necho v2\n")
    second = owner.push_template(name, build_archive(src), message="second")
    assert second.number == 2 and second.active

    template = owner.get_template(name)
    assert template.active_version == 2 and template.backend == "local"
    assert template.display_name == "Demo"
    assert name in [t.name for t in owner.list_templates().templates]
    versions = owner.list_template_versions(name)
    assert [(v.number, v.message, v.active) for v in versions] == [
        (1, "first", False),
        (2, "second", True),
    ]

    data = owner.download_template_version(name, 2)
    assert data == build_archive(src)
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    assert (out / "scripts" / "start.sh").read_text() == "#!/bin/sh\necho v2\n"
    assert (out / "link.sh").is_symlink()
    assert not (out / ".git").exists()

    with pytest.raises(ApiError) as missing:
        owner.download_template_version(name, 9)
    assert missing.value.status == 404 and "no version 9" in missing.value.message


def test_no_activate_and_set_active(owner: Client) -> None:
    name = unique("act")
    owner.push_template(name, simple_archive(name))
    pushed = owner.push_template(name, simple_archive(name), activate=False)
    assert pushed.number == 2 and not pushed.active
    assert owner.get_template(name).active_version == 1
    assert owner.set_active_template_version(name, 2).active_version == 2
    assert [v.active for v in owner.list_template_versions(name)] == [False, True]
    with pytest.raises(ApiError) as exc:
        owner.set_active_template_version(name, 7)
    assert exc.value.status == 404 and "no version 7" in exc.value.message


def test_members_read_template_admins_write(make_user: UserFactory, owner: Client) -> None:
    member, _ = make_user()
    admin, _ = make_user("template-admin")
    name = unique("perm")
    admin.push_template(name, simple_archive(name))
    assert name in [t.name for t in member.list_templates().templates]
    assert member.get_template(name).active_version == 1
    with pytest.raises(ApiError) as denied:
        member.push_template(name, simple_archive(name))
    assert denied.value.status == 403 and "permission to administer" in denied.value.message
    # Archived templates are listed only for those who administer them.
    admin.archive_template(name)
    assert name not in [t.name for t in member.list_templates(include_archived=True).templates]
    assert name in [t.name for t in admin.list_templates(include_archived=True).templates]
    assert [v.number for v in owner.list_template_versions(name)] == [1]


def test_archive_hides_the_template_from_members(make_user: UserFactory, owner: Client) -> None:
    member, _ = make_user()
    name = unique("arch")
    owner.push_template(name, simple_archive(name))
    archived = owner.archive_template(name)
    assert archived.archived_at is not None
    assert name not in [t.name for t in member.list_templates().templates]
    assert name not in [t.name for t in owner.list_templates().templates]
    assert name in [t.name for t in owner.list_templates(include_archived=True).templates]
    for call in (
        lambda: member.get_template(name),
        lambda: member.list_template_versions(name),
        lambda: member.download_template_version(name, 1),
    ):
        with pytest.raises(ApiError) as exc:
            call()
        assert exc.value.status == 404 and exc.value.reason == "template_not_found"
    with pytest.raises(ApiError) as push:
        owner.push_template(name, simple_archive(name))
    assert push.value.status == 409 and "archived" in push.value.message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("bogus: 1\n", "stockade.yaml:10: bogus: unknown field"),
        (
            "  - name: flag\n    type: bool\n    default: 3\n",
            "stockade.yaml:12: parameters[1].default: default must be true or false",
        ),
        (
            "  - name: region\n    default: mars\n    options: [earth, venus]\n",
            "stockade.yaml:11: parameters[1].default: default 'mars' is not one of the options",
        ),
        (
            "  - name: repo\n    default: x\n    validation:\n      regex: '[oops'\n",
            "stockade.yaml:13: parameters[1].validation.regex: invalid regex",
        ),
        (
            "compute:\n  cpu: lots\n",
            "stockade.yaml:11: compute.cpu: must be a number of cores or ${parameter}",
        ),
    ],
)
def test_bad_manifests_name_file_line_and_field(owner: Client, extra: str, expected: str) -> None:
    name = unique("bad")
    archive = tar_gz([file_entry("stockade.yaml", manifest(name, extra).encode())])
    with pytest.raises(ApiError) as exc:
        owner.push_template(name, archive)
    assert exc.value.status == 400 and exc.value.reason == "invalid_manifest"
    assert expected in exc.value.message, exc.value.message
    with pytest.raises(ApiError) as gone:
        owner.get_template(name)
    assert gone.value.status == 404


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (file_entry("/etc/evil", b"x"), "absolute path"),
        (file_entry("../evil", b"x"), "contains '..'"),
        (file_entry("a/../../evil", b"x"), "contains '..'"),
        (link_entry("out", "../../etc/passwd"), "points outside the template"),
        (link_entry("abs", "/etc/passwd"), "absolute path"),
        (link_entry("hard", "/etc/passwd", tarfile.LNKTYPE), "points outside the template"),
        (link_entry("dev", "", tarfile.CHRTYPE), "device or FIFO"),
    ],
)
def test_unsafe_archives_are_refused_and_leave_nothing(
    owner: Client, entry: tuple[tarfile.TarInfo, bytes | None], fragment: str
) -> None:
    name = unique("evil")
    with pytest.raises(ApiError) as exc:
        owner.push_template(name, simple_archive(name, entry))
    assert exc.value.status == 400 and exc.value.reason == "invalid_archive"
    assert fragment in exc.value.message, exc.value.message
    assert name not in [t.name for t in owner.list_templates(include_archived=True).templates]


def test_missing_manifest_bad_body_and_size_limit(owner: Client, server: ServerProcess) -> None:
    name = unique("odd")
    with pytest.raises(ApiError) as no_manifest:
        owner.push_template(name, tar_gz([file_entry("README.md", b"hi")]))
    assert no_manifest.value.status == 400 and "no stockade.yaml" in no_manifest.value.message
    with pytest.raises(ApiError) as garbage:
        owner.push_template(name, b"not a tarball")
    assert garbage.value.status == 400 and "not a readable .tar.gz" in garbage.value.message
    headers = {"Authorization": f"Bearer {owner.token}"}
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        wrong_type = http.post(f"/api/v2/templates/{name}/versions", json={"a": 1}, headers=headers)
        assert wrong_type.status_code == 400 and "application/gzip" in wrong_type.json()["message"]
        # Over the 1 MiB JSON limit but under the archive limit: accepted as a body.
        big = simple_archive(name, file_entry("blob", os.urandom(2 * 1024 * 1024)))
        ok = http.post(
            f"/api/v2/templates/{name}/versions",
            content=big,
            headers={**headers, "Content-Type": "application/gzip"},
        )
        assert ok.status_code == 201, ok.text
        huge = http.post(
            f"/api/v2/templates/{name}/versions",
            content=b"\0" * (10 * 1024 * 1024 + 1),
            headers={**headers, "Content-Type": "application/gzip"},
        )
        assert huge.status_code == 413 and "limit" in huge.json()["message"]
        json_limit = http.put(
            f"/api/v2/templates/{name}/active",
            content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
            headers={**headers, "Content-Type": "application/json"},
        )
        assert json_limit.status_code == 413
    with pytest.raises(ApiError) as bad_name:
        owner.push_template("Bad_Name", simple_archive("Bad_Name"))
    assert bad_name.value.status == 400 and "invalid template name" in bad_name.value.message


def test_push_activate_archive_are_audited(owner: Client) -> None:
    name = unique("aud")
    owner.push_template(name, simple_archive(name), message="hello")
    owner.push_template(name, simple_archive(name), activate=False)
    owner.set_active_template_version(name, 2)
    owner.archive_template(name)
    entries = [
        e
        for e in owner.list_audit(limit=1000, resource_type="template").entries
        if e.resource_name == name
    ]
    by_action = {e.action: e for e in entries}
    assert set(by_action) >= {"template.push", "template.activate", "template.archive"}
    first_push = min((e for e in entries if e.action == "template.push"), key=lambda e: e.seq)
    assert first_push.details["version"] == 1 and first_push.details["message"] == "hello"
    assert first_push.details["created_template"] is True
    assert first_push.diff["active_version"] == [None, 1]
    assert by_action["template.activate"].diff["active_version"] == [1, 2]
    assert by_action["template.archive"].diff["archived"] == [False, True]
    assert all(e.status_code < 300 for e in entries)
