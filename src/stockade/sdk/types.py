"""The API's request and response bodies: the contract between the server, the
SDK, the CLI and scripts. The server validates with these same models."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

USERNAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
USERNAME_HELP = (
    "1-32 characters: lowercase letters, digits and hyphens, starting and ending "
    "with a letter or digit"
)
EMAIL_PATTERN = r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$"

Username = Annotated[
    str, Field(pattern=USERNAME_PATTERN, min_length=1, max_length=32, description=USERNAME_HELP)
]
Email = Annotated[str, Field(pattern=EMAIL_PATTERN, max_length=254, description="email address")]
Password = Annotated[str, Field(min_length=1, max_length=256)]
RoleName = Literal["owner", "user-admin", "template-admin", "auditor"]


def _unstorable(value: Any) -> str | None:
    """Why a text (or any text inside a list or mapping) cannot be stored:
    PostgreSQL refuses NUL, and a lone surrogate cannot be encoded at all."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text (it holds a lone surrogate)"
        return None
    if isinstance(value, dict):
        items: list[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return None
    for item in items:
        problem = _unstorable(item)
        if problem:
            return problem
    return None


class Request(BaseModel):
    """A request body: unknown fields are an error, not silently dropped, and
    no text, however deep, may hold a NUL byte (PostgreSQL cannot store one)
    or a lone surrogate."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        problem = _unstorable(value)
        if problem:
            raise ValueError(problem)
        return value


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ApiError(Response):
    message: str
    reason: str
    detail: list[dict[str, Any]] | None = None
    request_id: str | None = None


class BuildInfo(Response):
    version: str
    dialect: str


class FirstUserStatus(Response):
    first_user_required: bool


class FirstUserRequest(Request):
    username: Username
    email: Email
    password: Password
    name: str = Field("", max_length=128)


class LoginRequest(Request):
    username: str = Field(min_length=1, max_length=254, description="username or email")
    password: Password


class User(Response):
    id: str
    username: str
    email: str
    name: str
    status: Literal["active", "suspended"]
    roles: list[str]
    login_type: str
    created_at: datetime
    last_seen_at: datetime | None = None


class LoginResponse(Response):
    session_token: str
    expires_at: datetime
    user: User


class PasswordAuthMethod(Response):
    enabled: bool


class OidcAuthMethod(Response):
    enabled: bool
    sign_in_text: str = Field("", description="the label of the single sign-on button")
    login_url: str = Field("", description="where the single sign-on starts (a path)")


class AuthMethods(Response):
    """How users may sign in here: the login page and the CLI read this."""

    password: PasswordAuthMethod
    oidc: OidcAuthMethod


class UserList(Response):
    users: list[User]
    count: int


class CreateUserRequest(Request):
    username: Username
    email: Email
    password: Password
    name: str = Field("", max_length=128)
    roles: list[RoleName] = Field(default_factory=list)


class UpdateRolesRequest(Request):
    roles: list[RoleName]


class UpdatePasswordRequest(Request):
    password: Password
    old_password: str | None = Field(
        None, max_length=256, description="required when changing your own password"
    )


class Token(Response):
    id: str
    name: str
    user_id: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None = None


class TokenList(Response):
    tokens: list[Token]


class CreateTokenRequest(Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    lifetime_seconds: int | None = Field(None, gt=0)


class CreatedToken(Token):
    token: str = Field(description="the secret; shown once, never again")


class AuditEntry(Response):
    seq: int
    id: str
    time: datetime
    user_id: str | None
    username: str | None
    ip: str | None
    user_agent: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    resource_name: str | None
    diff: dict[str, Any]
    details: dict[str, Any]
    request_id: str | None
    status_code: int
    prev_hash: str
    hash: str


class AuditList(Response):
    entries: list[AuditEntry]
    count: int


class AuditVerification(Response):
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    problem: str | None = None


class AibridgeToolCall(Response):
    name: str
    arguments: str = Field(description="the arguments the model gave, as JSON text")


class AibridgeInterception(Response):
    """One request through the AI bridge."""

    id: str
    created_at: datetime
    user_id: str
    username: str
    workspace_id: str | None = Field(None, description="set when a workspace's session called")
    workspace_name: str | None = None
    provider: Literal["openai", "anthropic"]
    endpoint: str = Field(description="chat.completions, responses or messages")
    model: str
    streamed: bool
    prompt: str | None = Field(description="the last user prompt of the request")
    tool_calls: list[AibridgeToolCall] = Field(description="the tools the model asked to call")
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    status: int = Field(description="the HTTP status the caller got")
    outcome: Literal["completed", "upstream_error", "refused", "cancelled", "failed"]
    error: str | None
    latency_ms: int
    first_byte_ms: int | None = Field(description="until the upstream's first bytes arrived")


class AibridgeInterceptionList(Response):
    items: list[AibridgeInterception]
    count: int


@dataclass(frozen=True)
class AibridgeFilter:
    """Which AI bridge records to list or export (all given: all must match)."""

    user: str | None = None
    workspace: str | None = None
    provider: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class ReplicaInfo(Response):
    """A running server process of the deployment."""

    id: str
    hostname: str
    pid: int
    version: str
    address: str = Field(description="the URL the other replicas reach this one at")
    started_at: datetime
    heartbeat_at: datetime
    agents: int = Field(0, description="agents whose control connection this replica holds")
    this: bool = Field(False, description="the replica that answered")


class Health(Response):
    status: Literal["ok", "degraded"]
    database: dict[str, Any]
    migrations: dict[str, Any]
    workers: dict[str, Any]
    provisioners: dict[str, Any] = Field(default_factory=dict)
    version: str
    replicas: list[ReplicaInfo] = Field(
        default_factory=list, description="the deployment's live server processes"
    )
    relay: dict[str, Any] = Field(
        default_factory=dict,
        description="PostgreSQL: whether wake-ups reach the other replicas (LISTEN/NOTIFY), "
        "and how many came from them",
    )


class EgressDestination(Response):
    """Outbound attempts of one kind by one component to one destination."""

    component: str = Field(
        description="server, provisioner (the server's build workers), provisionerd:NAME "
        "or agent (a workspace's agent: see workspace)"
    )
    workspace: str | None = Field(None, description="OWNER/NAME of an agent's workspace")
    kind: Literal["connect", "send", "resolve"]
    destination: str
    port: int
    allowed: bool
    internal: bool = Field(description="loopback or a private network, whatever the allow-list")
    reason: str = Field(description="what allowed it, or why it was denied")
    count: int
    first_seen: datetime
    last_seen: datetime


class EgressReport(Response):
    """Every outbound attempt the egress guard saw, allowed or denied."""

    allow_list: list[str]
    denied: int = Field(description="attempts refused, all components together")
    external_allowed: int = Field(
        description="destinations allowed only because egress_allow names them"
    )
    destinations: list[EgressDestination]


class EgressRecords(Request):
    """What a provisioner daemon's egress guard counted since its last report."""

    daemon: str = Field(min_length=1, max_length=64, description="the daemon's name")
    records: list[dict[str, Any]] = Field(default_factory=list, max_length=500)


class EgressPolicyWire(Response):
    """The deployment's allow-list, for a remote component's guard to enforce."""

    policy: dict[str, Any]


class Template(Response):
    id: str
    name: str
    organization: str = Field(description="name of the organization it belongs to")
    display_name: str
    description: str
    icon: str | None = None
    backend: str
    active_version_id: str | None = None
    active_version: int | None = Field(None, description="number of the active version")
    archived_at: datetime | None = None
    created_by: str
    created_at: datetime
    updated_at: datetime


class TemplateList(Response):
    templates: list[Template]
    count: int


class TemplateVersion(Response):
    id: str
    template_id: str
    template_name: str
    number: int
    active: bool
    message: str
    archive_sha256: str
    size: int
    manifest: dict[str, Any]
    created_by: str
    created_at: datetime


class TemplateVersionList(Response):
    versions: list[TemplateVersion]


class ActivateTemplateVersionRequest(Request):
    version: int = Field(ge=1, le=2**31 - 1, description="the version number to make active")


TemplateRole = Literal["use", "admin"]


class TemplateAclUser(Response):
    user_id: str
    username: str
    role: TemplateRole


class TemplateAclGroup(Response):
    group_id: str
    name: str
    role: TemplateRole


class TemplateAcl(Response):
    """Who may use (``use``) or administer (``admin``) a template, besides
    site owners, template-admins and the organization's admins."""

    template: str
    organization: str
    users: list[TemplateAclUser]
    groups: list[TemplateAclGroup]


class UpdateTemplateAclRequest(Request):
    """Changes to a template's ACL: a role sets it, ``null`` removes the entry."""

    users: dict[str, TemplateRole | None] = Field(
        default_factory=dict, max_length=500, description="username -> role or null"
    )
    groups: dict[str, TemplateRole | None] = Field(
        default_factory=dict, max_length=500, description="group name -> role or null"
    )


# --- organizations and groups ------------------------------------------------------

ORG_NAME_PATTERN = USERNAME_PATTERN
OrgName = Annotated[
    str, Field(pattern=ORG_NAME_PATTERN, min_length=1, max_length=32, description=USERNAME_HELP)
]
GROUP_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"
GROUP_NAME_HELP = (
    "1-64 characters: letters, digits, dots, underscores and hyphens, starting and "
    "ending with a letter or digit"
)
GroupName = Annotated[
    str, Field(pattern=GROUP_NAME_PATTERN, min_length=1, max_length=64, description=GROUP_NAME_HELP)
]
OrgRoleName = Literal["org-admin"]


class Organization(Response):
    id: str
    name: str
    display_name: str
    description: str
    is_default: bool
    created_at: datetime
    updated_at: datetime


class OrganizationList(Response):
    organizations: list[Organization]
    count: int


class CreateOrganizationRequest(Request):
    name: OrgName
    display_name: str = Field("", max_length=128)
    description: str = Field("", max_length=1024)


class UpdateOrganizationRequest(Request):
    display_name: str | None = Field(None, max_length=128)
    description: str | None = Field(None, max_length=1024)


class OrganizationMember(Response):
    user_id: str
    username: str
    roles: list[str]
    implicit: bool = Field(description="a member of the default organization by being a user")


class OrganizationMemberList(Response):
    members: list[OrganizationMember]
    count: int


class UpdateMemberRequest(Request):
    roles: list[OrgRoleName] = Field(default_factory=list, max_length=4)


class Group(Response):
    id: str
    organization: str
    name: str
    display_name: str
    source: Literal["manual", "oidc", "everyone"]
    members: list[str] = Field(description="usernames; empty for 'everyone' (all members)")
    created_at: datetime
    updated_at: datetime


class GroupList(Response):
    groups: list[Group]
    count: int


class CreateGroupRequest(Request):
    name: GroupName
    display_name: str = Field("", max_length=128)
    members: list[Username] = Field(default_factory=list, max_length=1000)


class UpdateGroupRequest(Request):
    display_name: str | None = Field(None, max_length=128)
    add_members: list[Username] = Field(default_factory=list, max_length=1000)
    remove_members: list[Username] = Field(default_factory=list, max_length=1000)


class GroupSyncResult(Response):
    """What group sync changed for one user at login."""

    added: list[str]
    removed: list[str]
    created: list[str]


# --- workspaces and builds ----------------------------------------------------------

WORKSPACE_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
WORKSPACE_NAME_HELP = (
    "1-32 characters: lowercase letters, digits and hyphens, starting and ending "
    "with a letter or digit (it becomes a host name)"
)
WorkspaceStatus = Literal[
    "pending",
    "starting",
    "running",
    "stopping",
    "stopped",
    "failed",
    "canceling",
    "canceled",
    "deleting",
    "deleted",
]
Transition = Literal["start", "stop", "delete"]
BuildStatus = Literal["pending", "running", "canceling", "succeeded", "failed", "canceled"]
ParameterValue = bool | int | float | str | list[str]
MAX_PARAMETER_TEXT = 4096
MAX_PARAMETER_ITEMS = 256


def check_parameter_values(values: dict[str, Any]) -> dict[str, Any]:
    """The shape of parameter values (the template decides the rest): a
    string, a number, true/false or a list of strings, of bounded size."""
    for name, value in values.items():
        where = f"parameter {name[:64]!r}"
        if isinstance(value, str):
            if len(value) > MAX_PARAMETER_TEXT:
                raise ValueError(f"{where} is longer than {MAX_PARAMETER_TEXT} characters")
        elif isinstance(value, bool | int):
            continue
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{where} must be a finite number")
        elif isinstance(value, list):
            if len(value) > MAX_PARAMETER_ITEMS:
                raise ValueError(f"{where} has more than {MAX_PARAMETER_ITEMS} items")
            if not all(isinstance(v, str) and len(v) <= MAX_PARAMETER_TEXT for v in value):
                raise ValueError(
                    f"{where} must be a list of strings of at most {MAX_PARAMETER_TEXT} characters"
                )
        else:
            raise ValueError(f"{where} must be a string, a number, true/false or a list of strings")
    return values


class BuildStage(Response):
    name: str
    started_at: datetime
    finished_at: datetime | None = None
    seconds: float | None = None


class WorkspaceBuild(Response):
    id: str
    workspace_id: str
    workspace_name: str
    owner_name: str
    number: int
    transition: Transition
    restart: bool = Field(description="a stop that queues a start when it succeeds")
    status: BuildStatus
    reason: str | None = Field(None, description="why it failed or was canceled (a short label)")
    error: str | None = Field(None, description="what went wrong, for the user")
    initiator_id: str
    initiator_name: str
    template_version_id: str
    template_version: int
    parameters: dict[str, Any]
    stages: list[BuildStage]
    attempts: int
    worker_name: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WorkspaceBuildList(Response):
    builds: list[WorkspaceBuild]


class WorkspaceResource(Response):
    """A resource a Terraform template's last build left in its state."""

    address: str = Field(description="e.g. docker_container.workspace[0]")
    type: str
    name: str
    tainted: bool = Field(False, description="its create failed; the next apply replaces it")


class Workspace(Response):
    id: str
    name: str
    owner_id: str
    owner_name: str
    organization: str = Field(description="its template's organization")
    template_id: str
    template_name: str
    template_version_id: str
    template_version: int
    outdated: bool = Field(description="the template has another active version")
    backend: str
    status: WorkspaceStatus
    parameters: dict[str, Any]
    compute_status: str | None = Field(
        None, description="what the reconciler last saw: running, stopped or missing"
    )
    compute_detail: str | None = None
    created_at: datetime
    updated_at: datetime
    latest_build: WorkspaceBuild
    agent: WorkspaceAgent | None = Field(
        None, description="the agent of the latest start build, while it is not revoked"
    )
    resources: list[WorkspaceResource] = Field(
        default_factory=list,
        description="terraform: the managed resources in the state its last build left",
    )
    resource_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="terraform: the template's stockade_metadata output (shown with resources)",
    )


