"""Database access: models, the engine for SQLite or PostgreSQL, and migrations."""

from stockade.server.db.engine import Database
from stockade.server.db.models import ApiKey, AuditEntry, AuditHead, Base, User

__all__ = ["ApiKey", "AuditEntry", "AuditHead", "Base", "Database", "User"]
