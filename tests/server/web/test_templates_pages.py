"""The templates pages: the list (and its empty state, whose CLI commands are
run as printed), a template's versions, a version's manifest and files,
activation and archiving through the forms, and what members and bad input
get."""

from __future__ import annotations

import html
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from tests.conftest import OWNER_PASSWORD, PASSWORD, ServerFactory, UserFactory, unique
from tests.server.test_templates import file_entry, link_entry, tar_gz
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"

MANIFEST = """\
name: {name}
display_name: Web Demo
description: A template the dashboard tests read.
backend: local
parameters:
  - name: size
    display_name: Size
    type: number
    default: 2
    options: [1, 2, 4]
    mutable: true
  - name: repo
    type: string
    default: ""
    validation: {{regex: "^$|^https://.+$"}}
compute:
  home_size: 10GiB
agent:
  startup_script: |
    echo "started <b>{marker}</b>"
  metadata:
    - key: load
      display_name: Load average
      script: cut -d' ' -f1 /proc/loadavg
      interval: 30
apps:
  - slug: code
    display_name: Code Server
    port: 13337
    subdomain: false
    health_check: {{url: /healthz}}
"""
BIG = 300 * 1024  # over the page's 256 KiB inline limit


def archive(name: str, marker: str = "v1") -> bytes:
    return tar_gz(
        [
            file_entry("stockade.yaml", MANIFEST.format(name=name, marker=marker).encode()),
            file_entry("scripts/start.sh", b"#!/bin/sh\necho 'hi & bye' <tag>\n"),
            file_entry("data.bin", b"\x7fELF\x00\x01\x02"),
            file_entry("latin1.txt", b"caf\xe9\n"),
            file_entry("big.txt", b"x" * BIG),
            link_entry("run.sh", "scripts/start.sh"),
        ]
    )


@pytest.fixture(scope="module")
def pushed(owner: Client) -> str:
    """A template with two versions (the second active), shared by the
    read-only tests."""
    name = unique("webtpl")
    owner.push_template(name, archive(name, "v1"), message="first cut")
    owner.push_template(name, archive(name, "v2"), message="second <cut>")
    return name


@pytest.fixture
def member_web(server: ServerProcess, make_user: UserFactory) -> Iterator[WebClient]:
    _, username = make_user()
    client = WebClient(server)
    client.login(username, PASSWORD)
    yield client
    client.close()


def test_list_detail_and_version_pages(web: WebClient, pushed: str) -> None:
    listing = web.get("/templates")
    assert listing.status_code == 200
    row = re.search(rf'<tr>\s*<td>\s*<a href="/templates/{pushed}">.*?</tr>', listing.text, re.S)
    assert row, listing.text
    assert "Web Demo" in row.group(0) and "A template the dashboard tests read." in row.group(0)
    assert f'href="/templates/{pushed}/versions/2">v2<' in row.group(0)  # the active version
    assert "<td>2</td>" in row.group(0)  # two versions
    assert "s-active" in row.group(0) and "local" in row.group(0)

    detail = web.get(f"/templates/{pushed}")
    assert detail.status_code == 200
    assert f'href="/workspaces/new?template={pushed}"' in detail.text
    assert "first cut" in detail.text and "second &lt;cut&gt;" in detail.text
    assert detail.text.index(">v2<") < detail.text.index(">v1<")  # newest first
    assert "<td>you</td>" in detail.text  # the owner pushed both
    assert f"stockade templates push {pushed} -d ./{pushed}" in detail.text
    assert f"stockade templates pull {pushed} -d ./{pushed} --version 2" in detail.text
    # v1 may be made active, v2 (active) may not; the archive form asks first.
    assert detail.text.count(f'action="/templates/{pushed}/active"') == 1
    assert 'name="version" value="1"' in detail.text
    assert re.search(
        rf'action="/templates/{pushed}/archive" class="inline" data-confirm="Archive the '
        r"template [^\"]*Members will no longer see it",
        detail.text,
    )

    version = web.get(f"/templates/{pushed}/versions/1")
    assert version.status_code == 200
    text = version.text
    # The parsed manifest, readably: parameters with types, defaults, options
    # and validation, compute, the script (escaped), metadata and apps.
    assert "<code>size</code>" in text and "<td>number</td>" in text
    assert "<code>1</code> <code>2</code> <code>4</code>" in text
    assert "regex <code>^$|^https://.+$</code>" in text and "<code>&#34;&#34;</code>" in text
    assert "<code>10GiB</code>" in text
    assert "echo &#34;started &lt;b&gt;v1&lt;/b&gt;&#34;" in text and "<b>v1" not in text
    assert "Load average" in text and "30 s" in text
    assert "port <code>13337</code>" in text and "<code>/healthz</code>" in text
    assert "first cut" in text
    # The raw file as pushed.
    assert "stockade.yaml</code> as pushed" in text and "display_name: Web Demo" in text
    # The files, with sizes; the symlink says where it points.
    for path in ("stockade.yaml", "scripts/start.sh", "data.bin", "latin1.txt", "big.txt"):
        assert f"?file={path}#files" in text, path
    assert f"{BIG:,} B" in text and "→ scripts/start.sh" in text
    assert "Choose a file on the left" in text
    assert re.search(r'<footer class="foot">Stockade [\w.+-]+ · runs offline</footer>', text)
    # The version's own archive is offered for download through the API.
    assert f'href="/api/v2/templates/{pushed}/versions/1/archive"' in text

    def file_page(path: str) -> str:
        response = web.get(f"/templates/{pushed}/versions/1", params={"file": path})
        assert response.status_code == 200, (path, response.text)
        return response.text

    assert "echo &#39;hi &amp; bye&#39; &lt;tag&gt;" in file_page("scripts/start.sh")
    assert "binary file" in file_page("data.bin")
    assert "not UTF-8 text" in file_page("latin1.txt")
    big = file_page("big.txt")
    assert "too large to show" in big and "x" * 1000 not in big
    link = file_page("run.sh")
    assert "symbolic link to scripts/start.sh" in link
    assert "?file=scripts/start.sh#files" in link
    # A path written another way finds the same file.
    assert "echo &#39;hi &amp; bye&#39;" in file_page("./scripts//start.sh")
    assert "started &lt;b&gt;v2" in web.get(f"/templates/{pushed}/versions/2").text