class AgentMetadataItem(Response):
    key: str
    display_name: str = ""
    value: str
    error: str | None = None
    collected_at: datetime


class AgentStats(Response):
    streams_open: dict[str, int] = Field(default_factory=dict, description="by kind")
    streams_total: dict[str, int] = Field(default_factory=dict, description="by kind")
    bytes_in: int = Field(0, description="bytes from clients into the workspace")
    bytes_out: int = Field(0, description="bytes from the workspace to clients")


class WorkspaceAgent(Response):
    id: str
    status: Literal["connecting", "connected", "disconnected"] = Field(
        description="connecting: never connected yet"
    )
    lifecycle_state: Literal[
        "created", "starting", "ready", "start_error", "start_timeout", "shutting_down", "off"
    ]
    version: str | None = None
    hostname: str | None = None
    os: str | None = None
    arch: str | None = None
    python: str | None = None
    created_at: datetime
    first_connected_at: datetime | None = None
    last_connected_at: datetime | None = None
    disconnected_at: datetime | None = None
    last_seen_at: datetime | None = None
    ready_at: datetime | None = None
    replica: str | None = Field(
        default=None,
        description="the control-plane replica holding the agent's connection (its id in the "
        "health API's replicas)",
    )
    metadata: list[AgentMetadataItem] = Field(default_factory=list)
    stats: AgentStats | None = Field(
        default=None, description="the agent's tunnel stream counters, as last reported"
    )


