"""The one settings object of the control plane.

Every setting is read, in increasing priority, from its default, the optional
config file (TOML, ``--config`` / ``STOCKADE_CONFIG``), ``STOCKADE_*``
environment variables and command-line flags. ``stockade server --help`` is
generated from the field descriptions below, so the help text lives here only.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import typing
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from stockade.egress import EgressPolicy
from stockade.provisioner.backends import NAMES as BACKEND_NAMES
from stockade.provisioner.terraform.cli import OPENTOFU_MINIMUM, TERRAFORM_MINIMUM
from stockade.sdk.paths import default_data_dir
from stockade.sdk.types import RoleName


def read_ca_bundle(path: Path) -> str:
    """The PEM text of a CA bundle file; ``ValueError`` saying what is wrong
    when it cannot be read or holds no usable certificate."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the CA bundle {path}: {exc}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path} is not a PEM CA bundle (no BEGIN CERTIFICATE line)")
    try:
        ssl.create_default_context().load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise ValueError(f"{path} is not a valid PEM CA bundle: {exc}") from None
    return text


def _json_object(value: str, name: str, example: str) -> dict[str, typing.Any]:
    """A setting holding a JSON object ("" is an empty one); ``ValueError``
    naming the setting and showing an example when it is not one."""
    if not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}); expected e.g. {example}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, e.g. {example}")
    return parsed


def _own_host(listen_host: str) -> str:
    """The host other replicas reach this one at: the listening address, or
    when it listens on every interface, the address this host's name has in
    /etc/hosts (a Pod's or a container's own IP), else the name itself."""
    if listen_host not in ("0.0.0.0", "::", "[::]", ""):
        return listen_host
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return name
    return name if address.startswith("127.") else address


