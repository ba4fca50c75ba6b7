"""Dashboard pages: admin. Users (list, search, create, a user's status,
roles, password, tokens and deletion), organizations (create, delete, members
and their org-admin role, groups and their members), the audit log (filters,
paging, the chain's verification, the JSON-lines export) and the deployment
(health, build queue and workers, connected agents, effective settings).

Each handler checks the site permission its API route declares (so a member
gets the same 403 as from the API) and then calls the same service, which
decides per object (a user-admin cannot touch an owner...).
"""

from __future__ import annotations

import platform
import re
import socket
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from stockade.sdk import types
from stockade.server.audit import service as audit_service
from stockade.server.audit.api import audit_filter
from stockade.server.authz import ASSIGNABLE_ROLES, Actor, Perm, Role, assignable_roles, can
from stockade.server.deps import AuditDep, Limit, Offset, ServicesDep
from stockade.server.errors import Forbidden, InvalidInput, StockadeError
from stockade.server.orgs.access import standing
from stockade.server.system import service as system_service
from stockade.server.users.service import to_api
from stockade.server.web.core import (
    CSRF_FIELD,
    FormErrors,
    PageActor,
    field,
    read_form,
    redirect,
    render,
)

router = APIRouter(include_in_schema=False)  # pages, not API

ROLE_HELP = {
    Role.OWNER: "Everything: users, templates, the audit log, the deployment.",
    Role.USER_ADMIN: "Manages users, their tokens and workspaces (not owners or auditors).",
    Role.TEMPLATE_ADMIN: "Pushes, activates and archives templates.",
    Role.AUDITOR: "Reads the audit log.",
}
PAGE_SIZE = 50

UserRef = Annotated[str, Path(max_length=64, description="username or user id")]
TokenRef = Annotated[str, Path(max_length=64, description="token id or name")]


def _require(actor: Actor, perm: Perm) -> None:
    """The site permission the page's API route requires (``requires(perm)``)."""
    if not can(actor, perm):
        raise Forbidden(
            f"You do not have permission for this page ({perm.value}). Ask an owner if you "
            "need it.",
            log_message=f"{actor.username} lacks {perm}",
        )


def _roles_of(form: FormData) -> list[str]:
    return [r for r in form.getlist("roles") if isinstance(r, str)]


def _pages(count: int, limit: int, offset: int, params: dict[str, str], base: str) -> Any:
    """Previous/next links that keep the page's other parameters."""

    def link(to: int) -> str:
        query = {k: v for k, v in params.items() if v}
        if limit != PAGE_SIZE:
            query["limit"] = str(limit)
        if to:
            query["offset"] = str(to)
        return base + (f"?{urlencode(query)}" if query else "")

    return {
        "first": offset + 1 if count else 0,
        "last": min(offset + limit, count),
        "count": count,
        "prev": link(max(0, offset - limit)) if offset > 0 else None,
        "next": link(offset + limit) if offset + limit < count else None,
    }


# --- users --------------------------------------------------------------------------


async def _users(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    *,
    q: str = "",
    status: str = "",
    limit: int = PAGE_SIZE,
    offset: int = 0,
    status_code: int = 200,
    **context: object,
) -> Response:
    _require(actor, Perm.USER_READ)
    users, count = await services.users.search(
        actor, q=q or None, status=status or None, limit=limit, offset=offset
    )
    may_assign = assignable_roles(actor)
    return render(
        request,
        "admin/users.html",
        {
            "users": users,
            "q": q,
            "status": status,
            "pages": _pages(count, limit, offset, {"q": q, "status": status}, "/admin/users"),
            "can_create": can(actor, Perm.USER_CREATE),
            "roles": [r for r in ASSIGNABLE_ROLES if r in may_assign],
            "role_help": ROLE_HELP,
            **context,
        },
        status_code=status_code,
    )


