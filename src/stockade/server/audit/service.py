"""Append, query, verify, export and purge the audit log.

Each entry's ``hash`` is an HMAC-SHA-256, under a key kept outside the
database, of its canonical JSON (every column but ``hash``, including
``prev_hash``): an edited, deleted or reordered row no longer matches, and
someone who can write the database but not read the key cannot recompute the
chain. The chain head (last seq and hash) and its anchor (the last
purged entry) live in ``audit_head``; a purge moves the anchor and is itself
recorded as a chained entry, so what remains stays verifiable and a silent
deletion of the oldest rows still shows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.server.db import AuditEntry, AuditHead, Database
from stockade.server.db.models import new_id, utcnow

REDACTED = "[redacted]"
SECRET_FIELDS = frozenset(
    {"password", "old_password", "hashed_password", "token", "secret", "session_token"}
)


def redact(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (REDACTED if k in SECRET_FIELDS else v) for k, v in values.items()}


def diff_fields(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``{field: [old, new]}`` for every changed field, secrets redacted."""
    changed: dict[str, Any] = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            changed[key] = [REDACTED, REDACTED] if key in SECRET_FIELDS else [old, new]
    return changed


@dataclass
class AuditRecord:
    """What a request did, filled in by the endpoint and service while it runs
    and written by the audit middleware with the final status code."""

    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    resource_name: str | None = None
    diff: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # Who acted, when the request authenticates itself (login) or the actor
    # changes during it.
    user_id: str | None = None
    username: str | None = None

    def describe(
        self,
        action: str,
        resource_type: str,
        resource_id: str | None = None,
        resource_name: str | None = None,
        *,
        diff: dict[str, Any] | None = None,
        **details: Any,
    ) -> None:
        self.action = action
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.resource_name = resource_name
        if diff is not None:
            self.diff = diff
        self.details.update(details)