class WorkspaceSSHInfo(Response):
    workspace_id: str
    owner: str
    name: str
    host_key_algorithm: str
    host_public_key: str = Field(description="OpenSSH format: 'ssh-ed25519 AAAA...'")


class WorkspaceConnection(Response):
    id: str
    kind: Literal["ssh", "port", "app", "pty"]
    target: str | None = Field(None, description="the port, or the app's slug")
    username: str | None = None
    ip: str | None = None
    opened_at: datetime
    closed_at: datetime | None = None
    bytes_to_workspace: int = 0
    bytes_from_workspace: int = 0
    close_code: int | None = None
    close_reason: str | None = None


class WorkspaceConnectionList(Response):
    connections: list[WorkspaceConnection]


AppShare = Literal["owner", "authenticated", "public"]


class WorkspaceApp(Response):
    """A web app of a workspace's template, as the app proxy serves it."""

    slug: str
    display_name: str
    icon: str | None = None
    subdomain: bool = Field(description="the template asks for its own origin")
    url: str | None = Field(
        None, description="where to open it: the subdomain URL when there is one, else the path"
    )
    path_url: str = Field(description="/@USER/WORKSPACE/apps/SLUG/ on the dashboard's origin")
    subdomain_url: str | None = Field(
        None, description="SLUG--WORKSPACE--USER under the wildcard access URL; null without one"
    )
    share: AppShare = Field(description="the template's share level")
    effective_share: AppShare = Field(
        description="the share level in force (capped by the server's max_app_share_level)"
    )
    health: Literal["disabled", "initializing", "healthy", "unhealthy"] = Field(
        description="disabled: no health check; initializing: not checked (or reported) yet"
    )