def test_unknown_and_malformed_addresses(web: WebClient, pushed: str) -> None:
    cases = {
        "/templates/nope-not-here": (404, "template &#39;nope-not-here&#39; not found"),
        f"/templates/{pushed}/versions/99": (404, "has no version 99"),
        f"/templates/{pushed}/versions/1?file=missing.txt": (404, "has no file"),
        f"/templates/{pushed}/versions/1?file=../../etc/passwd": (404, "has no file"),
        f"/templates/{pushed}/versions/1?file=scripts": (404, "is a directory"),
        f"/templates/{pushed}/versions/abc": (400, "number"),
        f"/templates/{pushed}/versions/0": (400, "number"),
        f"/templates/{pushed}/versions/1?file=" + "a" * 2000: (400, "file"),
        "/templates/" + "x" * 100: (400, "name"),
        "/templates?archived=maybe": (400, "archived"),
    }
    for path, (status, words) in cases.items():
        response = web.get(path)
        assert response.status_code == status, (path, response.status_code)
        assert "<html" in response.text and words in response.text, (path, response.text)


def test_activate_and_archive_through_the_forms(
    web: WebClient, member_web: WebClient, owner: Client
) -> None:
    name = unique("webtpl")
    owner.push_template(name, archive(name), message="one")
    owner.push_template(name, archive(name), message="two")
    url = f"/templates/{name}"

    # A member sees the template but no admin forms, and cannot post them.
    seen = member_web.get(url)
    assert seen.status_code == 200
    assert "Make active" not in seen.text and "Archive template" not in seen.text
    assert "Push a new version" not in seen.text
    assert "another user" in seen.text  # members may not read other users
    refused = member_web.post(f"{url}/active", {"version": "1"})
    assert refused.status_code == 403 and "permission" in refused.text
    refused = member_web.post(f"{url}/archive")
    assert refused.status_code == 403 and "permission" in refused.text
    # "Show archived" is for those who administer templates (for others it
    # would list nothing more).
    assert "Show archived" not in member_web.get("/templates").text
    assert owner.get_template(name).active_version == 2
    assert owner.get_template(name).archived_at is None

    # The owner: a form from another session or page is refused.
    page = web.get(url)
    assert web.post(f"{url}/active", {"version": "1", "csrf_token": "forged"}).status_code == 403
    assert web.post(f"{url}/archive", {"csrf_token": ""}).status_code == 403
    assert owner.get_template(name).active_version == 2
    assert owner.get_template(name).archived_at is None

    # Bad version numbers are answered on the page, where the form is.
    for bad, status, words in (("abc", 400, "Choose a version"), ("", 400, "Choose a version"),
                               ("99", 404, "has no version 99")):  # fmt: skip
        answer = web.post(f"{url}/active", {"version": bad})
        assert answer.status_code == status, (bad, answer.status_code)
        assert 'role="alert"' in answer.text and words in answer.text, bad
        assert "<h2>Versions</h2>" in answer.text
    assert owner.get_template(name).active_version == 2

    done = web.post(f"{url}/active", {"version": "1"})
    assert done.status_code == 303 and done.headers["location"] == url
    page = web.get(url)
    assert f"Version 1 of {name} is now active" in page.text
    assert owner.get_template(name).active_version == 1
    assert 'name="version" value="2"' in page.text and 'name="version" value="1"' not in page.text

    archived = web.post(f"{url}/archive")
    assert archived.status_code == 303 and archived.headers["location"] == url
    page = web.get(url)
    assert f"{name} is archived" in page.text and "s-archived" in page.text
    assert "Create workspace" not in page.text and "Make active" not in page.text
    assert owner.get_template(name).archived_at is not None
    # Archived templates leave the lists, except the admins' "show archived".
    assert f'/templates/{name}"' not in web.get("/templates").text
    with_archived = web.get("/templates?archived=true")
    assert (
        f'href="/templates/{name}"' in with_archived.text and "Hide archived" in with_archived.text
    )
    # For a member, it is gone.
    assert member_web.get(url).status_code == 404
    assert member_web.get(f"{url}/versions/1").status_code == 404
    assert f'/templates/{name}"' not in member_web.get("/templates").text
    assert f'/templates/{name}"' not in member_web.get("/templates?archived=true").text
    # Activating an archived template's version is refused in place.
    late = web.post(f"{url}/active", {"version": "2"})
    assert late.status_code == 409 and "archived" in late.text
    assert owner.get_template(name).active_version == 1


