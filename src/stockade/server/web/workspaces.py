"""Dashboard pages for workspaces: the list, creation from a template's
parameters, a workspace's page (status, actions, agent, apps, builds and the
latest build's log) and a build's page with its log.

Pages call the services as ``workspaces/api.py``, ``agents/api.py`` and
``apps/api.py`` do, and the services decide who sees what: another member's
workspace is a 404 here as in the API.

Live parts: each page is cut into regions, and a hidden poller element asks a
fragment route every few seconds with the digest of each region it shows.
The route answers 204 when nothing changed, else the regions that did (htmx
out-of-band swaps) and a new poller. A region is therefore replaced only when
its content really changes, so a button does not lose focus under the
keyboard every 3 seconds. Build logs are not polled: ``static/js/workspaces.js``
follows the API's NDJSON stream and appends the lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup
from pydantic import ValidationError
from starlette.datastructures import FormData

from stockade.sdk import types
from stockade.sdk.templates import Manifest, Parameter, parse_number
from stockade.server.authz import Actor, Perm, can
from stockade.server.deps import AuditDep, ServicesDep
from stockade.server.errors import Conflict, InvalidInput, NotFound, StockadeError
from stockade.server.services import Services
from stockade.server.web.core import (
    FormErrors,
    PageActor,
    csrf_token,
    field,
    page_actor,
    read_form,
    redirect,
    render,
    safe_next,
    templates,
)
from stockade.server.web.templates_pages import find as find_template
from stockade.server.web.templates_pages import several_orgs

router = APIRouter(include_in_schema=False)  # pages, not API

# The same bounds as the API's path and query parameters.
Owner = Annotated[str, Path(max_length=32)]
Name = Annotated[str, Path(max_length=32)]
Number = Annotated[int, Path(ge=1, le=2**31 - 1)]
Filter = Annotated[str, Query(alias="q", max_length=64)]
TemplateName = Annotated[str | None, Query(alias="template", max_length=64)]
OrgName = Annotated[str | None, Query(alias="org", max_length=32)]

POLL_TRIGGER = "every 3s, build-ended from:body"
# Form fields of parameters: "param-NAME". A parameter name is [a-z][a-z0-9_]*,
# so the prefix can clash neither with another parameter nor with the form's
# own fields (name, owner, template, csrf_token).
PARAM = "param-"
UNFINISHED = frozenset({"pending", "running", "canceling"})
HISTORY = 25  # builds listed on a workspace's page; the API lists them all
BuildTransition = Literal["start", "stop", "delete", "restart"]
# The actions of a workspace's page: the API's transition, and the notice.
ACTIONS: dict[str, tuple[BuildTransition, str]] = {
    "start": ("start", "Starting"),
    "stop": ("stop", "Stopping"),
    "restart": ("restart", "Restarting"),
    "update": ("start", "Updating"),  # a start on the template's active version
    "delete": ("delete", "Deleting"),
}


def _workspace_url(owner: str, name: str) -> str:
    return f"/workspaces/{quote(owner)}/{quote(name)}"


# --- live regions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A part of a page that the poller replaces when its digest changes."""

    id: str
    html: Markup
    digest: str

    @property
    def block(self) -> Markup:
        return Markup('<div id="{}">{}</div>').format(self.id, self.html)

    @property
    def swap(self) -> Markup:
        return Markup('<div id="{}" hx-swap-oob="true">{}</div>').format(self.id, self.html)


def _region(
    request: Request,
    services: Services,
    actor: Actor,
    region_id: str,
    template: str,
    context: Mapping[str, Any],
) -> Region:
    html = templates.get_template(template).render(
        {
            "request": request,
            "actor": actor,
            "csrf": csrf_token(services, actor),
            "access_url": services.settings.access_url,
            "fmt": Fmt,
            **context,
        }
    )
    digest = hashlib.sha256(html.encode()).hexdigest()[:16]
    # Rendered by Jinja with autoescaping: markup already, not text.
    return Region(region_id, Markup(html), digest)  # noqa: S704


