"""Where the CLI keeps its session: ``~/.config/stockade/session.json`` (mode
0600), or ``$STOCKADE_CONFIG_DIR``. ``STOCKADE_URL`` and ``STOCKADE_TOKEN``
override what is saved."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def config_dir() -> Path:
    explicit = os.environ.get("STOCKADE_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "stockade"


def _session_file() -> Path:
    return config_dir() / "session.json"


@dataclass
class Session:
    url: str | None
    token: str | None


def load() -> Session:
    saved: dict[str, str] = {}
    path = _session_file()
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
    url = os.environ.get("STOCKADE_URL") or saved.get("url")
    # The saved token belongs to the saved server: never send it elsewhere.
    saved_token = saved.get("token") if url == saved.get("url") else None
    return Session(url=url, token=os.environ.get("STOCKADE_TOKEN") or saved_token)


def save(url: str, token: str) -> Path:
    path = _session_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Create with 0600 from the start: the token must never be readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"url": url, "token": token}, handle)
    os.chmod(path, 0o600)
    return path


def clear() -> bool:
    path = _session_file()
    if path.exists():
        path.unlink()
        return True
    return False