@router.get("/admin/users")
async def users_page(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    q: Annotated[str, Query(max_length=128, description="search text")] = "",
    status: Literal["", "active", "suspended"] = "",
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> Response:
    return await _users(request, actor, services, q=q, status=status, limit=limit, offset=offset)


@router.post("/admin/users")
async def create_user(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    form = await read_form(request, actor)
    _require(actor, Perm.USER_CREATE)
    values = {name: field(form, name).strip() for name in ("username", "email", "name")}
    roles = _roles_of(form)
    try:
        body = types.CreateUserRequest(**values, password=field(form, "password"), roles=roles)
        user = await services.users.create(actor, body, record)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        return await _users(
            request, actor, services, status_code=errors.status,
            create_errors=errors, values={**values, "roles": roles},
        )  # fmt: skip
    return redirect(
        f"/admin/users/{quote(user.username)}",
        f"User {user.username} created. Give them their password by a channel you trust.",
    )


async def _user(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    ref: str,
    *,
    status_code: int = 200,
    **context: object,
) -> Response:
    _require(actor, Perm.USER_READ)
    user = to_api(await services.users.get(actor, ref))
    own = {"owner_id": user.id}
    tokens = None
    if can(actor, Perm.API_KEY_READ, **own):
        tokens = await services.auth.list_tokens(actor, user.id)
    may_assign = assignable_roles(actor)
    return render(
        request,
        "admin/user.html",
        {
            "user": user,
            "tokens": tokens,
            "is_self": user.id == actor.user_id,
            "can_update": can(actor, Perm.USER_UPDATE),
            "can_roles": can(actor, Perm.USER_ROLES),
            "can_password": can(actor, Perm.USER_PASSWORD, **own),
            "can_delete": can(actor, Perm.USER_DELETE),
            "can_revoke": can(actor, Perm.API_KEY_DELETE, **own),
            "roles": list(ASSIGNABLE_ROLES),
            "may_assign": may_assign,
            "role_help": ROLE_HELP,
            "base": f"/admin/users/{quote(user.username)}",
            **context,
        },
        status_code=status_code,
    )


@router.get("/admin/users/{username}")
async def user_page(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep
) -> Response:
    return await _user(request, actor, services, username)


async def _user_action(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    username: str,
    perm: Perm,
    section: str,
    notice: str,
    action: Any,
) -> Response:
    """Run ``action(form)`` for a form on the user page; its error is shown
    in the form's ``section`` of the page, its success as a notice."""
    form = await read_form(request, actor)
    _require(actor, perm)
    try:
        target = await action(form)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        return await _user(
            request, actor, services, username,
            status_code=errors.status, **{f"{section}_errors": errors},
        )  # fmt: skip
    return redirect(target or f"/admin/users/{quote(username)}", notice)


@router.post("/admin/users/{username}/suspend")
async def suspend_user(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> None:
        await services.users.set_status(actor, username, "suspended", record)

    notice = f"{username} is suspended: their sessions and tokens stopped working."
    return await _user_action(
        request, actor, services, username, Perm.USER_UPDATE, "status", notice, run
    )


@router.post("/admin/users/{username}/activate")
async def activate_user(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> None:
        await services.users.set_status(actor, username, "active", record)

    notice = f"{username} is active again and can sign in."
    return await _user_action(
        request, actor, services, username, Perm.USER_UPDATE, "status", notice, run
    )


@router.post("/admin/users/{username}/roles")
async def set_roles(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> None:
        body = types.UpdateRolesRequest(roles=_roles_of(form))
        await services.users.set_roles(actor, username, list(body.roles), record)

    notice = f"The roles of {username} are saved."
    return await _user_action(
        request, actor, services, username, Perm.USER_ROLES, "roles", notice, run
    )


@router.post("/admin/users/{username}/password")
async def reset_password(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> None:
        if field(form, "password") != field(form, "password_again"):
            raise InvalidInput(
                "The two passwords differ.",
                detail=[{"field": "password_again", "message": "Type the same password twice."}],
            )
        body = types.UpdatePasswordRequest(password=field(form, "password"))
        await services.users.change_password(actor, username, body, record)

    notice = f"The password of {username} is changed; their other sessions ended."
    return await _user_action(
        request, actor, services, username, Perm.USER_PASSWORD, "password", notice, run
    )


@router.post("/admin/users/{username}/delete")
async def delete_user(
    username: UserRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> str:
        await services.users.delete(actor, username, record)
        return "/admin/users"

    notice = f"User {username} is deleted."
    return await _user_action(
        request, actor, services, username, Perm.USER_DELETE, "delete", notice, run
    )


@router.post("/admin/users/{username}/tokens/{token}/delete")
async def revoke_token(
    username: UserRef,
    token: TokenRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> None:
        await services.auth.revoke_token(actor, username, token, record)

    notice = "The token is revoked: scripts using it are refused from now on."
    return await _user_action(
        request, actor, services, username, Perm.API_KEY_DELETE, "tokens", notice, run
    )


# --- audit ----------------------------------------------------------------------------

AUDIT_FILTERS = ("actor", "action", "resource_type", "resource_id", "since", "until")


def _parse_time(name: str, text: str) -> datetime | None:
    """A filter time as typed: ISO 8601, or the browser's date-time picker
    (no zone: UTC, as the page says)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{name} is not a date and time",
            detail=[{"field": name, "message": "Use YYYY-MM-DDTHH:MM, in UTC."}],
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _filter(values: dict[str, str]) -> audit_service.AuditFilter:
    since = _parse_time("since", values["since"])
    until = _parse_time("until", values["until"])
    # The API's own checks (time zones, range, since < until).
    return await audit_filter(
        actor=values["actor"] or None,
        action=values["action"] or None,
        resource_type=values["resource_type"] or None,
        resource_id=values["resource_id"] or None,
        since=since,
        until=until,
    )


def _export_query(flt: audit_service.AuditFilter) -> str:
    query = {
        "actor": flt.actor,
        "action": flt.action,
        "resource_type": flt.resource_type,
        "resource_id": flt.resource_id,
        "since": flt.since.isoformat() if flt.since else None,
        "until": flt.until.isoformat() if flt.until else None,
    }
    return urlencode({k: v for k, v in query.items() if v})


@router.get("/admin/audit")
async def audit_page(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    user: Annotated[str, Query(alias="actor", max_length=64)] = "",
    action: Annotated[str, Query(max_length=64)] = "",
    resource_type: Annotated[str, Query(max_length=32)] = "",
    resource_id: Annotated[str, Query(max_length=64)] = "",
    since: Annotated[str, Query(max_length=64)] = "",
    until: Annotated[str, Query(max_length=64)] = "",
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> Response:
    _require(actor, Perm.AUDIT_READ)
    typed = (user, action, resource_type, resource_id, since, until)
    values = {k: v.strip() for k, v in zip(AUDIT_FILTERS, typed, strict=True)}
    verification = await audit_service.verify(services.db, key=services.audit_key)
    context: dict[str, Any] = {
        "values": values,
        "verification": verification,
        "filtered": any(values.values()),
    }
    try:
        flt = await _filter(values)
    except InvalidInput as exc:
        errors = FormErrors.of(exc)
        context.update(errors=errors, entries=None, pages=None, export="")
        return render(request, "admin/audit.html", context, status_code=errors.status)
    rows, count = await audit_service.list_entries(services.db, flt, limit=limit, offset=offset)
    context.update(
        entries=[types.AuditEntry.model_validate(r) for r in rows],
        pages=_pages(count, limit, offset, values, "/admin/audit"),
        export=_export_query(flt),
    )
    return render(request, "admin/audit.html", context)


# --- deployment ---------------------------------------------------------------------------


@router.get("/admin/deployment")
async def deployment_page(request: Request, actor: PageActor, services: ServicesDep) -> Response:
    _require(actor, Perm.DEPLOYMENT_READ)
    report = await system_service.deployment(services, actor)
    jobs = [
        {
            "name": name,
            "interval": system_service.human_seconds(job["interval_seconds"]),
            "alive": job["alive"],
            "last_run": datetime.fromtimestamp(job["last_run"], UTC) if job["last_run"] else None,
            "last_error": job["last_error"],
        }
        for name, job in sorted(report.health.workers.items())
    ]
    return render(
        request,
        "admin/deployment.html",
        {
            "d": report,
            "jobs": jobs,
            "settings_groups": system_service.effective_settings(services.settings),
            "python": sys.version.split()[0],
            "platform": platform.platform(terse=True),
            "hostname": socket.gethostname(),
        },
    )


# --- AI bridge ----------------------------------------------------------------------------


@router.get("/aibridge")
async def aibridge_page(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    user: Annotated[str, Query(max_length=64)] = "",
    model: Annotated[str, Query(max_length=255)] = "",
    workspace: Annotated[str, Query(max_length=64)] = "",
    limit: Limit = PAGE_SIZE,
    offset: Offset = 0,
) -> Response:
    """Requests through the AI bridge, newest first, each with its prompt and
    tool calls: everyone's for owners and auditors, one's own for others."""
    values = {"user": user.strip(), "model": model.strip(), "workspace": workspace.strip()}
    flt = types.AibridgeFilter(
        user=values["user"] or None,
        workspace=values["workspace"] or None,
        model=values["model"] or None,
    )
    page = await services.aibridge.list_records(actor, flt, limit=limit, offset=offset)
    context = {
        "values": values,
        "filtered": any(values.values()),
        "records": page.items,
        "everyone": can(actor, Perm.AIBRIDGE_READ),
        "enabled": services.aibridge.enabled,
        "pages": _pages(page.count, limit, offset, values, "/aibridge"),
    }
    return render(request, "admin/aibridge.html", context)


@router.get("/admin/egress")
async def egress_page(request: Request, actor: PageActor, services: ServicesDep) -> Response:
    """The egress report: what the deployment tried to reach, allowed or
    denied (owners and auditors)."""
    _require(actor, Perm.EGRESS_READ)
    report = await services.egress.report()
    return render(request, "admin/egress.html", {"report": report})


# --- organizations ----------------------------------------------------------------------
#
# Anyone may look at the organizations they are in (the service decides which:
# site admins see all); changes are for the organization's admins and site
# user-admins, creating and deleting organizations for site owners.

OrgRef = Annotated[str, Path(max_length=32, description="organization name")]
GroupRef = Annotated[str, Path(max_length=64, description="group name")]
_USERNAME = re.compile(types.USERNAME_PATTERN)
# Refusals about a user a form names (shown next to the field that names them).
_USER_REASONS = ("user_not_found", "not_a_member")


def _usernames(text: str, field_name: str) -> list[str]:
    """Usernames typed into one field, separated by commas or spaces."""
    names = [n for n in re.split(r"[\s,]+", text.strip().lower()) if n]
    bad = [n for n in names if not _USERNAME.match(n)]
    if bad:
        raise InvalidInput(
            f"{bad[0][:40]!r} is not a username: a username is {types.USERNAME_HELP}.",
            detail=[{"field": field_name, "message": "Give usernames, separated by commas."}],
        )
    return names


async def _orgs(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    *,
    status_code: int = 200,
    **context: object,
) -> Response:
    listing = await services.orgs.list(actor)
    return render(
        request,
        "admin/orgs.html",
        {
            "orgs": listing.organizations,
            "can_create": can(actor, Perm.ORGANIZATION_CREATE),
            **context,
        },
        status_code=status_code,
    )


@router.get("/admin/orgs")
async def orgs_page(request: Request, actor: PageActor, services: ServicesDep) -> Response:
    return await _orgs(request, actor, services)


@router.post("/admin/orgs")
async def create_org(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    form = await read_form(request, actor)
    values = {key: field(form, key).strip() for key in ("name", "display_name", "description")}
    try:
        if values["name"] and not _USERNAME.match(values["name"]):
            raise InvalidInput(
                f"An organization's name is {types.USERNAME_HELP}.",
                detail=[{"field": "name", "message": f"Use {types.USERNAME_HELP}."}],
            )
        body = types.CreateOrganizationRequest(**values)
        org = await services.orgs.create(actor, body, record)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        if isinstance(exc, StockadeError) and exc.reason == "organization_exists":
            errors.fields["name"] = "Taken: choose another name."
        return await _orgs(
            request, actor, services, status_code=errors.status,
            create_errors=errors, values=values,
        )  # fmt: skip
    return redirect(
        f"/admin/orgs/{quote(org.name)}",
        f"Organization {org.name} created. Add its members (and its admins) below.",
    )


async def _org(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    name: str,
    *,
    status_code: int = 200,
    **context: object,
) -> Response:
    org = await services.orgs.get(actor, name)
    members = (await services.orgs.members(actor, name)).members
    groups = (await services.orgs.groups(actor, name)).groups
    org_templates = await services.templates.list(actor, include_archived=False, org=name)
    async with services.db.session() as session:
        org_admin = (await standing(session, actor)).is_org_admin(org.id)
    return render(
        request,
        "admin/org.html",
        {
            "org": org,
            "members": members,
            "groups": groups,
            "org_templates": org_templates.templates,
            "can_manage": org_admin or can(actor, Perm.USER_UPDATE),
            "can_delete": can(actor, Perm.ORGANIZATION_CREATE) and not org.is_default,
            "base": f"/admin/orgs/{quote(org.name)}",
            "values": {},
            **context,
        },
        status_code=status_code,
    )


@router.get("/admin/orgs/{org}")
async def org_page(
    org: OrgRef, request: Request, actor: PageActor, services: ServicesDep
) -> Response:
    return await _org(request, actor, services, org)


async def _org_action(
    request: Request,
    actor: Actor,
    services: ServicesDep,
    org: str,
    section: str,
    notice: str,
    action: Any,
    users_field: str | None = None,
) -> Response:
    """Run ``action(form)`` for a form of the organization page: a refusal is
    shown in the form's ``section`` (``group-NAME`` for a group's forms)
    with what was typed, success as ``notice``. ``action`` may return where to
    go, or (where to go, the notice) when the notice depends on the form. A
    refusal about a user named in the form is shown next to ``users_field``."""
    form = await read_form(request, actor)
    try:
        target = await action(form)
        if isinstance(target, tuple):
            target, notice = target
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        if isinstance(exc, StockadeError) and users_field and exc.reason in _USER_REASONS:
            errors.fields.setdefault(users_field, errors.message)
        elif isinstance(exc, StockadeError) and exc.reason == "group_exists":
            errors.fields.setdefault("name", "Taken in this organization: choose another name.")
        values = {k: v for k, v in form.items() if isinstance(v, str) and k != CSRF_FIELD}
        return await _org(
            request, actor, services, org, status_code=errors.status,
            errors_in=section, errors=errors, values=values,
        )  # fmt: skip
    return redirect(target or f"/admin/orgs/{quote(org)}#{section}", notice)


@router.post("/admin/orgs/{org}/delete")
async def delete_org(
    org: OrgRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> str:
        await services.orgs.delete(actor, org, record)
        return "/admin/orgs"

    return await _org_action(
        request, actor, services, org, "delete", f"Organization {org} is deleted.", run
    )


@router.post("/admin/orgs/{org}/members")
async def add_org_member(
    org: OrgRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> tuple[str, str]:
        names = _usernames(field(form, "username"), "username")
        if not names:
            raise InvalidInput(
                "Name the user to add.",
                detail=[{"field": "username", "message": "Give a username."}],
            )
        roles = ["org-admin"] if field(form, "org_admin") == "true" else []
        body = types.UpdateMemberRequest.model_validate({"roles": roles})
        for name in names:
            await services.orgs.set_member(actor, org, name, body, record)
        verb = "is" if len(names) == 1 else "are"
        return f"/admin/orgs/{quote(org)}#members", f"{', '.join(names)} {verb} now in {org}."

    return await _org_action(request, actor, services, org, "members", "", run, "username")


@router.post("/admin/orgs/{org}/members/{username}/roles")
async def set_org_roles(
    org: OrgRef,
    username: UserRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> tuple[str, str]:
        make_admin = field(form, "org_admin") == "true"
        body = types.UpdateMemberRequest.model_validate(
            {"roles": ["org-admin"] if make_admin else []}
        )
        await services.orgs.set_member(actor, org, username, body, record)
        what = "an admin" if make_admin else "no longer an admin"
        return f"/admin/orgs/{quote(org)}#members", f"{username} is {what} of {org}."

    return await _org_action(request, actor, services, org, "members", "", run)


@router.post("/admin/orgs/{org}/members/{username}/remove")
async def remove_org_member(
    org: OrgRef,
    username: UserRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> None:
        await services.orgs.remove_member(actor, org, username, record)

    notice = f"{username} is no longer a member of {org} (nor of its groups)."
    return await _org_action(request, actor, services, org, "members", notice, run)


@router.post("/admin/orgs/{org}/groups")
async def create_group(
    org: OrgRef, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    async def run(form: FormData) -> tuple[str, str]:
        body = types.CreateGroupRequest(
            name=field(form, "name").strip(),
            display_name=field(form, "display_name").strip(),
            members=_usernames(field(form, "members"), "members"),
        )
        group = await services.orgs.create_group(actor, org, body, record)
        target = f"/admin/orgs/{quote(org)}#group-{quote(group.name)}"
        return target, f"Group {group.name} created."

    return await _org_action(request, actor, services, org, "groups", "", run, "members")


@router.post("/admin/orgs/{org}/groups/{group}/members")
async def add_group_members(
    org: OrgRef,
    group: GroupRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> None:
        names = _usernames(field(form, "usernames"), "usernames")
        if not names:
            raise InvalidInput(
                "Name the users to add.",
                detail=[{"field": "usernames", "message": "Give usernames."}],
            )
        body = types.UpdateGroupRequest(add_members=names)
        await services.orgs.update_group(actor, org, group, body, record)

    notice = f"Group {group} is changed."
    section = f"group-{group}"
    return await _org_action(request, actor, services, org, section, notice, run, "usernames")


@router.post("/admin/orgs/{org}/groups/{group}/members/{username}/remove")
async def remove_group_member(
    org: OrgRef,
    group: GroupRef,
    username: UserRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> None:
        body = types.UpdateGroupRequest(remove_members=[username])
        await services.orgs.update_group(actor, org, group, body, record)

    notice = f"{username} is no longer in group {group}."
    return await _org_action(request, actor, services, org, f"group-{group}", notice, run)


@router.post("/admin/orgs/{org}/groups/{group}/delete")
async def delete_group(
    org: OrgRef,
    group: GroupRef,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    async def run(form: FormData) -> str:
        await services.orgs.delete_group(actor, org, group, record)
        return f"/admin/orgs/{quote(org)}#groups"

    notice = f"Group {group} is deleted."
    return await _org_action(request, actor, services, org, f"group-{group}", notice, run)