def _poller(
    url: str,
    regions: Sequence[Region],
    *,
    live: bool = True,
    params: Mapping[str, str] | None = None,
) -> Markup:
    """The hidden element that polls ``url`` with the digests it has (and
    ``params``, such as the list's filter). A page that will not change any
    more (a finished build) gets one that never polls."""
    if not live:
        return Markup('<div id="poll" hidden></div>')
    query = urlencode({**(params or {}), **{r.id: r.digest for r in regions}})
    return Markup(
        '<div id="poll" hidden hx-get="{}?{}" hx-trigger="{}" hx-swap="outerHTML"></div>'
    ).format(url, query, POLL_TRIGGER)


def _poll_answer(
    request: Request,
    url: str,
    regions: Sequence[Region],
    *,
    live: bool = True,
    params: Mapping[str, str] | None = None,
) -> Response:
    changed = [r for r in regions if request.query_params.get(r.id) != r.digest]
    if not changed:
        return Response(status_code=204, headers={"cache-control": "no-store"})
    html = _poller(url, regions, live=live, params=params)
    html += Markup("").join(r.swap for r in changed)
    return HTMLResponse(html, headers={"cache-control": "no-store"})


async def _poll_actor(request: Request) -> Actor | None:
    """The signed-in user of a poll; ``None`` when an htmx poll comes after
    the session ended (a plain request is sent to the login page as usual)."""
    actor: Actor | None = request.state.actor
    if actor is None and request.headers.get("hx-request") != "true":
        return await page_actor(request)
    return actor


PollActor = Annotated[Actor | None, Depends(_poll_actor)]


def _to_login(request: Request) -> Response:
    """htmx follows a redirect itself and would put the login page in place
    of the poller: it is told to take the browser there instead."""
    page = safe_next(urlsplit(request.headers.get("hx-current-url", "")).path)
    return Response(
        status_code=200,
        headers={"HX-Redirect": f"/login?next={quote(page, safe='')}", "cache-control": "no-store"},
    )


def _gone(request: Request, exc: NotFound, owner: str, name: str) -> Response:
    """A poll of a workspace that is gone (deleted, or no longer visible):
    htmx takes the browser to the list; a plain request gets the 404 page."""
    if request.headers.get("hx-request") != "true":
        raise exc
    response = redirect("/workspaces", f"Workspace {owner}/{name} no longer exists.")
    return Response(
        status_code=200,
        headers={
            "HX-Redirect": "/workspaces",
            "set-cookie": response.headers["set-cookie"],
            "cache-control": "no-store",
        },
    )


# --- formatting --------------------------------------------------------------------------


class Fmt:
    """Formatting helpers the templates call."""

    @staticmethod
    def seconds(value: float | None) -> str:
        if value is None:
            return "—"
        if value < 1:
            return f"{round(value * 1000)} ms"
        if value < 60:
            return f"{value:.1f} s"
        minutes, secs = divmod(round(value), 60)
        if minutes < 60:
            return f"{minutes} min {secs} s"
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes} min"

    @staticmethod
    def duration(start: datetime | None, end: datetime | None) -> str:
        if start is None or end is None:
            return "—"
        return Fmt.seconds((end - start).total_seconds())

    @staticmethod
    def value(value: Any) -> str:
        """A parameter value as a person reads it."""
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "(empty list)"
        if value == "":
            return "(empty)"
        return _key(value)


