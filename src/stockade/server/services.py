"""The composition root: every service a request handler may use, built once
per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from stockade.server.audit.service import load_key
from stockade.server.auth.service import AuthService
from stockade.server.background import Background
from stockade.server.db import Database
from stockade.server.observability import Metrics
from stockade.server.settings import Settings
from stockade.server.templates.service import TemplateService
from stockade.server.users.service import UserService


@dataclass
class Services:
    """Everything a request handler may use; one per app."""

    settings: Settings
    db: Database
    metrics: Metrics
    auth: AuthService
    users: UserService
    templates: TemplateService
    background: Background
    audit_key: bytes


def build_services(settings: Settings) -> Services:
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    auth = AuthService(db, settings)
    return Services(
        settings=settings,
        db=db,
        metrics=Metrics(),
        auth=auth,
        users=UserService(db, password_guesses=auth.user_failures),
        templates=TemplateService(db),
        background=Background(),
        audit_key=load_key(settings.audit_key, settings.data_dir),
    )
