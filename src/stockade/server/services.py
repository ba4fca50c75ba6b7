"""The composition root: every service a request handler may use, built once
per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from stockade.egress import ledger
from stockade.provisioner.backends.base import BackendOptions
from stockade.server.agents.service import AgentService
from stockade.server.aibridge.service import AibridgeService
from stockade.server.apps.service import AppService
from stockade.server.audit.service import load_key
from stockade.server.auth.service import AuthService
from stockade.server.background import Background
from stockade.server.connections.hop import Hops
from stockade.server.connections.service import ConnectionService
from stockade.server.db import Database
from stockade.server.egress.service import EgressService
from stockade.server.events import Notifier, PgRelay
from stockade.server.observability import Metrics
from stockade.server.oidc.service import OidcService
from stockade.server.orgs.service import OrgService
from stockade.server.provisioning.runner import ProvisionerRunner
from stockade.server.provisioning.service import ProvisioningService
from stockade.server.secretbox import SecretBox
from stockade.server.settings import Settings
from stockade.server.system.replicas import ReplicaRegistry
from stockade.server.templates.service import TemplateService
from stockade.server.users.service import UserService
from stockade.server.workspaces.service import WorkspaceService


@dataclass
class Services:
    """Everything a request handler may use; one per app."""

    settings: Settings
    db: Database
    metrics: Metrics
    auth: AuthService
    users: UserService
    templates: TemplateService
    orgs: OrgService
    workspaces: WorkspaceService
    agents: AgentService
    connections: ConnectionService
    provisioning: ProvisioningService
    provisioner: ProvisionerRunner
    notifier: Notifier
    background: Background
    # PostgreSQL: wake-ups shared with the other replicas (None on SQLite).
    relay: PgRelay | None
    replicas: ReplicaRegistry
    audit_key: bytes
    egress: EgressService
    apps: AppService = field(init=False)
    aibridge: AibridgeService = field(init=False)
    oidc: OidcService = field(init=False)


def build_services(settings: Settings) -> Services:
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    auth = AuthService(db, settings)
    notifier = Notifier()
    audit_key = load_key(settings.audit_key, settings.data_dir)
    egress = EgressService(db, settings.egress_policy, ledger())
    replicas = ReplicaRegistry(
        db, address=settings.replica_url, heartbeat_seconds=settings.replica_heartbeat_seconds
    )
    agents = AgentService(db, notifier, SecretBox(audit_key), egress, replica_id=replicas.id)
    provisioning = ProvisioningService(
        db,
        notifier,
        # The URL agents get (a provisionerd's workspaces use it as it is).
        access_url=settings.agent_url or settings.access_url,
        lease_seconds=settings.job_lease_seconds,
        timeout_seconds=settings.build_timeout_seconds,
        audit_key=audit_key,
        agents=agents,
        agent_ca=settings.agent_ca_pem,
    )
    options = BackendOptions(
        workspaces_dir=settings.workspaces_dir,
        allow_unsandboxed=settings.local_allow_unsandboxed,
        docker_host=settings.docker_host,
        docker_network=settings.docker_network,
        terraform_binary=settings.terraform_binary,
        terraform_mirror_dir=settings.provider_mirror_dir,
        kubernetes_config=settings.kubernetes_config,
        kubernetes_namespace=settings.kubernetes_namespace,
        kubernetes_control_plane_cidrs=tuple(
            c.strip() for c in settings.kubernetes_control_plane_cidrs.split(",") if c.strip()
        ),
    )
    services = Services(
        settings=settings,
        db=db,
        metrics=Metrics(),
        auth=auth,
        users=UserService(db, password_guesses=auth.user_failures),
        templates=TemplateService(db),
        orgs=OrgService(db, settings, audit_key),
        workspaces=WorkspaceService(db, notifier, agents),
        agents=agents,
        connections=ConnectionService(
            db,
            agents,
            audit_key=audit_key,
            hops=Hops(audit_key, tls_ca_file=settings.tls_cert_file),
        ),
        provisioning=provisioning,
        provisioner=ProvisionerRunner(
            provisioning,
            notifier,
            options,
            workers=settings.provisioner_workers,
            backends=settings.backend_list,
            cache_dir=settings.data_dir / "cache",
        ),
        notifier=notifier,
        relay=PgRelay(settings.postgres_url, notifier) if settings.postgres_url else None,
        replicas=replicas,
        background=Background(),
        audit_key=audit_key,
        egress=egress,
    )
    services.apps = AppService(
        settings, db, agents, services.connections, auth, audit_key=audit_key
    )
    services.background.every("app_sessions", 30, services.apps.sweep)
    services.aibridge = AibridgeService(db, settings, audit_key)
    # Workspaces' sessions get the bridge's URLs and a key of their own.
    agents.session_env = services.aibridge.session_env
    services.oidc = OidcService(
        db, settings, auth, audit_key=audit_key, group_sync=services.orgs.sync_user_groups
    )
    return services