def _key(value: Any) -> str:
    """A parameter value as a form field carries it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- the list ------------------------------------------------------------------------------


async def _list_region(
    request: Request, services: Services, actor: Actor, q: str
) -> tuple[Region, int]:
    listing = await services.workspaces.list(actor)
    needle = q.strip().lower()
    shown = [
        w
        for w in listing.workspaces
        if not needle or needle in w.name or needle in w.owner_name.lower()
    ]
    has_templates = True
    if not listing.workspaces:
        usable = await services.templates.list(actor, include_archived=False)
        has_templates = any(t.active_version is not None for t in usable.templates)
    context = {
        "workspaces": shown,
        "total": listing.count,
        "q": q.strip(),
        "everyone": can(actor, Perm.WORKSPACE_READ),
        "has_templates": has_templates,
        "several_orgs": await several_orgs(services),
    }
    region = _region(request, services, actor, "ws-list", "workspaces/_list.html", context)
    return region, listing.count


@router.get("/workspaces")
async def list_page(
    request: Request, actor: PageActor, services: ServicesDep, q: Filter = ""
) -> Response:
    region, total = await _list_region(request, services, actor, q)
    params = {"q": q.strip()} if q.strip() else None
    return render(
        request,
        "workspaces/list.html",
        {
            "list": region,
            "poller": _poller("/workspaces/rows", [region], params=params),
            "q": q.strip(),
            "total": total,
            "everyone": can(actor, Perm.WORKSPACE_READ),
        },
    )


@router.get("/workspaces/rows")
async def list_rows(
    request: Request, actor: PollActor, services: ServicesDep, q: Filter = ""
) -> Response:
    if actor is None:
        return _to_login(request)
    region, _ = await _list_region(request, services, actor, q)
    params = {"q": q.strip()} if q.strip() else None
    return _poll_answer(request, "/workspaces/rows", [region], params=params)


# --- creation ----------------------------------------------------------------------------


@dataclass
class ParamField:
    """A parameter as a form field: which widget, and what it shows."""

    param: Parameter
    widget: str  # text, number, select, bool, lines, multi
    value: str = ""
    chosen: list[str] = dataclasses.field(default_factory=list)
    options: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    help: list[str] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return PARAM + self.param.name

    @property
    def label(self) -> str:
        return self.param.display_name or self.param.name


def _param_fields(
    manifest: Manifest,
    posted: FormData | None,
    *,
    current: Mapping[str, Any] | None = None,
    only_mutable: bool = False,
) -> list[ParamField]:
    """The form's fields, filled with what was posted, or else the
    workspace's ``current`` values, or else the defaults. ``only_mutable``:
    the fields of a workspace's parameters that may still change."""
    out = []
    for p in manifest.parameters:
        if only_mutable and not p.mutable:
            continue
        if p.options is not None and p.type == "list(string)":
            widget = "multi"
        elif p.options is not None:
            widget = "select"
        elif p.type == "bool":
            widget = "bool"
        elif p.type == "number":
            widget = "number"
        elif p.type == "list(string)":
            widget = "lines"
        else:
            widget = "text"
        f = ParamField(p, widget)
        f.options = [(_key(o), _key(o)) for o in p.options or []]
        if widget == "select" and (p.required or p.default is None):
            f.options.insert(0, ("", "Choose…" if p.required else "(none)"))
        if posted is not None:
            raws = [v for v in posted.getlist(f.name) if isinstance(v, str)]
            f.chosen = [r for r in raws if r]
            f.value = raws[-1] if raws else ""
        else:
            default = current[p.name] if current and p.name in current else p.default
            if isinstance(default, list):
                f.chosen = list(default)
                f.value = "\n".join(default)
            elif default is not None:
                f.value = _key(default)
                f.chosen = [f.value]
        if p.description:
            f.help.append(p.description)
        rule = p.validation
        if (
            rule is not None
            and p.type == "number"
            and (rule.min is not None or rule.max is not None)
        ):
            if rule.min is not None and rule.max is not None:
                f.help.append(f"From {_key(rule.min)} to {_key(rule.max)}.")
            elif rule.min is not None:
                f.help.append(f"At least {_key(rule.min)}.")
            else:
                f.help.append(f"At most {_key(rule.max)}.")
        if rule is not None and rule.regex is not None and p.type in ("string", "list(string)"):
            f.help.append(f"Must match {rule.regex} (a regular expression).")
        if widget == "lines":
            f.help.append("One item per line.")
        if not p.mutable and not only_mutable:
            f.help.append("Fixed once the workspace is created.")
        out.append(f)
    return out


