"""``stockade templates ...`` as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import Run, _login_owner, cli  # noqa: F401  (fixture)
from tests.conftest import ServerFactory


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.parts
    }


def test_init_push_list_versions_pull_archive(
    cli: Run,  # noqa: F811
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    server = start_server()
    _login_owner(cli, server)
    src = tmp_path / "starter"
    cli("templates", "init", str(src), "--backend", "docker", "--name", "starter")
    assert (src / "stockade.yaml").is_file() and (src / "README.md").is_file()
    refused = cli("templates", "init", str(src), ok=False)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    (src / "extra.txt").write_text("hello\n")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]\n")

    pushed = json.loads(
        cli("templates", "push", "starter", "-d", str(src), "-m", "v1", "-o", "json").stdout
    )
    assert pushed["number"] == 1 and pushed["active"] is True
    cli("templates", "push", "starter", "-d", str(src), "--no-activate")
    listed = json.loads(cli("templates", "list", "-o", "json").stdout)
    assert [(t["name"], t["active_version"]) for t in listed] == [("starter", 1)]
    versions = json.loads(cli("templates", "versions", "starter", "-o", "json").stdout)
    assert [(v["number"], v["active"], v["message"]) for v in versions] == [
        (1, True, "v1"),
        (2, False, ""),
    ]

    out = tmp_path / "pulled"
    cli("templates", "pull", "starter", "--version", "2", "-d", str(out))
    assert _files(out) == _files(src)
    assert not (out / ".git").exists()

    (src / "stockade.yaml").write_text(
        (src / "stockade.yaml").read_text().replace("backend: docker", "backend: docker\nbogus: 1")
    )
    bad = cli("templates", "push", "starter", "-d", str(src), ok=False)
    assert bad.returncode == 1
    assert f"{src}/stockade.yaml:6: bogus: unknown field" in bad.stderr, bad.stderr
    assert len(json.loads(cli("templates", "versions", "starter", "-o", "json").stdout)) == 2

    refused_archive = cli("templates", "archive", "starter", ok=False)
    assert "--yes" in refused_archive.stderr
    cli("templates", "archive", "starter", "--yes")
    assert json.loads(cli("templates", "list", "-o", "json").stdout) == []