def printed_commands(page: str) -> list[list[str]]:
    """The command lines of a page's CLI block, without their comments."""
    block = re.search(r'<pre class="tpl-cmd"><code>(.*?)</code></pre>', page, re.S)
    assert block, page
    return [shlex.split(line.split("#", 1)[0]) for line in html.unescape(block[1]).splitlines()]


def test_empty_state_commands_work_as_printed(start_server: ServerFactory, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env["STOCKADE_CONFIG_DIR"] = str(tmp_path / "config")

    def run(command: list[str], cwd: Path) -> None:
        assert command[0] == "stockade"
        result = subprocess.run(
            [sys.executable, "-m", "stockade", *command[1:]],
            cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, (command, result.stderr, result.stdout)

    server = start_server()
    with Client(server.url) as first:
        first.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    web = WebClient(server)
    try:
        web.login("owner", OWNER_PASSWORD)
        empty = web.get("/templates")
        assert empty.status_code == 200 and "No templates yet" in empty.text
        commands = printed_commands(empty.text)
        assert [c[:3] for c in commands] == [
            ["stockade", "login", server.url],
            ["stockade", "templates", "init"],
            ["stockade", "templates", "push"],
        ]
        # Run them as printed. The CLI tests cover logging in; here the
        # environment stands for it with this session's token (a password
        # login costs seconds on a loaded machine).
        env.update(STOCKADE_URL=server.url, STOCKADE_TOKEN=web.http.cookies["stockade_session"])
        for command in commands[1:]:
            run(command, tmp_path)
        listing = web.get("/templates")
        assert 'href="/templates/my-template"' in listing.text
        assert "No templates yet" not in listing.text

        # The template page's way to push a new version works as printed too.
        detail = web.get("/templates/my-template")
        commands = printed_commands(detail.text)
        assert [c[:3] for c in commands] == [
            ["stockade", "templates", "pull"],
            ["stockade", "templates", "push"],
        ]
        work = tmp_path / "second"
        work.mkdir()
        for command in commands:
            run(command, work)
        versions = web.get("/templates/my-template").text
        assert ">v2<" in versions and "what changed" in versions
    finally:
        web.close()


def test_pages_in_chromium(chromium: Chromium, pushed: str, owner: Client) -> None:
    page = chromium.page
    page.goto(chromium.base_url + "/templates")
    chromium.screenshot("templates-list")
    page.get_by_role("link", name=pushed).click()
    page.wait_for_url(f"**/templates/{pushed}")
    assert page.get_by_role("link", name="Create workspace").get_attribute("href") == (
        f"/workspaces/new?template={pushed}"
    )
    chromium.screenshot("templates-template")
    page.get_by_role("link", name="v1", exact=True).click()
    page.wait_for_url(f"**/templates/{pushed}/versions/1")
    page.get_by_role("link", name="scripts/start.sh").first.click()
    page.wait_for_url("**file=scripts/start.sh*")
    assert "echo 'hi & bye' <tag>" in page.locator(".tpl-viewer pre").inner_text()
    page.locator("details.tpl-raw summary").click()
    chromium.screenshot("templates-version")
    # The archive button asks first; dismissing keeps the template.
    page.goto(chromium.base_url + f"/templates/{pushed}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Archive template").click()
    page.wait_for_load_state()
    assert page.url.endswith(f"/templates/{pushed}")
    assert page.get_by_role("button", name="Archive template").is_visible()
    assert owner.get_template(pushed).archived_at is None