def _parameter_values(form: FormData, manifest: Manifest) -> dict[str, Any]:
    """The posted parameter values, each as its type wants it. A field left
    empty is not sent, so the default applies (or the service says the
    parameter is required)."""
    values: dict[str, Any] = {}
    for f in _param_fields(manifest, form):
        p = f.param
        by_key = {_key(o): o for o in p.options or []}
        if not [v for v in form.getlist(f.name) if isinstance(v, str)]:
            # Not in the form at all: the default (or the current value) applies.
            # (Checkbox groups carry an empty marker, so none ticked is a value.)
            continue
        if f.widget == "multi":
            if f.chosen or not p.required:
                values[p.name] = [by_key.get(r, r) for r in f.chosen]
            continue
        raw = f.value
        if f.widget == "select":
            if raw:
                values[p.name] = by_key.get(raw, raw)
        elif f.widget == "bool":
            values[p.name] = {"true": True, "false": False}.get(raw, raw)
        elif f.widget == "number":
            if raw.strip():
                values[p.name] = raw if (number := parse_number(raw)) is None else number
        elif f.widget == "lines":
            items = [line.strip() for line in raw.splitlines() if line.strip()]
            if items or not p.required:
                values[p.name] = items
        elif raw or not p.required:
            values[p.name] = raw
    return values


_PARAM_IN_MESSAGE = re.compile(r"parameter '([a-z][a-z0-9_]*)'")


def _form_errors(exc: StockadeError | ValidationError, *, every_field: bool = True) -> FormErrors:
    """The service's errors on the fields that caused them: parameters (the
    service names each in ``detail``), the name, the owner. ``every_field``:
    the form shows every parameter, so the fields say it all."""
    errors = FormErrors.of(exc)
    if isinstance(exc, ValidationError):
        for err in exc.errors():
            where = err.get("loc", ())
            if where[:1] == ("name",):
                text = f"A workspace name is {types.WORKSPACE_NAME_HELP}."
                errors.fields["name"] = errors.message = text
            elif where[:1] == ("parameters",):
                found = _PARAM_IN_MESSAGE.search(str(err.get("msg", "")))
                if found:
                    message = str(err.get("msg", "")).removeprefix("Value error, ")
                    errors.fields[PARAM + found.group(1)] = message[:1].upper() + message[1:]
        return errors
    mapped = 0
    for item in exc.detail or []:
        name = item.get("parameter")
        if not isinstance(name, str) or name.startswith("compute."):
            continue
        text = "Required: give it a value." if item.get("missing") else str(item.get("message"))
        errors.fields.setdefault(PARAM + name, text[:1].upper() + text[1:])
        mapped += 1
    if every_field and mapped and mapped == len(exc.detail or []):
        # The service's sentence speaks CLI (--parameter); the fields say it here.
        errors.message = (
            "Fix the parameter marked below."
            if mapped == 1
            else f"Fix the {mapped} parameters marked below."
        )
    if exc.reason == "workspace_exists":
        errors.fields["name"] = "You already have a workspace with this name: choose another."
    elif exc.reason == "user_not_found":
        errors.fields["owner"] = "There is no such user."
    return errors


async def _chosen_template(
    services: Services, actor: Actor, name: str, org: str | None
) -> tuple[types.Template, Manifest]:
    """A template and its active version's manifest."""
    template = await find_template(services, actor, name, org)
    versions = await services.templates.versions(actor, name, template.organization)
    active = next((v for v in versions.versions if v.active), None)
    if template.archived_at is not None or active is None:
        raise Conflict(
            f"template {name!r} has no active version: a template admin must push or activate one",
            reason="template_not_active",
        )
    return template, Manifest.model_validate(active.manifest)