def _canonical(value: Any) -> Any:
    """The JSON form the database returns, so a hash computed before storing
    matches the one computed from the stored row."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def entry_hash(fields: dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in fields.items() if k != "hash"}
    when = body["time"]
    body["time"] = when.astimezone(UTC).isoformat(timespec="microseconds")
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, data.encode(), hashlib.sha256).hexdigest()


def load_key(secret: str, data_dir: Path) -> bytes:
    """The chain's key: the configured secret, or a random one created once in
    the data directory (0600). Replicas must share a configured secret."""
    if secret:
        return secret.encode()
    path = data_dir / "audit.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


_HASHED_COLUMNS = [
    "seq",
    "id",
    "time",
    "user_id",
    "username",
    "ip",
    "user_agent",
    "action",
    "resource_type",
    "resource_id",
    "resource_name",
    "diff",
    "details",
    "request_id",
    "status_code",
    "prev_hash",
]


def row_fields(row: AuditEntry) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _HASHED_COLUMNS}


async def append(
    session: AsyncSession,
    *,
    key: bytes,
    action: str,
    status_code: int,
    user_id: str | None = None,
    username: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    resource_type: str | None = None,
    resource_id: str | None = None,
    resource_name: str | None = None,
    diff: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    request_id: str | None = None,
    when: datetime | None = None,
) -> AuditEntry:
    """Append one entry inside the caller's write transaction. Updating the
    head row first takes its lock, which orders concurrent appends."""
    head = (
        await session.execute(
            update(AuditHead)
            .where(AuditHead.id == 1)
            .values(last_seq=AuditHead.last_seq + 1)
            .returning(AuditHead.last_seq, AuditHead.last_hash)
        )
    ).one()
    fields: dict[str, Any] = {
        "seq": head.last_seq,
        "id": new_id(),
        "time": when or utcnow(),
        "user_id": user_id,
        "username": username,
        "ip": ip,
        "user_agent": (user_agent or "")[:512] or None,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "resource_name": resource_name,
        "diff": _canonical(diff or {}),
        "details": _canonical(details or {}),
        "request_id": request_id,
        "status_code": status_code,
        "prev_hash": head.last_hash,
    }
    fields["hash"] = entry_hash(fields, key)
    entry = AuditEntry(**fields)
    session.add(entry)
    await session.execute(
        update(AuditHead).where(AuditHead.id == 1).values(last_hash=fields["hash"])
    )
    return entry


async def write_record(
    db: Database, record: AuditRecord, status_code: int, *, key: bytes
) -> AuditEntry:
    async with db.transaction() as session:
        return await append(
            session,
            key=key,
            action=record.action or "unknown",
            status_code=status_code,
            user_id=record.user_id,
            username=record.username,
            ip=record.ip,
            user_agent=record.user_agent,
            resource_type=record.resource_type,
            resource_id=record.resource_id,
            resource_name=record.resource_name,
            diff=record.diff,
            details=record.details,
            request_id=record.request_id,
        )


@dataclass
class AuditFilter:
    actor: str | None = None  # username or user id
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.actor:
            query = query.where(
                or_(AuditEntry.username == self.actor, AuditEntry.user_id == self.actor)
            )
        if self.action:
            query = query.where(AuditEntry.action == self.action)
        if self.resource_type:
            query = query.where(AuditEntry.resource_type == self.resource_type)
        if self.resource_id:
            query = query.where(AuditEntry.resource_id == self.resource_id)
        if self.since:
            query = query.where(AuditEntry.time >= self.since)
        if self.until:
            query = query.where(AuditEntry.time < self.until)
        return query


async def list_entries(
    db: Database, flt: AuditFilter, *, limit: int, offset: int
) -> tuple[list[AuditEntry], int]:
    """Newest first."""
    async with db.session() as session:
        count = (
            await session.execute(flt.apply(select(func.count()).select_from(AuditEntry)))
        ).scalar_one()
        rows = (
            await session.execute(
                flt.apply(select(AuditEntry))
                .order_by(AuditEntry.seq.desc())
                .limit(limit)
                .offset(offset)
            )
        ).scalars()
        return list(rows), int(count)


async def stream_entries(
    db: Database, flt: AuditFilter, *, batch: int = 500
) -> AsyncIterator[AuditEntry]:
    """Oldest first, in batches, for export."""
    after = 0
    while True:
        async with db.session() as session:
            rows = list(
                (
                    await session.execute(
                        flt.apply(select(AuditEntry))
                        .where(AuditEntry.seq > after)
                        .order_by(AuditEntry.seq)
                        .limit(batch)
                    )
                ).scalars()
            )
        for row in rows:
            yield row
        if len(rows) < batch:
            return
        after = rows[-1].seq


@dataclass
class Verification:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    problem: str | None = None


async def verify(db: Database, *, key: bytes, batch: int = 1000) -> Verification:
    """Walk the chain from its anchor to its head; report the first entry whose
    content or position no longer matches."""
    async with db.session() as session:
        head = (await session.execute(select(AuditHead).where(AuditHead.id == 1))).scalar_one()
        anchor_seq, anchor_hash = head.anchor_seq, head.anchor_hash
        last_seq, last_hash = head.last_seq, head.last_hash
        last_purge = (
            await session.execute(
                select(AuditEntry)
                .where(AuditEntry.action == "audit.purge")
                .order_by(AuditEntry.seq.desc())
                .limit(1)
            )
        ).scalar_one_or_none()

    if anchor_seq and (last_purge is None or last_purge.details.get("anchor_seq") != anchor_seq):
        return Verification(
            ok=False,
            checked=0,
            first_bad_seq=anchor_seq + 1,
            problem=f"the chain's anchor (seq {anchor_seq}) is not backed by a recorded purge",
        )

    expected_seq, expected_prev, checked = anchor_seq + 1, anchor_hash, 0
    while True:
        async with db.session() as session:
            rows = list(
                (
                    await session.execute(
                        select(AuditEntry)
                        # Entries appended while we walk are not part of the
                        # head we compare against at the end.
                        .where(AuditEntry.seq >= expected_seq, AuditEntry.seq <= last_seq)
                        .order_by(AuditEntry.seq)
                        .limit(batch)
                    )
                ).scalars()
            )
        for row in rows:
            if row.seq != expected_seq:
                return Verification(
                    False, checked, row.seq, row.id,
                    f"entries {expected_seq}..{row.seq - 1} before entry {row.seq} are missing",
                )  # fmt: skip
            if row.prev_hash != expected_prev:
                return Verification(
                    False, checked, row.seq, row.id,
                    f"entry {row.seq} does not follow entry {row.seq - 1}: that entry was "
                    "changed, or this one was moved",
                )  # fmt: skip
            if entry_hash(row_fields(row), key) != row.hash:
                return Verification(
                    False, checked, row.seq, row.id,
                    f"entry {row.seq} was modified after it was written",
                )  # fmt: skip
            checked += 1
            expected_seq, expected_prev = row.seq + 1, row.hash
        if len(rows) < batch:
            break

    if expected_seq - 1 != last_seq or expected_prev != last_hash:
        return Verification(
            False,
            checked,
            expected_seq,
            None,
            f"the chain ends at entry {expected_seq - 1} but the log recorded entries up to "
            f"{last_seq}: the newest entries were deleted",
        )
    return Verification(True, checked)


async def purge(
    db: Database, *, key: bytes, older_than_days: int, now: datetime | None = None
) -> int:
    """Delete the oldest entries older than the retention period, move the
    anchor past them and record the purge in the chain. Returns the count."""
    cutoff = (now or utcnow()) - timedelta(days=older_than_days)
    async with db.transaction() as session:
        # Only a prefix of the chain can go: stop at the first entry that is new
        # enough, whatever follows.
        first_kept = (
            await session.execute(select(func.min(AuditEntry.seq)).where(AuditEntry.time >= cutoff))
        ).scalar_one_or_none()
        query = select(AuditEntry).where(AuditEntry.time < cutoff)
        if first_kept is not None:
            query = query.where(AuditEntry.seq < first_kept)
        last = (
            await session.execute(query.order_by(AuditEntry.seq.desc()).limit(1))
        ).scalar_one_or_none()
        if last is None:
            return 0
        result = await session.execute(delete(AuditEntry).where(AuditEntry.seq <= last.seq))
        purged = int(getattr(result, "rowcount", 0) or 0)
        await session.execute(
            update(AuditHead)
            .where(AuditHead.id == 1)
            .values(anchor_seq=last.seq, anchor_hash=last.hash)
        )
        await append(
            session,
            key=key,
            action="audit.purge",
            status_code=200,
            resource_type="audit_log",
            details={
                "anchor_seq": last.seq,
                "anchor_hash": last.hash,
                "purged": purged,
                "older_than_days": older_than_days,
            },
        )
    return purged
