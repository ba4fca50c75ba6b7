"""A synchronous, typed client over httpx. One method per API operation; every
non-2xx answer raises ``ApiError`` carrying the server's message."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from stockade.sdk import types
from stockade.sdk.tls import CaFileError, client_ssl_context

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """The server refused: ``message`` is meant for the user."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str = "",
        request_id: str | None = None,
        detail: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.request_id = request_id
        # Per-field problems when the server gives them (parameters, manifest lines).
        self.detail = detail or []


class ConnectionFailed(Exception):
    """The server could not be reached at all."""


def _seg(value: str) -> str:
    """One path segment: a name like "a/../audit" must not become a path."""
    return quote(value, safe="")


def _params(**values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = value.isoformat() if isinstance(value, datetime) else value
    return out


class Client:
    """Request bodies are not validated here: the server checks them and its
    messages say what to fix, so every client gets the same answer."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        """``ca_file``: a PEM CA bundle to trust besides the system's (a
        server with a private CA); default ``$STOCKADE_CA_FILE``. Raises
        ``ConnectionFailed`` when it cannot be used."""
        self.url = url.rstrip("/")
        self.token = token
        verify: ssl.SSLContext | bool = True
        if self.url.startswith("https://"):
            try:
                verify = client_ssl_context(ca_file)
            except CaFileError as exc:
                raise ConnectionFailed(str(exc)) from None
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, transport=transport, trust_env=False, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method, path, json=json_body, params=params, headers=self._headers()
            )
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _get(self, path: str, response_model: type[M], /, **params: Any) -> M:
        # Positional-only: a query parameter may be called "model" (AI bridge filters).
        answer = self.request("GET", path, params=_params(**params))
        return response_model.model_validate(answer.json())

    def _send(
        self,
        method: str,
        path: str,
        model: type[M],
        body: BaseModel | None = None,
        **params: Any,
    ) -> M:
        payload = body.model_dump(exclude_none=True) if body is not None else None
        response = self.request(method, path, json_body=payload, params=_params(**params))
        return model.model_validate(response.json())

    # --- deployment ------------------------------------------------------------

    def buildinfo(self) -> types.BuildInfo:
        return self._get("/api/v2/buildinfo", types.BuildInfo)

    def health(self) -> types.Health:
        return self._get("/api/v2/debug/health", types.Health)

    def egress_report(self) -> types.EgressReport:
        return self._get("/api/v2/deployment/egress", types.EgressReport)

    # --- identity --------------------------------------------------------------

    def auth_methods(self) -> types.AuthMethods:
        """How users may sign in here (password; single sign-on and its label)."""
        return self._get("/api/v2/users/authmethods", types.AuthMethods)

    def first_user_required(self) -> bool:
        return self._get("/api/v2/users/first", types.FirstUserStatus).first_user_required

    def create_first_user(
        self, username: str, email: str, password: str, name: str = ""
    ) -> types.User:
        body = types.FirstUserRequest.model_construct(
            username=username, email=email, password=password, name=name
        )
        return self._send("POST", "/api/v2/users/first", types.User, body)

    def login(self, username: str, password: str) -> types.LoginResponse:
        """Sign in and use the new session for later calls."""
        body = types.LoginRequest.model_construct(username=username, password=password)
        result = self._send("POST", "/api/v2/users/login", types.LoginResponse, body)
        self.token = result.session_token
        return result

    def logout(self) -> None:
        self.request("POST", "/api/v2/users/logout")
        self.token = None

    def me(self) -> types.User:
        return self.get_user("me")

    # --- users -----------------------------------------------------------------

    def list_users(
        self, *, q: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> types.UserList:
        return self._get(
            "/api/v2/users", types.UserList, q=q, status=status, limit=limit, offset=offset
        )

    def create_user(
        self,
        username: str,
        email: str,
        password: str,
        *,
        name: str = "",
        roles: list[types.RoleName] | None = None,
    ) -> types.User:
        body = types.CreateUserRequest.model_construct(
            username=username, email=email, password=password, name=name, roles=roles or []
        )
        return self._send("POST", "/api/v2/users", types.User, body)

    def get_user(self, user: str) -> types.User:
        return self._get(f"/api/v2/users/{_seg(user)}", types.User)

    def suspend_user(self, user: str) -> types.User:
        return self._send("PUT", f"/api/v2/users/{_seg(user)}/status/suspend", types.User)

    def activate_user(self, user: str) -> types.User:
        return self._send("PUT", f"/api/v2/users/{_seg(user)}/status/activate", types.User)

    def set_roles(self, user: str, roles: list[types.RoleName]) -> types.User:
        body = types.UpdateRolesRequest.model_construct(roles=roles)
        return self._send("PUT", f"/api/v2/users/{_seg(user)}/roles", types.User, body)

    def change_password(self, user: str, password: str, old_password: str | None = None) -> None:
        body = types.UpdatePasswordRequest.model_construct(
            password=password, old_password=old_password
        )
        self.request(
            "PUT",
            f"/api/v2/users/{_seg(user)}/password",
            json_body=body.model_dump(exclude_none=True),
        )

    def delete_user(self, user: str) -> None:
        self.request("DELETE", f"/api/v2/users/{_seg(user)}")

    # --- tokens ----------------------------------------------------------------

    def create_token(
        self, name: str, *, lifetime_seconds: int | None = None, user: str = "me"
    ) -> types.CreatedToken:
        body = types.CreateTokenRequest.model_construct(
            name=name, lifetime_seconds=lifetime_seconds
        )
        return self._send("POST", f"/api/v2/users/{_seg(user)}/tokens", types.CreatedToken, body)

    def list_tokens(self, user: str = "me") -> list[types.Token]:
        return self._get(f"/api/v2/users/{_seg(user)}/tokens", types.TokenList).tokens

    def revoke_token(self, token: str, user: str = "me") -> None:
        self.request("DELETE", f"/api/v2/users/{_seg(user)}/tokens/{_seg(token)}")

    # --- templates -------------------------------------------------------------

    # ``org`` names a template's organization when its name is in more than
    # one (for a push of a new template: where it goes).

    @staticmethod
    def _tpl(name: str, suffix: str = "") -> str:
        return f"/api/v2/templates/{_seg(name)}{suffix}"

    def list_templates(
        self, *, include_archived: bool = False, org: str | None = None
    ) -> types.TemplateList:
        return self._get(
            "/api/v2/templates",
            types.TemplateList,
            include_archived=include_archived or None,
            org=org,
        )

    def get_template(self, name: str, *, org: str | None = None) -> types.Template:
        return self._get(self._tpl(name), types.Template, org=org)

    def list_template_versions(
        self, name: str, *, org: str | None = None
    ) -> list[types.TemplateVersion]:
        return self._get(self._tpl(name, "/versions"), types.TemplateVersionList, org=org).versions

    def push_template(
        self,
        name: str,
        archive: bytes,
        *,
        activate: bool = True,
        message: str = "",
        org: str | None = None,
    ) -> types.TemplateVersion:
        """Upload a ``.tar.gz`` (see ``stockade.sdk.templates.build_archive``)."""
        params = _params(activate=str(activate).lower(), message=message, org=org)
        try:
            response = self._http.post(
                self._tpl(name, "/versions"),
                content=archive,
                params=params,
                headers={**self._headers(), "Content-Type": "application/gzip"},
            )
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return types.TemplateVersion.model_validate(response.json())

    def download_template_version(self, name: str, number: int, *, org: str | None = None) -> bytes:
        path = self._tpl(name, f"/versions/{int(number)}/archive")
        return self.request("GET", path, params=_params(org=org)).content

    def set_active_template_version(
        self, name: str, number: int, *, org: str | None = None
    ) -> types.Template:
        body = types.ActivateTemplateVersionRequest.model_construct(version=number)
        return self._send("PUT", self._tpl(name, "/active"), types.Template, body, org=org)

    def archive_template(self, name: str, *, org: str | None = None) -> types.Template:
        return self._send("POST", self._tpl(name, "/archive"), types.Template, org=org)

    def template_acl(self, name: str, *, org: str | None = None) -> types.TemplateAcl:
        return self._get(self._tpl(name, "/acl"), types.TemplateAcl, org=org)

    def update_template_acl(
        self,
        name: str,
        *,
        users: dict[str, types.TemplateRole | None] | None = None,
        groups: dict[str, types.TemplateRole | None] | None = None,
        org: str | None = None,
    ) -> types.TemplateAcl:
        """Set (``use``/``admin``) or remove (``None``) ACL entries."""
        payload = {"users": users or {}, "groups": groups or {}}
        response = self.request(
            "PATCH", self._tpl(name, "/acl"), json_body=payload, params=_params(org=org)
        )
        return types.TemplateAcl.model_validate(response.json())

    # --- organizations and groups ------------------------------------------------

    @staticmethod
    def _org(org: str, suffix: str = "") -> str:
        return f"/api/v2/organizations/{_seg(org)}{suffix}"

    def list_organizations(self) -> types.OrganizationList:
        return self._get("/api/v2/organizations", types.OrganizationList)

    def create_organization(
        self, name: str, *, display_name: str = "", description: str = ""
    ) -> types.Organization:
        body = types.CreateOrganizationRequest.model_construct(
            name=name, display_name=display_name, description=description
        )
        return self._send("POST", "/api/v2/organizations", types.Organization, body)

    def get_organization(self, org: str) -> types.Organization:
        return self._get(self._org(org), types.Organization)

    def delete_organization(self, org: str) -> None:
        self.request("DELETE", self._org(org))

    def list_members(self, org: str) -> types.OrganizationMemberList:
        return self._get(self._org(org, "/members"), types.OrganizationMemberList)

    def set_member(
        self, org: str, user: str, roles: list[types.OrgRoleName] | None = None
    ) -> types.OrganizationMember:
        """Add ``user`` to ``org``, or set their org roles."""
        body = types.UpdateMemberRequest.model_construct(roles=roles or [])
        path = self._org(org, f"/members/{_seg(user)}")
        return self._send("PUT", path, types.OrganizationMember, body)

    def remove_member(self, org: str, user: str) -> None:
        self.request("DELETE", self._org(org, f"/members/{_seg(user)}"))

    def list_groups(self, org: str) -> types.GroupList:
        return self._get(self._org(org, "/groups"), types.GroupList)

    def get_group(self, org: str, name: str) -> types.Group:
        return self._get(self._org(org, f"/groups/{_seg(name)}"), types.Group)

    def create_group(
        self, org: str, name: str, *, display_name: str = "", members: list[str] | None = None
    ) -> types.Group:
        body = types.CreateGroupRequest.model_construct(
            name=name, display_name=display_name, members=members or []
        )
        return self._send("POST", self._org(org, "/groups"), types.Group, body)

    def update_group(
        self,
        org: str,
        name: str,
        *,
        display_name: str | None = None,
        add: list[str] | None = None,
        remove: list[str] | None = None,
    ) -> types.Group:
        body = types.UpdateGroupRequest.model_construct(
            display_name=display_name, add_members=add or [], remove_members=remove or []
        )
        return self._send("PATCH", self._org(org, f"/groups/{_seg(name)}"), types.Group, body)

    def delete_group(self, org: str, name: str) -> None:
        self.request("DELETE", self._org(org, f"/groups/{_seg(name)}"))

    # --- workspaces --------------------------------------------------------------

    @staticmethod
    def _ws(owner: str, name: str) -> str:
        return f"/api/v2/workspaces/{_seg(owner)}/{_seg(name)}"

    def list_workspaces(self, *, owner: str | None = None) -> types.WorkspaceList:
        return self._get("/api/v2/workspaces", types.WorkspaceList, owner=owner)

    def create_workspace(
        self,
        name: str,
        template: str,
        parameters: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
        org: str | None = None,
    ) -> types.Workspace:
        body = types.CreateWorkspaceRequest.model_construct(
            name=name, template=template, parameters=parameters or {}, owner=owner, organization=org
        )
        return self._send("POST", "/api/v2/workspaces", types.Workspace, body)

    def get_workspace(self, owner: str, name: str) -> types.Workspace:
        return self._get(self._ws(owner, name), types.Workspace)

    def workspace_ssh(self, owner: str, name: str) -> types.WorkspaceSSHInfo:
        """The workspace's SSH host public key (stable for its life)."""
        return self._get(f"{self._ws(owner, name)}/ssh", types.WorkspaceSSHInfo)

    def workspace_connections(
        self, owner: str, name: str, *, limit: int = 100
    ) -> list[types.WorkspaceConnection]:
        """The workspace's recent connections, newest first."""
        path = f"{self._ws(owner, name)}/connections?limit={limit}"
        return self._get(path, types.WorkspaceConnectionList).connections

    def list_builds(self, owner: str, name: str) -> list[types.WorkspaceBuild]:
        return self._get(f"{self._ws(owner, name)}/builds", types.WorkspaceBuildList).builds

    def get_build(self, owner: str, name: str, number: int) -> types.WorkspaceBuild:
        return self._get(f"{self._ws(owner, name)}/builds/{number}", types.WorkspaceBuild)

    def create_build(
        self,
        owner: str,
        name: str,
        transition: Literal["start", "stop", "restart", "delete"],
        *,
        update: bool = False,
        parameters: dict[str, Any] | None = None,
        cancel_running: bool = False,
    ) -> types.WorkspaceBuild:
        """Queue start, stop, restart or delete (see the API for each)."""
        body = types.CreateBuildRequest.model_construct(
            transition=transition,
            update=update,
            parameters=parameters or {},
            cancel_running=cancel_running,
        )
        return self._send("POST", f"{self._ws(owner, name)}/builds", types.WorkspaceBuild, body)

    def cancel_build(self, owner: str, name: str, number: int) -> types.WorkspaceBuild:
        return self._send(
            "POST", f"{self._ws(owner, name)}/builds/{number}/cancel", types.WorkspaceBuild
        )

    def build_logs(
        self, owner: str, name: str, *, build: int | None = None, after: int = 0
    ) -> types.BuildLogList:
        return self._get(
            f"{self._ws(owner, name)}/logs", types.BuildLogList, build=build, after=after
        )

    def follow_build_logs(
        self, owner: str, name: str, *, build: int | None = None, after: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Events as the server sends them: ``{"type": "log", ...}`` lines,
        then one ``{"type": "end", "status": ...}``."""
        params = _params(build=build, after=after, follow="true")
        try:
            with self._http.stream(
                "GET",
                f"{self._ws(owner, name)}/logs",
                params=params,
                headers=self._headers(),
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"lost the log stream from {self.url}: {exc}") from exc

    def agent_logs(self, owner: str, name: str, *, after: int = 0) -> types.AgentLogList:
        """The startup script output the workspace's agent reported."""
        return self._get(f"{self._ws(owner, name)}/agent/logs", types.AgentLogList, after=after)

    # --- provisioner keys ------------------------------------------------------------

    def list_provisioner_keys(self) -> list[types.ProvisionerKey]:
        return self._get("/api/v2/provisioner-keys", types.ProvisionerKeyList).keys

    def create_provisioner_key(self, name: str) -> types.CreatedProvisionerKey:
        body = types.CreateProvisionerKeyRequest.model_construct(name=name)
        return self._send("POST", "/api/v2/provisioner-keys", types.CreatedProvisionerKey, body)

    def delete_provisioner_key(self, name: str) -> None:
        self.request("DELETE", f"/api/v2/provisioner-keys/{_seg(name)}")

    # --- audit -----------------------------------------------------------------

    def list_audit(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> types.AuditList:
        return self._get("/api/v2/audit", types.AuditList, limit=limit, offset=offset, **filters)

    def verify_audit(self) -> types.AuditVerification:
        return self._get("/api/v2/audit/verify", types.AuditVerification)

    def export_audit(self, **filters: Any) -> Iterator[types.AuditEntry]:
        """Stream every matching entry, oldest first."""
        return self._json_lines("/api/v2/audit/export", types.AuditEntry, filters)

    def _json_lines(self, path: str, model: type[M], filters: dict[str, Any]) -> Iterator[M]:
        try:
            with self._http.stream(
                "GET", path, params=_params(**filters), headers=self._headers()
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield model.model_validate_json(line)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {exc}") from exc

    # --- AI bridge ------------------------------------------------------------------

    def list_aibridge(
        self, *, limit: int = 100, offset: int = 0, **filters: Any
    ) -> types.AibridgeInterceptionList:
        """Requests through the AI bridge, newest first (filters: user,
        workspace, provider, model, since, until)."""
        return self._get(
            "/api/v2/aibridge/interceptions",
            types.AibridgeInterceptionList,
            limit=limit,
            offset=offset,
            **filters,
        )

    def get_aibridge(self, interception_id: str) -> types.AibridgeInterception:
        return self._get(
            f"/api/v2/aibridge/interceptions/{_seg(interception_id)}", types.AibridgeInterception
        )

    def export_aibridge(self, **filters: Any) -> Iterator[types.AibridgeInterception]:
        """Stream every matching record, oldest first."""
        return self._json_lines(
            "/api/v2/aibridge/interceptions/export", types.AibridgeInterception, filters
        )


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {}
    if not isinstance(body, dict) or "message" not in body:
        return ApiError(
            response.status_code,
            f"HTTP {response.status_code} from {response.request.url}",
        )
    return ApiError(
        response.status_code,
        str(body["message"]),
        str(body.get("reason", "")),
        body.get("request_id"),
        body.get("detail") if isinstance(body.get("detail"), list) else None,
    )