async def _new_page(
    request: Request,
    actor: Actor,
    services: Services,
    template_name: str | None,
    org: str | None = None,
    *,
    posted: FormData | None = None,
    errors: FormErrors | None = None,
    status_code: int = 200,
) -> Response:
    context: dict[str, Any] = {
        "errors": errors,
        "for_others": can(actor, Perm.WORKSPACE_CREATE),
        "templates_nav": can(actor, Perm.TEMPLATE_WRITE),
    }
    if template_name is None:
        usable = await services.templates.list(actor, include_archived=False)
        context["templates"] = [t for t in usable.templates if t.active_version is not None]
        context["several_orgs"] = await several_orgs(services)
        return render(request, "workspaces/new.html", context, status_code=status_code)
    template, manifest = await _chosen_template(services, actor, template_name, org)
    context.update(
        template=template,
        fields=_param_fields(manifest, posted),
        values={
            "name": field(posted, "name") if posted is not None else "",
            "owner": field(posted, "owner") if posted is not None else "",
        },
    )
    return render(request, "workspaces/new.html", context, status_code=status_code)


@router.get("/workspaces/new")
async def new_page(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    template: TemplateName = None,
    org: OrgName = None,
) -> Response:
    return await _new_page(request, actor, services, template or None, org or None)


@router.post("/workspaces/new")
async def create(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    form = await read_form(request, actor)
    template_name = field(form, "template").strip()
    if not template_name:
        errors = FormErrors("Choose a template first.", {})
        return await _new_page(request, actor, services, None, errors=errors, status_code=400)
    # An unknown or inactive template is the 404/409 page: there is no form to show.
    chosen, manifest = await _chosen_template(
        services, actor, template_name, field(form, "org").strip()[:32] or None
    )
    org = chosen.organization
    owner = field(form, "owner").strip()
    try:
        body = types.CreateWorkspaceRequest(
            name=field(form, "name").strip(),
            template=template_name,
            organization=org,
            parameters=_parameter_values(form, manifest),
            owner=owner or None,
        )
        ws = await services.workspaces.create(actor, body, record)
    except (StockadeError, ValidationError) as exc:
        errors = _form_errors(exc)
        return await _new_page(
            request, actor, services, template_name, org,
            posted=form, errors=errors, status_code=errors.status,
        )  # fmt: skip
    return redirect(
        _workspace_url(ws.owner_name, ws.name),
        f"Creating {ws.owner_name}/{ws.name}: build {ws.latest_build.number} is queued.",
    )


# --- a workspace ------------------------------------------------------------------------


async def _active_version(services: Services, actor: Actor, ws: types.Workspace) -> int | None:
    """The template's active version number, for the update button (None:
    the caller cannot read the template any more)."""
    try:
        template = await services.templates.get(actor, ws.template_name, ws.organization)
        return template.active_version
    except StockadeError:
        return None


async def _workspace_regions(
    request: Request, services: Services, actor: Actor, owner: str, name: str
) -> tuple[types.Workspace, list[Region]]:
    ws = await services.workspaces.get(actor, owner, name)
    builds = (await services.workspaces.builds(actor, owner, name)).builds
    agent_logs = await services.workspaces.agent_logs(actor, owner, name, after=0)
    apps = (await services.apps.list_apps(actor, owner, name)).apps
    url = _workspace_url(ws.owner_name, ws.name)
    head = {
        "ws": ws,
        "url": url,
        "active_version": await _active_version(services, actor, ws) if ws.outdated else None,
        "connect": can(actor, Perm.WORKSPACE_CONNECT, owner_id=ws.owner_id),
        "unfinished": ws.latest_build.status in UNFINISHED,
    }
    body = {
        "ws": ws,
        "url": url,
        "builds": list(reversed(builds))[:HISTORY],
        "build_count": len(builds),
        "agent_logs": agent_logs.logs,
        "apps": apps,
    }
    return ws, [
        _region(request, services, actor, "ws-head", "workspaces/_head.html", head),
        _region(request, services, actor, "ws-body", "workspaces/_body.html", body),
    ]


async def _version_manifest(
    services: Services, actor: Actor, ws: types.Workspace
) -> Manifest | None:
    """The manifest of the template version the workspace is on (None: the
    caller can no longer read the template, for example once it is archived)."""
    try:
        versions = await services.templates.versions(actor, ws.template_name, ws.organization)
    except StockadeError:
        return None
    for version in versions.versions:
        if version.number == ws.template_version:
            return Manifest.model_validate(version.manifest)
    return None


async def _workspace_page(
    request: Request,
    actor: Actor,
    services: Services,
    owner: str,
    name: str,
    *,
    errors: FormErrors | None = None,
    retry: str | None = None,
    posted: FormData | None = None,
    status_code: int = 200,
) -> Response:
    ws, regions = await _workspace_regions(request, services, actor, owner, name)
    latest = ws.latest_build
    logs = await services.workspaces.logs(actor, owner, name, latest.number, after=0)
    url = _workspace_url(ws.owner_name, ws.name)
    manifest = await _version_manifest(services, actor, ws)
    mutable = (
        _param_fields(manifest, posted, current=ws.parameters, only_mutable=True)
        if manifest is not None and can(actor, Perm.WORKSPACE_BUILD, owner_id=ws.owner_id)
        else []
    )
    return render(
        request,
        "workspaces/detail.html",
        {
            "ws": ws,
            "url": url,
            "head": regions[0],
            "body": regions[1],
            "poller": _poller(url + "/live", regions),
            "build": latest,
            "lines": logs.logs,
            "errors": errors,
            "retry": retry,
            "mutable": mutable,
            "param_errors": errors
            if errors and any(k.startswith(PARAM) for k in errors.fields)
            else None,
        },
        status_code=status_code,
    )


@router.get("/workspaces/{owner}/{name}")
async def workspace_page(
    owner: Owner, name: Name, request: Request, actor: PageActor, services: ServicesDep
) -> Response:
    return await _workspace_page(request, actor, services, owner, name)


@router.get("/workspaces/{owner}/{name}/live")
async def workspace_live(
    owner: Owner, name: Name, request: Request, actor: PollActor, services: ServicesDep
) -> Response:
    if actor is None:
        return _to_login(request)
    try:
        ws, regions = await _workspace_regions(request, services, actor, owner, name)
    except NotFound as exc:
        return _gone(request, exc, owner, name)
    return _poll_answer(request, _workspace_url(ws.owner_name, ws.name) + "/live", regions)


@router.post("/workspaces/{owner}/{name}/builds")
async def create_build(
    owner: Owner,
    name: Name,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    """Start, stop, restart, update or delete (the ``transition`` field);
    ``cancel_running`` cancels a build in progress first, as the API's flag.
    A start or restart may carry new values of mutable parameters
    (``param-NAME`` fields, as on the creation form)."""
    form = await read_form(request, actor)
    transition = field(form, "transition")
    try:
        if transition not in ACTIONS:
            raise InvalidInput(
                f"there is no action {transition[:32]!r}: start, stop, restart, update or delete",
                reason="unknown_action",
            )
        parameters: dict[str, Any] = {}
        if any(key.startswith(PARAM) for key in form):
            ws = await services.workspaces.get(actor, owner, name)
            manifest = await _version_manifest(services, actor, ws)
            if manifest is None:
                raise Conflict(
                    f"the template {ws.template_name!r} cannot be read any more, so its "
                    "parameters cannot change",
                    reason="template_not_found",
                )
            parameters = _parameter_values(form, manifest)
        body = types.CreateBuildRequest(
            transition=ACTIONS[transition][0],
            update=transition == "update",
            parameters=parameters,
            cancel_running=field(form, "cancel_running") == "true",
        )
        build = await services.workspaces.create_build(actor, owner, name, body, record)
    except (StockadeError, ValidationError) as exc:
        if isinstance(exc, NotFound) and exc.reason == "workspace_not_found":
            raise
        # Only mutable parameters are on the page: the sentence names the others.
        errors = _form_errors(exc, every_field=False)
        retry = None
        if isinstance(exc, Conflict) and exc.reason == "build_in_progress":
            # The service's sentence names the CLI's ways out; the page has a button.
            retry = transition
            running = (exc.detail or [{}])[0]
            ws = await services.workspaces.get(actor, owner, name)
            errors.message = (
                f"Build {running.get('build_number')} ({ws.latest_build.transition}) is still "
                f"{running.get('status')}: wait for it to end, or cancel it and {transition} now."
            )
        return await _workspace_page(
            request, actor, services, owner, name,
            errors=errors, retry=retry, posted=form, status_code=errors.status,
        )  # fmt: skip
    return redirect(
        _workspace_url(build.owner_name, build.workspace_name),
        f"{ACTIONS[transition][1]} {build.owner_name}/{build.workspace_name}: "
        f"build {build.number} is queued.",
    )


@router.post("/workspaces/{owner}/{name}/builds/{number}/cancel")
async def cancel_build(
    owner: Owner,
    name: Name,
    number: Number,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
) -> Response:
    form = await read_form(request, actor)
    on_build_page = field(form, "back") == "build"
    try:
        build = await services.workspaces.cancel(actor, owner, name, number, record)
    except StockadeError as exc:
        if isinstance(exc, NotFound):
            raise
        errors = FormErrors.of(exc)
        if on_build_page:
            return await _build_page(
                request, actor, services, owner, name, number,
                errors=errors, status_code=errors.status,
            )  # fmt: skip
        return await _workspace_page(
            request, actor, services, owner, name, errors=errors, status_code=errors.status
        )
    url = _workspace_url(build.owner_name, build.workspace_name)
    done = "canceled" if build.status == "canceled" else "is being canceled"
    return redirect(f"{url}/builds/{number}" if on_build_page else url, f"Build {number} {done}.")


# --- a build -------------------------------------------------------------------------------


async def _build_region(
    request: Request, services: Services, actor: Actor, owner: str, name: str, number: int
) -> tuple[types.WorkspaceBuild, Region]:
    build = await services.workspaces.build(actor, owner, name, number)
    context = {
        "build": build,
        "url": _workspace_url(build.owner_name, build.workspace_name),
        "unfinished": build.status in UNFINISHED,
    }
    region = _region(request, services, actor, "build-head", "workspaces/_build_head.html", context)
    return build, region


async def _build_page(
    request: Request,
    actor: Actor,
    services: Services,
    owner: str,
    name: str,
    number: int,
    *,
    errors: FormErrors | None = None,
    status_code: int = 200,
) -> Response:
    build, region = await _build_region(request, services, actor, owner, name, number)
    logs = await services.workspaces.logs(actor, owner, name, number, after=0)
    url = _workspace_url(build.owner_name, build.workspace_name)
    return render(
        request,
        "workspaces/build.html",
        {
            "build": build,
            "url": url,
            "head": region,
            "poller": _poller(
                f"{url}/builds/{number}/live", [region], live=build.status in UNFINISHED
            ),
            "lines": logs.logs,
            "errors": errors,
        },
        status_code=status_code,
    )


@router.get("/workspaces/{owner}/{name}/builds/{number}")
async def build_page(
    owner: Owner,
    name: Name,
    number: Number,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
) -> Response:
    return await _build_page(request, actor, services, owner, name, number)


@router.get("/workspaces/{owner}/{name}/builds/{number}/live")
async def build_live(
    owner: Owner,
    name: Name,
    number: Number,
    request: Request,
    actor: PollActor,
    services: ServicesDep,
) -> Response:
    if actor is None:
        return _to_login(request)
    try:
        build, region = await _build_region(request, services, actor, owner, name, number)
    except NotFound as exc:
        return _gone(request, exc, owner, name)
    url = _workspace_url(build.owner_name, build.workspace_name) + f"/builds/{number}/live"
    return _poll_answer(request, url, [region], live=build.status in UNFINISHED)
