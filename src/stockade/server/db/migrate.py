"""Apply Alembic migrations at start, on the server's own connection.

On PostgreSQL an advisory lock makes replicas that start together migrate one
after the other. When the database is already at ``LATEST_REVISION`` Alembic is
not even imported (it costs a fifth of the start-up time); a test keeps the
constant equal to Alembic's head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from stockade.server.db.engine import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
LATEST_REVISION = "0011"
_MIGRATION_LOCK_ID = 0x5704CADE


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(db: Database) -> None:
    if await current_revision(db) == LATEST_REVISION:
        return
    from alembic import command

    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execute(text(f"SELECT pg_advisory_lock({_MIGRATION_LOCK_ID})"))
            await conn.commit()
        try:
            await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
            await conn.commit()
        finally:
            if db.dialect == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_unlock({_MIGRATION_LOCK_ID})"))
                await conn.commit()


async def current_revision(db: Database) -> str | None:
    """The revision the database is at (``None``: a new, empty database)."""
    try:
        async with db.read() as conn:
            result = await conn.execute(text("SELECT version_num FROM alembic_version"))
            return result.scalar_one_or_none()
    except DBAPIError:  # no alembic_version table yet
        return None