class WorkspaceAppList(Response):
    apps: list[WorkspaceApp]


class AgentLogLine(Response):
    id: int
    time: datetime
    line: str


class AgentLogList(Response):
    logs: list[AgentLogLine]
    lifecycle_state: str | None = None


class WorkspaceList(Response):
    workspaces: list[Workspace]
    count: int


class CreateWorkspaceRequest(Request):
    name: str = Field(
        pattern=WORKSPACE_NAME_PATTERN, min_length=1, max_length=32, description=WORKSPACE_NAME_HELP
    )
    template: str = Field(min_length=1, max_length=64, description="template name")
    organization: str | None = Field(
        None,
        max_length=32,
        description="the template's organization, when the name is in more than one",
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        max_length=256,
        description="parameter values by name (string, number, true/false or list of "
        "strings); defaults fill the rest",
    )
    owner: str | None = Field(
        None, max_length=32, description="create it for another user (owners and user-admins)"
    )

    _parameters = field_validator("parameters")(check_parameter_values)


class CreateBuildRequest(Request):
    transition: Literal["start", "stop", "delete", "restart"]
    update: bool = Field(
        False, description="start: build on the template's active version (an update)"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        max_length=256,
        description="start or restart: new values for mutable parameters",
    )
    cancel_running: bool = Field(
        False, description="cancel the unfinished build instead of refusing with 409"
    )

    _parameters = field_validator("parameters")(check_parameter_values)