class Settings(BaseSettings):
    """Control-plane settings. Field descriptions double as ``--help`` text."""

    model_config = SettingsConfigDict(env_prefix="STOCKADE_", extra="forbid", validate_default=True)

    address: str = Field(
        "127.0.0.1:7080",
        description="HOST:PORT the server listens on. Use 0.0.0.0:PORT to listen on all "
        "interfaces (for example so workspace containers can reach it).",
    )
    access_url: str = Field(
        "",
        description="The URL users and workspace agents use to reach this server. "
        "Defaults to http://ADDRESS.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) the server serves https with; needs "
        "tls_key_file. The access URL must then be https (the default becomes "
        "https://ADDRESS).",
    )
    tls_key_file: Path | None = Field(
        None, description="PEM private key of tls_cert_file (keep it readable by the server only)."
    )
    redirect_http_address: str = Field(
        "",
        description="HOST:PORT to also listen on with plain HTTP, answering every request "
        "with a permanent redirect (308) to the same path under the access URL, for users "
        "who type http://. Needs tls_cert_file. Empty: off.",
    )
    agent_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle that workspaces' agents trust for the control plane, when "
        "its certificate is from a private CA; the backends install it in every workspace.",
    )
    agent_url: str = Field(
        "",
        description="URL workspaces' agents use to reach this server; default: the access URL, "
        "or for docker workspaces on a loopback access URL the Docker network's gateway (the "
        "server then also listens on that gateway address, same port).",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for the embedded database and workspace data.",
    )
    postgres_url: str = Field(
        "",
        description="PostgreSQL URL (postgresql://user:pass@host:port/db). Empty: an "
        "embedded SQLite database in the data directory.",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    log_json: bool = Field(
        True, description="Write logs as JSON lines (false: human-readable console lines)."
    )
    session_lifetime_seconds: int = Field(
        24 * 3600,
        ge=60,
        description="Browser/CLI sessions expire after this many seconds without use "
        "(sliding expiry: every use extends the session).",
    )
    max_token_lifetime_seconds: int = Field(
        30 * 24 * 3600,
        ge=60,
        description="The longest lifetime an API token may be created with.",
    )
    default_token_lifetime_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Lifetime of an API token when none is asked for."
    )
    login_rate_per_ip: int = Field(
        30, ge=1, description="Login attempts allowed per client IP per minute."
    )
    login_failures_per_user: int = Field(
        10,
        ge=1,
        description="Failed logins allowed per username in 15 minutes before further "
        "attempts for that username are refused with 429.",
    )
    audit_retention_days: int = Field(
        0,
        ge=0,
        description="Purge audit entries older than this many days (0: keep for ever). "
        "Purging keeps the remaining chain verifiable.",
    )
    secure_cookies: bool | None = Field(
        None,
        description="Mark session cookies Secure. Default: on when the access URL is https.",
    )
    audit_key: str = Field(
        "",
        description="Secret key of the audit log's HMAC chain. Empty: a random key is "
        "created in DATA_DIR/audit.key. Keep it away from the database (whoever has both can "
        "rewrite history); replicas must all use the same one.",
    )
    egress_allow: str = Field(
        "",
        description="Comma-separated destinations the server, its build workers and workspace "
        "agents may connect to beyond loopback and the private networks: IP addresses, CIDR "
        "networks (10.20.0.0/16), host names (idp.corp.internal) or *.domain. The hosts of "
        "the access URL, agent URL and PostgreSQL URL are always allowed. Everything else is "
        "refused in-process and shows as denied in `stockade egress report`.",
    )
    egress_allow_private_networks: bool = Field(
        True,
        description="Allow the private networks (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "
        "fc00::/7) without listing them. False: only loopback and egress_allow.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated IPs of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto headers are believed (for client IPs in the audit log and rate "
        "limits). Empty: none; the peer address is the client.",
    )
    db_pool_size: int = Field(
        20,
        ge=1,
        description="Database connections kept open. Size it to the concurrent requests you "
        "expect: connections beyond it (at most 4 more) are opened and closed per use.",
    )

    provisioner_workers: int = Field(
        3,
        ge=0,
        le=64,
        description="Build workers run inside the server. 0: builds only run on external "
        "`stockade provisionerd` daemons.",
    )
    provisioner_backends: str = Field(
        "local,docker",
        description="Comma-separated backends the built-in workers serve (local, docker, "
        "terraform). terraform is not served by default: a Terraform template's commands "
        "would run as the server's user, able to read its data directory; give terraform "
        "builds a `stockade provisionerd --backend terraform` on a host of their own, or add "
        "it here knowingly. "
        "Builds of other backends wait for a provisionerd that serves them.",
    )
    replica_heartbeat_seconds: float = Field(
        10.0,
        ge=0.2,
        le=300,
        description="How often this server renews its row among the deployment's replicas; "
        "a replica silent for three intervals is dropped from the list.",
    )
    replica_url: str = Field(
        "",
        description="The URL the other replicas reach this one at directly, not through the "
        "load balancer (in Kubernetes: http://$(POD_IP):PORT). A client connected to one "
        "replica reaches an agent connected to another through it, authenticated with a key "
        "derived from the audit key. Defaults to http(s)://ADDRESS, with this host's name "
        "when ADDRESS listens on every interface.",
    )
    build_timeout_seconds: int = Field(
        1800, ge=10, description="A build running longer than this is canceled."
    )
    job_lease_seconds: int = Field(
        15,
        ge=3,
        le=3600,
        description="How long a worker holds a build without a heartbeat. When a worker dies, "
        "its build is retried (or failed) this long after its last heartbeat.",
    )
    reconcile_interval_seconds: int = Field(
        30,
        ge=1,
        description="How often the server looks for orphaned compute (containers, volumes, "
        "processes whose workspace is gone) and for workspaces whose compute died.",
    )
    local_allow_unsandboxed: bool = Field(
        False,
        description="Allow local workspaces without bubblewrap (bwrap): they then run as plain "
        "processes of the server's user, and the server warns at every start. Install "
        "bubblewrap instead when you can.",
    )
    docker_host: str = Field(
        "",
        description="Docker Engine API URL for docker workspaces (unix:///var/run/docker.sock, "
        "tcp://HOST:2376...). Empty: $DOCKER_HOST or the local socket.",
    )
    docker_network: str = Field(
        "",
        description="Docker network that workspace containers join. Empty: a bridge network "
        "named stockade-<deployment id>, created when missing.",
    )
    terraform_binary: str = Field(
        "terraform",
        description="The Terraform or OpenTofu CLI that terraform templates run: a command on "
        "$PATH (terraform, tofu) or a path. Its version is checked at the first build (Terraform "
        f"{TERRAFORM_MINIMUM} or OpenTofu {OPENTOFU_MINIMUM} at least) and shown in every build "
        "log.",
    )
    kubernetes_config: str = Field(
        "",
        description="kubeconfig for kubernetes workspaces. Empty: the in-cluster service "
        "account when the server runs in a Pod, else ~/.kube/config.",
    )
    kubernetes_namespace: str = Field(
        "stockade-workspaces",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="The namespace kubernetes workspaces' Pods, volumes and secrets live in.",
    )
    kubernetes_control_plane_cidrs: str = Field(
        "",
        description="Comma-separated address blocks of the control plane, for the "
        "workspaces' NetworkPolicy when Stockade runs outside the cluster (in the cluster, "
        "its Pods are selected by label).",
    )
    terraform_mirror_dir: Path | None = Field(
        None,
        description="The provider mirror terraform builds install providers from (nothing is "
        "ever downloaded). Fill it with `stockade terraform mirror import DIR`. Default: "
        "DATA_DIR/terraform-mirror.",
    )

    wildcard_access_url: str = Field(
        "",
        description="Host pattern for subdomain apps, e.g. *.apps.example.com or "
        "*.apps.localhost (scheme and port come from the access URL; add :PORT when it "
        "differs). Each app gets its own origin SLUG--WORKSPACE--USER.apps.example.com (and "
        "PORT--WORKSPACE--USER for ports), so an app's scripts never run on the dashboard's "
        "origin. The DNS name must resolve to this server. Empty: apps only by path.",
    )
    max_app_share_level: Literal["owner", "authenticated", "public"] = Field(
        "owner",
        description="The widest share level a template's app may have: owner (only the "
        "workspace's owner), authenticated (any signed-in user) or public (anyone, no "
        "sign-in). Apps asking for more get this.",
    )
    dangerous_allow_path_app_sharing: bool = Field(
        False,
        description="Let path-based apps (/@USER/WORKSPACE/apps/SLUG/) be shared beyond their "
        "owner. Dangerous: they run on the dashboard's origin, so a shared app's scripts run "
        "with the visitor's Stockade session and can act as them. Use subdomain apps "
        "(--wildcard-access-url) to share instead.",
    )
    app_token_lifetime_seconds: int = Field(
        8 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the cookie a subdomain app gets after sign-in (scoped to that "
        "one app's host; renewed through the dashboard while the session lasts).",
    )

    oidc_issuer_url: str = Field(
        "",
        description="OpenID Connect single sign-on: the issuer URL of your identity provider "
        "(Keycloak: https://HOST/realms/REALM; Dex: its issuer; ADFS: https://HOST/adfs). "
        "Stockade reads ISSUER/.well-known/openid-configuration. Register "
        "ACCESS_URL/api/v2/users/oidc/callback as the redirect URI. Empty: SSO off.",
    )
    oidc_client_id: str = Field(
        "", description="The client id Stockade has at the identity provider (needed with SSO)."
    )
    oidc_client_secret: SecretStr | None = Field(
        None,
        description="The client secret (never logged or shown). Empty: a public client, "
        "protected by PKCE alone.",
    )
    oidc_scopes: str = Field(
        "openid,profile,email",
        description="Comma-separated scopes to ask for; must include openid. Add the scope that "
        "carries the groups or roles claim when you sync them (e.g. groups).",
    )
    oidc_username_field: str = Field(
        "preferred_username",
        description="The claim a new user's username is taken from (made to fit Stockade's "
        "username rules; a number is added when it is taken). Falls back to the email's "
        "local part.",
    )
    oidc_email_field: str = Field("email", description="The claim holding the user's email.")
    oidc_email_domains: str = Field(
        "",
        description="Comma-separated email domains allowed to sign in with SSO (example.com). "
        "Empty: any.",
    )
    oidc_allow_signups: bool = Field(
        True,
        description="Create a Stockade account at the first SSO sign-in of someone who has "
        "none. False: only existing accounts (linked by verified email) may sign in.",
    )
    oidc_sign_in_text: str = Field(
        "Sign in with SSO",
        max_length=64,
        description="Label of the single sign-on button on the login page.",
    )
    oidc_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle to trust for the identity provider (when its certificate "
        "is from a private CA), besides the system's.",
    )
    oidc_ignore_email_verified: bool = Field(
        False,
        description="Treat every email from the identity provider as verified (for providers "
        "that do not send email_verified). An unverified email never links an existing account "
        "otherwise.",
    )
    disable_password_auth_for_oidc_users: bool = Field(
        False,
        description="Refuse password login for accounts that signed in with SSO (their login "
        "type is oidc): they must use the SSO button.",
    )
    oidc_group_field: str = Field(
        "",
        description="Claim holding the user's groups (e.g. groups). Set: Stockade groups in the "
        "default organization follow it at every SSO login. Empty: group sync off.",
    )
    oidc_group_mapping: str = Field(
        "",
        description="JSON object mapping identity-provider group names to Stockade group names, "
        'e.g. {"idp-devs": "developers"}. Unmapped groups keep their names.',
    )
    oidc_group_regex_filter: str = Field(
        "",
        description="Only identity-provider groups matching this regular expression are synced "
        "(search, so anchor it with ^...$ for a full match). Empty: all.",
    )
    oidc_group_auto_create: bool = Field(
        False,
        description="Create a Stockade group that a synced group names and that does not exist "
        "yet. False: such groups are skipped.",
    )
    oidc_user_role_field: str = Field(
        "",
        description="Claim holding the user's roles at the identity provider. Set: the site roles "
        "that oidc_user_role_mapping names follow it at every SSO login. Empty: role sync off.",
    )
    oidc_user_role_mapping: str = Field(
        "",
        description="JSON object mapping identity-provider role names to lists of site roles, "
        'e.g. {"platform": ["template-admin"], "security": ["auditor"]}. Only the roles it '
        "names are synced; others are left as an administrator set them.",
    )

    aibridge_openai_base_url: str = Field(
        "",
        description="AI bridge: base URL of an internal OpenAI-compatible server, /v1 included "
        "(vLLM: http://HOST:8000/v1; Ollama: http://HOST:11434/v1; LiteLLM...). Users and "
        "workspaces call it through ACCESS_URL/api/v2/aibridge/openai/v1. Empty: off.",
    )
    aibridge_openai_key: SecretStr | None = Field(
        None,
        description="The API key the bridge sends to the OpenAI-compatible server (never shown "
        "to users, never logged). Empty: none sent.",
    )
    aibridge_openai_models: str = Field(
        "",
        description="Comma-separated models (shell patterns: llama-*) callers may use through "
        "the OpenAI-compatible bridge. Empty: any the server offers.",
    )
    aibridge_anthropic_base_url: str = Field(
        "",
        description="AI bridge: base URL of an internal Anthropic-compatible server, without "
        "/v1 (LiteLLM: http://HOST:4000). Users and workspaces call it through "
        "ACCESS_URL/api/v2/aibridge/anthropic. Empty: off.",
    )
    aibridge_anthropic_key: SecretStr | None = Field(
        None,
        description="The API key the bridge sends to the Anthropic-compatible server (never "
        "shown to users, never logged). Empty: none sent.",
    )
    aibridge_anthropic_models: str = Field(
        "",
        description="Comma-separated models (shell patterns) callers may use through the "
        "Anthropic-compatible bridge. Empty: any the server offers.",
    )
    aibridge_timeout_seconds: int = Field(
        300,
        ge=1,
        le=3600,
        description="How long the bridge waits for the upstream's next bytes (the first token "
        "included) before it gives up with a 504.",
    )
    aibridge_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle to trust for HTTPS upstreams with a private CA, besides "
        "the system's.",
    )
    aibridge_requests_per_minute: int = Field(
        60,
        ge=0,
        description="Requests each user may send through the AI bridge per minute; more get "
        "429 with Retry-After. 0: no limit.",
    )
    aibridge_tokens_per_day: int = Field(
        0,
        ge=0,
        description="Tokens (input plus output) each user may use through the AI bridge per "
        "UTC day; once used up, requests get 429 with Retry-After until midnight UTC. "
        "0: no limit.",
    )
    aibridge_group_models: str = Field(
        "",
        description="JSON object: which models (shell patterns) the members of each group may "
        'use, e.g. {"everyone": ["llama-*"], "ml-team": ["*"]}. Set: a user may use a model '
        "only when a group they belong to (in any organization) lists it. Empty: every user "
        "may use every allowed model.",
    )
    aibridge_retention_days: int = Field(
        60,
        ge=0,
        description="AI bridge records (prompts, tool calls, token counts) older than this many "
        "days are deleted, checked hourly. 0: kept forever.",
    )

    @field_validator("wildcard_access_url")
    @classmethod
    def _check_wildcard(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not re.fullmatch(r"\*(\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+(:\d{1,5})?", value):
            raise ValueError(
                f"wildcard_access_url must look like *.apps.example.com[:PORT], not {value!r}"
            )
        return value

    @field_validator("provisioner_backends")
    @classmethod
    def _check_backends(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BACKEND_NAMES))
        if unknown:
            raise ValueError(
                f"unknown backend(s) {', '.join(unknown)}: provisioner_backends takes "
                f"{', '.join(BACKEND_NAMES)}"
            )
        return ",".join(names)

    @field_validator("oidc_issuer_url")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"oidc_issuer_url must be an http:// or https:// URL (the identity provider's "
                f"issuer), not {value!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError("oidc_issuer_url must not have a query or fragment")
        return value

    @field_validator("oidc_scopes")
    @classmethod
    def _check_scopes(cls, value: str) -> str:
        scopes = [s.strip() for s in value.split(",") if s.strip()]
        bad = [s for s in scopes if not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", s)]
        if bad:
            raise ValueError(f"oidc_scopes: {bad[0]!r} is not a valid scope name")
        if "openid" not in scopes:
            raise ValueError("oidc_scopes must include openid (e.g. openid,profile,email)")
        return ",".join(dict.fromkeys(scopes))

    @field_validator("oidc_email_domains")
    @classmethod
    def _check_domains(cls, value: str) -> str:
        domains = [d.strip().lower().removeprefix("@") for d in value.split(",") if d.strip()]
        for domain in domains:
            if not re.fullmatch(
                r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*", domain
            ):
                raise ValueError(
                    f"oidc_email_domains: {domain!r} is not a domain name (e.g. example.com)"
                )
        return ",".join(domains)

    @field_validator("oidc_group_mapping")
    @classmethod
    def _check_group_mapping(cls, value: str) -> str:
        mapping = _json_object(value, "oidc_group_mapping", '{"idp-group": "stockade-group"}')
        for key, name in mapping.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"oidc_group_mapping: the value for {key!r} must be a Stockade group name "
                    f"(a non-empty string), not {json.dumps(name)}"
                )
        return value.strip()

    @field_validator("oidc_group_regex_filter")
    @classmethod
    def _check_group_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"oidc_group_regex_filter is not a valid regular expression: {exc}"
            ) from None
        return value

    @field_validator("oidc_user_role_mapping")
    @classmethod
    def _check_role_mapping(cls, value: str) -> str:
        mapping = _json_object(value, "oidc_user_role_mapping", '{"idp-role": ["auditor"]}')
        known = typing.get_args(RoleName)
        for key, roles in mapping.items():
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ValueError(
                    f"oidc_user_role_mapping: the value for {key!r} must be a list of site "
                    f"roles, not {json.dumps(roles)}"
                )
            unknown = [r for r in roles if r not in known]
            if unknown:
                raise ValueError(
                    f"oidc_user_role_mapping: {unknown[0]!r} (for {key!r}) is not a site role; "
                    f"use {', '.join(known)}"
                )
        return value.strip()

    @field_validator("aibridge_openai_base_url", "aibridge_anthropic_base_url")
    @classmethod
    def _check_aibridge_url(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().rstrip("/")
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{info.field_name} must be an http:// or https:// URL of the model server, "
                f"not {value!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{info.field_name} must not have a query or fragment")
        return value

    @field_validator("aibridge_openai_models", "aibridge_anthropic_models")
    @classmethod
    def _check_aibridge_models(cls, value: str) -> str:
        return ",".join(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))

    @field_validator("aibridge_group_models")
    @classmethod
    def _check_aibridge_group_models(cls, value: str) -> str:
        mapping = _json_object(value, "aibridge_group_models", '{"everyone": ["llama-*"]}')
        for group, models in mapping.items():
            if not isinstance(models, list) or not all(
                isinstance(m, str) and m.strip() for m in models
            ):
                raise ValueError(
                    f"aibridge_group_models: the value for {group!r} must be a list of model "
                    f"names or patterns, not {json.dumps(models)}"
                )
        return value.strip()

    @field_validator("aibridge_ca_file")
    @classmethod
    def _check_aibridge_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                read_ca_bundle(value)
            except ValueError as exc:
                raise ValueError(f"aibridge_ca_file: {exc}") from None
        return value

    def _check_aibridge(self) -> None:
        for provider in ("openai", "anthropic"):
            if not getattr(self, f"aibridge_{provider}_base_url"):
                extra = [
                    name
                    for name in (f"aibridge_{provider}_key", f"aibridge_{provider}_models")
                    if getattr(self, name)
                ]
                if extra:
                    raise ValueError(
                        f"{extra[0]} is set but aibridge_{provider}_base_url is not: that "
                        "upstream is off"
                    )

    @field_validator("oidc_ca_file")
    @classmethod
    def _check_oidc_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                read_ca_bundle(value)
            except ValueError as exc:
                raise ValueError(f"oidc_ca_file: {exc}") from None
        return value

    def _check_oidc(self) -> None:
        if self.oidc_issuer_url and not self.oidc_client_id:
            raise ValueError(
                "oidc_client_id is needed with oidc_issuer_url: the client id Stockade is "
                "registered with at the identity provider"
            )
        if not self.oidc_issuer_url:
            extra = [
                name
                for name in ("oidc_client_id", "oidc_client_secret", "oidc_group_field",
                             "oidc_user_role_field")
                if getattr(self, name)
            ]  # fmt: skip
            if extra:
                raise ValueError(f"{extra[0]} is set but oidc_issuer_url is not: SSO is off")

    @property
    def oidc_enabled(self) -> bool:
        """Whether single sign-on is configured."""
        return bool(self.oidc_issuer_url)

    @property
    def oidc_scope_list(self) -> list[str]:
        return self.oidc_scopes.split(",")

    @property
    def oidc_domain_list(self) -> list[str]:
        return [d for d in self.oidc_email_domains.split(",") if d]

    @property
    def oidc_group_map(self) -> dict[str, str]:
        """``oidc_group_mapping`` parsed (checked at startup)."""
        return _json_object(self.oidc_group_mapping, "", "")

    @property
    def oidc_role_map(self) -> dict[str, list[str]]:
        """``oidc_user_role_mapping`` parsed (checked at startup)."""
        return _json_object(self.oidc_user_role_mapping, "", "")

    @property
    def backend_list(self) -> list[str]:
        return [n for n in self.provisioner_backends.split(",") if n]

    @property
    def egress_policy(self) -> EgressPolicy:
        """The egress allow-list (checked at startup)."""
        own = [
            urlsplit(url).hostname
            # The identity provider's host: SSO logins reach it from the server.
            # and the AI bridge's model servers, which every bridged request reaches.
            for url in (
                self.access_url,
                self.agent_url,
                self.postgres_url,
                self.oidc_issuer_url,
                self.aibridge_openai_base_url,
                self.aibridge_anthropic_base_url,
            )
        ]
        return EgressPolicy.build(
            self.egress_allow.split(","),
            private_networks=self.egress_allow_private_networks,
            own_hosts=[host for host in own if host],
        )

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def provider_mirror_dir(self) -> Path:
        return self.terraform_mirror_dir or self.data_dir / "terraform-mirror"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be HOST:PORT, got {value!r}")
        return value

    @field_validator("redirect_http_address")
    @classmethod
    def _check_redirect_address(cls, value: str) -> str:
        return cls._check_address(value) if value else value

    @field_validator("postgres_url")
    @classmethod
    def _check_postgres_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ValueError("postgres_url must start with postgresql://")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @field_validator("agent_ca_file")
    @classmethod
    def _check_agent_ca(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_ca_bundle(value)
        return value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        tls = self._check_tls()
        self._check_oidc()
        self._check_aibridge()
        if self.redirect_http_address:
            if not tls:
                raise ValueError(
                    "redirect_http_address needs TLS here (tls_cert_file and tls_key_file): "
                    "it redirects plain HTTP to the https access URL"
                )
            if self.redirect_http_address == self.address:
                raise ValueError("redirect_http_address must differ from address")
        self.egress_policy  # noqa: B018 -- a bad allow-list entry stops the server here
        if not self.access_url:
            self.access_url = f"{'https' if tls else 'http'}://{self.address}"
        self.access_url = self.access_url.rstrip("/")
        if urlsplit(self.access_url).scheme not in ("http", "https"):
            raise ValueError("access_url must be an http:// or https:// URL")
        self.agent_url = self.agent_url.rstrip("/")
        if not self.replica_url:
            self.replica_url = f"{'https' if tls else 'http'}://{_own_host(self.host)}:{self.port}"
        self.replica_url = self.replica_url.rstrip("/")
        if urlsplit(self.replica_url).scheme not in ("http", "https"):
            raise ValueError("replica_url must be an http:// or https:// URL")
        if self.agent_url and urlsplit(self.agent_url).scheme not in ("http", "https"):
            raise ValueError("agent_url must be an http:// or https:// URL")
        # An https access URL without TLS here is a TLS-terminating proxy in
        # front; the reverse can only be a mistake: the server speaks https only.
        for name in ("access_url", "agent_url"):
            url = getattr(self, name)
            if tls and url and urlsplit(url).scheme != "https":
                raise ValueError(
                    f"{name} must be https:// when the server serves TLS "
                    f"(tls_cert_file is set), not {url!r}"
                )
        if self.secure_cookies is None:
            self.secure_cookies = self.access_url.startswith("https://")
        if self.default_token_lifetime_seconds > self.max_token_lifetime_seconds:
            self.default_token_lifetime_seconds = self.max_token_lifetime_seconds
        return self

    def _check_tls(self) -> bool:
        """Whether the server serves https; the certificate and key must come
        together and load (a clear error at startup, not at the first client)."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_cert_file is None or self.tls_key_file is None:
            return False
        for path in (self.tls_cert_file, self.tls_key_file):
            if not os.access(path, os.R_OK) or not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.tls_cert_file, self.tls_key_file
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cannot load the TLS certificate {self.tls_cert_file} with the key "
                f"{self.tls_key_file} (PEM files of a matching pair expected): {exc}"
            ) from None
        return True

    @property
    def tls(self) -> bool:
        """Whether the server itself serves https."""
        return self.tls_cert_file is not None

    @property
    def agent_ca_pem(self) -> str | None:
        """The text of ``agent_ca_file`` (checked at startup), or None."""
        return read_ca_bundle(self.agent_ca_file) if self.agent_ca_file is not None else None

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with the async driver chosen for each database."""
        if self.postgres_url:
            rest = self.postgres_url.split("://", 1)[1]
            return f"postgresql+asyncpg://{rest}"
        return f"sqlite+aiosqlite:///{self.data_dir / 'stockade.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("STOCKADE_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)
