"""``stockade templates push`` checks a terraform template's variables (its
parameters) before it uploads anything."""

from __future__ import annotations

from pathlib import Path

from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)


def test_push_refuses_a_bad_variable_before_uploading(cli: Run, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "tpl"
    cli("templates", "init", str(src), "--backend", "terraform", "--name", "tpl")
    main = src / "main.tf"
    declared = '"Printed by the startup script."\n  type        = string'
    assert declared in main.read_text()
    main.write_text(main.read_text().replace(declared, declared.replace("string", "map(string)")))
    line = main.read_text().splitlines().index("  type        = map(string)") + 1
    (src / "stockade.yaml").write_text(
        (src / "stockade.yaml").read_text() + "parameters:\n  - name: ghost\n    required: true\n"
    )
    # Not logged in: the check comes first, so the error is the template's.
    bad = cli("templates", "push", "tpl", "-d", str(src), ok=False)
    assert bad.returncode == 1
    # The console wraps long lines.
    stderr = " ".join(bad.stderr.split())
    assert (
        f'{src}/main.tf:{line}: variable "greeting": type map(string) is not supported as a '
        "parameter (use string, number, bool or list(string))"
    ) in stderr, stderr
    assert f'{src}/stockade.yaml:19: parameters[0].name: declare variable "ghost"' in stderr
    assert "Traceback" not in bad.stderr