class BuildLogLine(Response):
    id: int
    time: datetime
    stage: str
    level: Literal["info", "warn", "error"]
    line: str


class BuildLogList(Response):
    logs: list[BuildLogLine]
    build_status: BuildStatus


# --- provisioner keys and the provisioner daemon's protocol -------------------------

PROVISIONER_KEY_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"


class ProvisionerKey(Response):
    id: str
    name: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None = None


class ProvisionerKeyList(Response):
    keys: list[ProvisionerKey]


class CreateProvisionerKeyRequest(Request):
    name: str = Field(
        pattern=PROVISIONER_KEY_NAME_PATTERN,
        min_length=1,
        max_length=64,
        description="lowercase letters, digits and hyphens",
    )


class CreatedProvisionerKey(ProvisionerKey):
    key: str = Field(description="the secret; shown once")


class AcquireJobRequest(Request):
    worker_id: str = Field(min_length=1, max_length=64)
    worker_name: str = Field("", max_length=128)
    backends: list[Literal["local", "docker", "terraform", "kubernetes"]] = Field(min_length=1)


class ProvisionerJob(Response):
    """A leased build, with what a worker needs to run it."""

    build_id: str
    build_number: int
    transition: Transition
    workspace_id: str
    workspace_name: str
    owner_id: str
    owner_name: str
    deployment_id: str
    template_name: str
    template_version: int
    manifest: dict[str, Any]
    parameters: dict[str, Any]
    state: dict[str, Any]
    access_url: str
    lease_seconds: int
    timeout_seconds: int
    archive_sha256: str
    agent_token: str | None = Field(
        None, description="start builds: the new agent's token (the workspace's compute gets it)"
    )
    agent_bundle_sha256: str | None = Field(
        None,
        description="the sha256 of the agent bundle the server serves: workspaces pin it, so "
        "a restart runs the cached bundle without a request",
    )
    agent_ca: str | None = Field(
        None,
        description="PEM CA bundle the workspace's agent trusts for the control plane (its "
        "certificate is from a private CA); the backend installs it in the workspace",
    )


class JobHeartbeat(Response):
    cancel: bool = Field(description="the build was canceled: stop working on it")


class JobLogLine(Request):
    stage: str = Field("", max_length=128)
    level: Literal["info", "warn", "error"] = "info"
    line: str = Field(max_length=65536)


class JobLogs(Request):
    worker_id: str = Field(min_length=1, max_length=64)
    stage_started: str | None = Field(None, max_length=128, description="a stage began")
    lines: list[JobLogLine] = Field(default_factory=list, max_length=1000)


class CompleteJobRequest(Request):
    worker_id: str = Field(min_length=1, max_length=64)
    status: Literal["succeeded", "failed", "canceled"]
    state: dict[str, Any] | None = Field(None, description="the backend's new state")
    reason: str | None = Field(None, max_length=64)
    error: str | None = Field(None, max_length=8192)


class JobHeartbeatRequest(Request):
    worker_id: str = Field(min_length=1, max_length=64)
