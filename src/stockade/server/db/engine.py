"""The database handle: one async engine, sessions for reads and for writes.

SQLite runs in WAL mode. Write transactions there begin with ``BEGIN IMMEDIATE``
so that two writers queue on the busy timeout instead of one failing with
``database is locked`` when it upgrades a read lock; reads stay deferred and
never block writers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool

_WRITE_OPTION = "stockade_write"
_READ_OPTION = "stockade_read"


class Database:
    """Owns the engine. ``session()`` is for reads, ``transaction()`` for writes;
    both commit on success and roll back on error."""

    def __init__(self, url: str, *, pool_size: int = 20, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # hide_parameters: error logs must not carry bound values (hashes, emails).
        kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
        if self.is_sqlite:
            path = url.split("///", 1)[1]
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=pool_size, max_overflow=4)
        else:
            # No pre-ping: it costs a round trip on every checkout; a dropped
            # connection is invalidated by the error it raises instead.
            kwargs.update(pool_size=pool_size, max_overflow=4, pool_recycle=3600)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        # Reads run without BEGIN/COMMIT round trips (each statement is its own
        # snapshot). PostgreSQL has AUTOCOMMIT for that; on SQLite our BEGIN hook
        # skips them, since changing the isolation level there would hand
        # transaction control back to the driver when the connection is pooled.
        self._read_engine = self.engine.execution_options(
            **({_READ_OPTION: True} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"})
        )
        self._reader = async_sessionmaker(self._read_engine, expire_on_commit=False)
        self._writer = async_sessionmaker(
            self.engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._reader() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for Core queries on hot read paths: no ORM session,
        no identity map, the fewest round trips."""
        async with self._read_engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self._writer() as session, session.begin():
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def pool_status(self) -> dict[str, int]:
        pool = self.engine.pool
        size = getattr(pool, "size", lambda: 0)()
        checked_out = getattr(pool, "checkedout", lambda: 0)()
        return {"size": int(size), "checked_out": int(checked_out)}

    async def dispose(self) -> None:
        await self.engine.dispose()


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(_READ_OPTION):
            return
        if options.get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
