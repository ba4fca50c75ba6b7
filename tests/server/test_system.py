"""Health, metrics, request ids, JSON logs, OpenAPI, settings, migrations,
graceful shutdown."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from stockade.server.db import Base, Database, migrate
from stockade.server.settings import Settings
from tests.conftest import OWNER_PASSWORD, ServerFactory, UserFactory


def test_healthz_and_buildinfo(server: ServerProcess, backend: str) -> None:
    assert httpx.get(f"{server.url}/healthz").text == "ok"
    info = httpx.get(f"{server.url}/api/v2/buildinfo").json()
    assert info["dialect"] == ("postgresql" if backend == "postgres" else "sqlite")


def test_debug_health_is_for_owners(owner: Client, make_user: UserFactory) -> None:
    health = owner.health()
    assert health.status == "ok" and health.database["ok"] is True
    assert health.migrations["up_to_date"] is True and health.migrations["head"]
    auditor, _ = make_user("auditor")
    with pytest.raises(ApiError) as denied:
        auditor.health()
    assert denied.value.status == 403


def test_metrics_by_route_template(owner: Client, server: ServerProcess) -> None:
    owner.get_user("owner")
    text = httpx.get(f"{server.url}/metrics").text
    assert (
        'stockade_http_requests_total{method="GET",route="/api/v2/users/{user}",status="200"}'
        in text
    )
    assert "stockade_http_request_duration_seconds_bucket" in text
    assert "stockade_db_pool_size" in text and "stockade_build_info{python=" in text


def test_request_id_is_returned_and_logged(owner: Client, server: ServerProcess) -> None:
    response = httpx.get(
        f"{server.url}/api/v2/users/first", headers={"X-Request-Id": "trace-abc-123"}
    )
    assert response.headers["x-request-id"] == "trace-abc-123"
    generated = httpx.get(f"{server.url}/api/v2/users/first").headers["x-request-id"]
    assert len(generated) == 32
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "trace-abc-123"]
    assert mine and mine[0]["event"] == "request" and mine[0]["route"] == "/api/v2/users/first"
    assert all("level" in line and "timestamp" in line for line in lines)


def test_secrets_never_reach_the_log(owner: Client, server: ServerProcess) -> None:
    token = owner.create_token("logcheck").token
    with Client(server.url, token) as api:
        api.me()
    logs = server.logs()
    assert token not in logs and token.split("-")[1] not in logs
    assert OWNER_PASSWORD not in logs and (owner.token or "x") not in logs


def test_openapi_schema_lists_the_api(server: ServerProcess) -> None:
    schema = httpx.get(f"{server.url}/api/v2/openapi.json").json()
    assert "/api/v2/users" in schema["paths"] and "/api/v2/audit/verify" in schema["paths"]
    # No Swagger UI: it would load scripts from a CDN.
    assert httpx.get(f"{server.url}/docs").status_code == 404


def test_unknown_route_is_a_json_404(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/api/v2/nothing-here")
    assert response.status_code == 404 and "no API route" in response.json()["message"]


def test_settings_from_env_file_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(
        'address = "127.0.0.1:9000"\nlog_level = "debug"\nsession_lifetime_seconds = 600\n'
    )
    monkeypatch.setenv("STOCKADE_CONFIG", str(config))
    monkeypatch.setenv("STOCKADE_LOG_LEVEL", "warning")
    settings = Settings(address="127.0.0.1:9100")
    assert settings.address == "127.0.0.1:9100"  # flag over file
    assert settings.log_level == "warning"  # env over file
    assert settings.session_lifetime_seconds == 600  # file over default
    assert settings.access_url == "http://127.0.0.1:9100"
    assert settings.secure_cookies is False
    assert Settings(access_url="https://ws.internal/").secure_cookies is True
    with pytest.raises(ValueError, match="HOST:PORT"):
        Settings(address="nonsense")
    with pytest.raises(ValueError, match="postgresql://"):
        Settings(postgres_url="mysql://x")


def test_bad_settings_give_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "stockade", "server", "--address", "nope",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid settings: address" in result.stderr and "Traceback" not in result.stderr


async def test_migrations_match_the_models(empty_database: Database) -> None:
    db = empty_database
    await migrate.upgrade(db)
    await migrate.upgrade(db)  # idempotent
    async with db.engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
    assert diff == [], f"models and migrations differ; add a migration: {diff}"


def test_graceful_shutdown_on_sigterm(start_server: ServerFactory) -> None:
    server = start_server()
    # uvicorn finishes in-flight requests and the app's shutdown, then re-raises
    # the signal so the exit status says how the process ended.
    assert server.stop(signal.SIGTERM) == -signal.SIGTERM
    logs = server.logs()
    assert '"Finished server process' in logs or "Finished server process" in logs
    assert '"server_stopped"' in logs


def test_state_survives_a_restart(start_server: ServerFactory) -> None:
    server = start_server()
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        token = api.login("boss", OWNER_PASSWORD).session_token
    server.stop()
    server.start()
    with Client(server.url, token) as api:
        assert api.me().username == "boss"
        assert api.verify_audit().ok
    # The database holds hashes and the audit log; the chain's key sits beside it.
    import stat

    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((server.data_dir / "audit.key").stat().st_mode) == 0o600


def test_oversized_bodies_are_refused_with_413(server: ServerProcess) -> None:
    url = f"{server.url}/api/v2/users/login"
    big = b'{"username": "' + b"a" * (2 << 20) + b'", "password": "x"}'
    declared = httpx.post(url, content=big, headers={"content-type": "application/json"})

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield from (b"a" * 65536 for _ in range(40))

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert "too large" in response.json()["message"]


def test_latest_revision_constant_is_alembics_head() -> None:
    assert migrate.head_revision() == migrate.LATEST_REVISION


async def test_unexpected_errors_are_json_500s_with_request_id_and_audited(tmp_path: Path) -> None:
    from stockade.server.app import create_app
    from stockade.server.audit import service as audit
    from stockade.server.authz import public

    app = create_app(Settings(data_dir=tmp_path))

    async def explode() -> None:
        raise RuntimeError("secret detail that must stay in the log")

    app.add_api_route("/api/v2/test/explode", explode, methods=["POST"], dependencies=[public()])
    db = app.state.services.db
    await migrate.upgrade(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://stockade.test") as client:
        response = await client.post("/api/v2/test/explode")
    assert response.status_code == 500
    body = response.json()
    assert body["reason"] == "internal" and body["request_id"] == response.headers["x-request-id"]
    assert body["request_id"] in body["message"] and "secret detail" not in response.text
    flt = audit.AuditFilter(action="POST /api/v2/test/explode")
    rows, _ = await audit.list_entries(db, flt, limit=5, offset=0)
    assert [r.status_code for r in rows] == [500]
    await db.dispose()
