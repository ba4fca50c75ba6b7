"""stockade create, list, show, start, stop, restart, delete, update, logs, cancel.

A workspace is named ``NAME`` (the signed-in user's) or ``OWNER/NAME``
(another user's, for owners and user-admins). Commands that queue a build
follow it until it ends: the stages with their durations and the log lines as
they come (a live display on a terminal, plain lines otherwise), then the
final status; a failed or canceled build is exit code 1.

A start build ends once the workspace's compute runs and its agent has been
launched; ``create``, ``start``, ``restart`` and ``update`` then wait for the
agent to be ready, printing its startup script's output as it comes, and end
with one line: the agent is ready, the startup script failed or timed out
(exit code 1; the workspace runs so that its owner can fix it), or the wait
timed out. ``--no-wait`` skips that wait.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm, interactive
from stockade.cli.orgs import DEFAULT_ORG
from stockade.cli.output import Format, console, err_console, print_json, print_table, show
from stockade.sdk import ApiError, Client, ConnectionFailed, types
from stockade.sdk.templates import Manifest, Parameter, parse_number

T = TypeVar("T")
FINISHED = ("succeeded", "failed", "canceled")
COLUMNS = [
    "name",
    "owner_name",
    "template_name",
    "template_version",
    "status",
    "outdated",
    "updated_at",
]
SHOW_COLUMNS = [
    "name",
    "owner_name",
    "status",
    "template_name",
    "template_version",
    "outdated",
    "backend",
    "parameters",
    "compute_status",
    "compute_detail",
    "created_at",
    "updated_at",
    "id",
]

NameArg = Annotated[str, typer.Argument(help="workspace NAME, or OWNER/NAME", show_default=False)]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--parameter", "-p", help="NAME=VALUE, repeatable (lists: JSON or comma-separated)"
    ),
]
NoFollowOpt = Annotated[bool, typer.Option("--no-follow", help="return once the build is queued")]
NoWaitOpt = Annotated[
    bool,
    typer.Option(
        "--no-wait",
        help="return when the build ends, without waiting for the agent to run the startup script",
    ),
]
AgentTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--agent-timeout",
        min=1,
        help="seconds to wait for the agent to be ready once the build has ended",
    ),
]
DEFAULT_AGENT_TIMEOUT = 600.0
# Lifecycle states after which the startup script will not change any more.
AGENT_SETTLED = ("ready", "start_error", "start_timeout")
AGENT_POLL_SECONDS = 0.2
CancelRunningOpt = Annotated[
    bool,
    typer.Option("--cancel-running", help="cancel an unfinished build instead of refusing"),
]


# --- who and what -------------------------------------------------------------------


class Session:
    """The client of one invocation, with the signed-in user looked up once."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self._me: str | None = None

    def me(self) -> str:
        if self._me is None:
            self._me = self.api.me().username
        return self._me

    def target(self, spec: str) -> tuple[str, str]:
        """``NAME`` or ``OWNER/NAME`` to (owner, name)."""
        owner, slash, name = spec.partition("/")
        if slash:
            if not owner or not name or "/" in name:
                raise UserError(f"name a workspace NAME or OWNER/NAME, not {spec!r}")
            return owner, name
        if not spec:
            raise UserError("name a workspace")
        return self.me(), spec


def _label(owner: str, name: str) -> str:
    return f"{owner}/{name}"


# --- parameters ----------------------------------------------------------------------

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


def convert_value(param: Parameter | None, raw: str) -> types.ParameterValue:
    """A ``--parameter`` value as the parameter's type wants it. A value that
    does not convert (and any value of an unknown parameter) stays a string:
    the server then names the parameter and what it needs."""
    kind = param.type if param is not None else "string"
    text = raw.strip()
    if kind == "number":
        number = parse_number(text)
        return raw if number is None else number
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        return raw
    if kind == "list(string)":
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"parameter {param.name if param else ''!r}: {text!r} is not a JSON list "
                    f"({exc.msg}); give a JSON array or comma-separated values"
                ) from exc
            if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
                return parsed
            raise UserError(
                f"parameter {param.name if param else ''!r} takes a list of strings, not {text}"
            )
        return [item.strip() for item in text.split(",") if item.strip()]
    return raw


def parse_parameters(items: Iterable[str], manifest: Manifest | None) -> dict[str, Any]:
    """``NAME=VALUE`` options to a dict, each value converted by its type."""
    known = {p.name: p for p in manifest.parameters} if manifest is not None else {}
    values: dict[str, Any] = {}
    for item in items:
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UserError(f"--parameter takes NAME=VALUE, got {item!r}")
        values[name] = convert_value(known.get(name), raw)
    return values


def _manifest(
    api: Client, template: str, number: int | None = None, *, org: str | None = None
) -> Manifest | None:
    """The manifest of a template version (``None``: the active one). ``None``
    when it cannot be read: values are then sent as strings."""
    try:
        versions = api.list_template_versions(template, org=org)
    except ApiError as exc:
        if exc.status in (403, 404):
            return None
        raise
    for version in versions:
        if (version.number == number) if number is not None else version.active:
            try:
                return Manifest.model_validate(version.manifest)
            except ValidationError:
                return None
    return None


def _missing(exc: ApiError, manifest: Manifest | None) -> list[Parameter]:
    """The parameters a 400 ``invalid_parameters`` says are missing, when that
    is all it says (other problems are the user's to fix, not to prompt for)."""
    if exc.status != 400 or exc.reason != "invalid_parameters" or manifest is None:
        return []
    known = {p.name: p for p in manifest.parameters}
    items = [d for d in exc.detail if isinstance(d, dict)]
    if not items or not all(d.get("missing") for d in items):
        return []
    names = [str(d.get("parameter")) for d in items]
    return [known[n] for n in names if n in known]


def _ask(param: Parameter) -> types.ParameterValue:
    title = param.display_name or param.name
    err_console.print(Text.assemble((title, "bold"), f" ({param.name}, {param.type})"))
    if param.description:
        err_console.print(Text(param.description))
    if param.options:
        shown = ", ".join(json.dumps(o) if isinstance(o, str) else str(o) for o in param.options)
        err_console.print(Text(f"one of: {shown}"))
    raw: str = typer.prompt(f"Value for {param.name}", err=True)
    return convert_value(param, raw)


def _asking_for_missing(
    call: Callable[[dict[str, Any]], T],
    values: dict[str, Any],
    manifest: Callable[[], Manifest | None],
) -> T:
    """``call(values)``; when the server answers that required parameters are
    missing and stdin is a terminal, ask for them and try again."""
    values = dict(values)
    for _ in range(5):
        try:
            return call(values)
        except ApiError as exc:
            if exc.reason != "invalid_parameters" or not interactive():
                raise
            missing = _missing(exc, manifest())
            if not missing:
                raise
            for param in missing:
                values[param.name] = _ask(param)
    return call(values)


def _cached(load: Callable[[], T]) -> Callable[[], T]:
    box: list[T] = []

    def get() -> T:
        if not box:
            box.append(load())
        return box[0]

    return get


# --- following a build -------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes}m{seconds:02d}s"


def _build_seconds(build: types.WorkspaceBuild) -> float | None:
    if build.started_at is None or build.finished_at is None:
        return None
    return (build.finished_at - build.started_at).total_seconds()


def _line_text(line: types.BuildLogLine) -> Text:
    if line.level == "error":
        return Text.assemble(("error: ", "red"), line.line)
    if line.level == "warn":
        return Text.assemble(("warning: ", "yellow"), line.line)
    return Text(line.line)


class BuildDisplay(Protocol):
    """Where the progress of a followed build goes."""

    def line(self, line: types.BuildLogLine) -> None: ...

    def update(self, build: types.WorkspaceBuild) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """Plain lines (not a terminal): a ``==> Stage`` header when a stage
    begins, the log lines, and the stage timings at the end."""

    def __init__(self, out: Console, title: str | None = None) -> None:
        self.out = out
        self.stage = ""
        self.stages: list[types.BuildStage] = []
        if title:
            self.out.print(Text(title), soft_wrap=True)

    def _header(self, stage: str) -> None:
        if stage and stage != self.stage:
            self.stage = stage
            self.out.print(Text(f"==> {stage}", style="bold"), soft_wrap=True)

    def line(self, line: types.BuildLogLine) -> None:
        self._header(line.stage)
        self.out.print(_line_text(line), soft_wrap=True)

    def update(self, build: types.WorkspaceBuild) -> None:
        self.stages = build.stages
        if build.stages:
            self._header(build.stages[-1].name)

    def close(self) -> None:
        stages, self.stages = self.stages, []
        if stages:
            timings = ", ".join(
                s.name if s.seconds is None else f"{s.name} {_seconds(s.seconds)}" for s in stages
            )
            self.out.print(Text(f"stages: {timings}", style="dim"), soft_wrap=True)


class LiveDisplay:
    """A Rich live display (a terminal): finished stages with their
    durations, the current one with a spinner; log lines print above it."""

    def __init__(self, out: Console, title: str) -> None:
        self.out = out
        self.title = title
        self.build: types.WorkspaceBuild | None = None
        self.spinner = Spinner("dots", text=Text("waiting for a provisioner"))
        self.live = Live(
            console=out,
            refresh_per_second=8,
            transient=False,
            get_renderable=self._render,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def _render(self) -> RenderableType:
        rows: list[RenderableType] = [Text(self.title, style="bold")]
        build = self.build
        stages = build.stages if build is not None else []
        finished = build is not None and build.status in FINISHED
        failed = build is not None and build.status in ("failed", "canceled")
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            if stage.finished_at is None and not finished:
                continue  # the current stage: the spinner below
            mark = ("  ✗ ", "red") if failed and last else ("  ✓ ", "green")
            took = f"  {_seconds(stage.seconds)}" if stage.seconds is not None else ""
            rows.append(Text.assemble(mark, stage.name, (took, "dim")))
        if not finished:
            current = stages[-1] if stages and stages[-1].finished_at is None else None
            if current is not None:
                elapsed = (
                    datetime.now(current.started_at.tzinfo) - current.started_at
                ).total_seconds()
                self.spinner.update(
                    text=Text.assemble(current.name, (f"  {_seconds(elapsed)}", "dim"))
                )
            elif build is None or build.status == "pending":
                self.spinner.update(text=Text("waiting for a provisioner"))
            else:
                self.spinner.update(text=Text(build.status))
            rows.append(self.spinner)
        return Group(*rows)

    def line(self, line: types.BuildLogLine) -> None:
        self.live.console.print(_line_text(line), soft_wrap=True)

    def update(self, build: types.WorkspaceBuild) -> None:
        self.build = build
        self.live.refresh()

    def close(self) -> None:
        if self.live.is_started:
            self.live.stop()


def _display(out: Console, title: str) -> BuildDisplay:
    return LiveDisplay(out, title) if out.is_terminal else PlainDisplay(out, title)


def _log_line(event: dict[str, Any]) -> types.BuildLogLine:
    return types.BuildLogLine.model_validate({k: v for k, v in event.items() if k != "type"})


def _stream(
    url: str,
    token: str | None,
    owner: str,
    name: str,
    number: int,
    events: queue.Queue[tuple[str, Any]],
    stop: threading.Event,
) -> None:
    """Put the build's log events on ``events`` (``log``, then ``end``, or
    ``error``); reconnects after the last line seen when the stream breaks."""
    after = 0
    failures = 0
    with Client(url, token) as api:
        while not stop.is_set():
            try:
                for item in api.follow_build_logs(owner, name, build=number, after=after):
                    failures = 0
                    if item.get("type") == "end":
                        events.put(("end", item))
                        return
                    if item.get("type") == "log":
                        after = max(after, int(item["id"]))
                        events.put(("log", item))
                    if stop.is_set():
                        return
                problem: Exception = ConnectionFailed("the log stream ended early")
            except ConnectionFailed as exc:
                problem = exc
            except Exception as exc:
                events.put(("error", exc))
                return
            failures += 1
            if failures > 5:
                events.put(("error", problem))
                return
            time.sleep(min(5.0, 0.5 * 2**failures))


def follow(
    session: Session,
    owner: str,
    name: str,
    build: types.WorkspaceBuild,
    out: Console,
    what: str | None = None,
) -> types.WorkspaceBuild:
    """Show a build until it ends; returns it as it ended."""
    title = f"Build {build.number} ({what or _what(build)}) of {_label(owner, name)}"
    display = _display(out, title)
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    stop = threading.Event()
    api = session.api
    thread = threading.Thread(
        target=_stream,
        args=(api.url, api.token, owner, name, build.number, events, stop),
        name="stockade-logs",
        daemon=True,
    )
    thread.start()
    current = build
    end: dict[str, Any] | None = None
    polled = 0.0
    try:
        display.update(current)
        while end is None:
            try:
                kind, item = events.get(timeout=0.25)
            except queue.Empty:
                kind, item = "", None
            if kind == "error":
                if _gone_after_delete(item, build):
                    end = {"status": "succeeded"}
                    break
                raise item
            if kind == "end":
                end = item
                break
            if kind == "log":
                line = _log_line(item)
                if line.stage and not any(s.name == line.stage for s in current.stages):
                    polled = 0.0  # a new stage: show it now
                display.line(line)
            if time.monotonic() - polled >= 1.0:
                polled = time.monotonic()
                current = _poll(api, owner, name, current)
                display.update(current)
        final = _poll(api, owner, name, current, end_status=str(end["status"]))
        display.update(final)
    except KeyboardInterrupt:
        display.close()
        err_console.print(
            f"Stopped following; the build goes on. Cancel it with: stockade cancel "
            f"{_label(owner, name)}"
        )
        raise
    finally:
        stop.set()
        display.close()
    return final


def _what(build: types.WorkspaceBuild) -> str:
    return "restart: stop" if build.restart else build.transition


def _poll(
    api: Client,
    owner: str,
    name: str,
    current: types.WorkspaceBuild,
    *,
    end_status: str | None = None,
) -> types.WorkspaceBuild:
    """The build now; after a delete succeeded it cannot be read any more,
    so the last view with the end status stands in."""
    try:
        return api.get_build(owner, name, current.number)
    except ApiError as exc:
        if not _gone_after_delete(exc, current):
            raise
    return current.model_copy(update={"status": end_status or "succeeded"})


def _gone_after_delete(exc: BaseException, build: types.WorkspaceBuild) -> bool:
    """A workspace disappears (404) exactly when its delete build succeeds."""
    return (
        isinstance(exc, ApiError)
        and exc.status == 404
        and exc.reason == "workspace_not_found"
        and build.transition == "delete"
    )


def _next_build(api: Client, owner: str, name: str, after: int) -> types.WorkspaceBuild | None:
    """The start a succeeded restart's stop queued."""
    deadline = time.monotonic() + 10.0
    while True:
        later = [b for b in api.list_builds(owner, name) if b.number > after]
        if later:
            return later[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _queued(
    session: Session,
    owner: str,
    name: str,
    build: types.WorkspaceBuild,
    *,
    follow_it: bool,
    output: Format,
    known: types.Workspace | None = None,
    what: str | None = None,
    wait_agent: bool = False,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
) -> None:
    """After queuing: follow the build (and a restart's start), print the
    outcome, and fail when the build did not succeed; after a start, wait
    for the agent when asked."""
    api = session.api
    label = _label(owner, name)
    if not follow_it:
        if output is Format.JSON:
            print_json(_workspace(api, owner, name, known, build))
        else:
            console.print(
                f"Queued build {build.number} ({what or _what(build)}) of {label}. "
                f"Follow it with: stockade logs {label} --follow"
            )
        return
    out = err_console if output is Format.JSON else console
    final = follow(session, owner, name, build, out, what)
    if final.restart and final.status == "succeeded":
        following = _next_build(api, owner, name, final.number)
        if following is None:
            raise UserError(f"the restart of {label} stopped it but queued no start")
        final = follow(session, owner, name, following, out)
    workspace = _workspace(api, owner, name, known, final)
    settled: str | None = None
    if output is not Format.JSON and final.status == "succeeded":
        seconds = _build_seconds(final)
        took = f" in {_seconds(seconds)}" if seconds is not None else ""
        if workspace.status == "deleted":
            console.print(f"Deleted {label}.")
        else:
            console.print(f"{label} is {workspace.status} (build {final.number} succeeded{took}).")
    if final.status != "succeeded":
        if output is Format.JSON:
            print_json(workspace)
        problem = final.error or final.reason or "no reason given"
        raise UserError(
            f"build {final.number} ({final.transition}) of {label} {final.status}: {problem}"
        )
    if wait_agent and final.transition == "start":
        settled = wait_for_agent(api, owner, name, out, timeout=agent_timeout)
        workspace = _workspace(api, owner, name, known, final)
    if output is Format.JSON:
        print_json(workspace)
    if settled is not None and settled != "ready":
        raise UserError(_agent_problem(settled, label, agent_timeout, workspace))


def _agent_problem(settled: str, label: str, timeout: float, workspace: types.Workspace) -> str:
    """The one line that says why the agent is not ready."""
    if settled in ("start_error", "start_timeout"):
        what = "failed" if settled == "start_error" else "timed out"
        return (
            f"the startup script {what} ({settled}): see `stockade logs {label}`; the "
            "workspace runs, so you can get in and fix it"
        )
    if settled == "gone":
        return f"{label} has no agent any more (it was stopped or rebuilt meanwhile)"
    agent = workspace.agent
    if agent is None or agent.status == "connecting":
        return (
            f"the agent of {label} did not connect within {timeout:g} s: can the workspace "
            "reach the server at its agent URL? (`stockade logs` and the server's log say more)"
        )
    return (
        f"the agent of {label} is {agent.status} but not ready after {timeout:g} s "
        f"(lifecycle {agent.lifecycle_state}); `stockade logs {label} --follow` goes on"
    )


def _print_agent_lines(
    api: Client, owner: str, name: str, out: Console, after: int
) -> tuple[int, str | None]:
    """Print the agent's startup log lines after ``after``; the last id seen
    and the agent's lifecycle state (None: the workspace has no live agent)."""
    while True:
        page = api.agent_logs(owner, name, after=after)
        for line in page.logs:
            out.print(Text(line.line), soft_wrap=True)
            after = line.id
        if len(page.logs) < 1000:
            return after, page.lifecycle_state


def wait_for_agent(
    api: Client, owner: str, name: str, out: Console, *, timeout: float, after: int = 0
) -> str:
    """Print the startup script's output as the agent reports it, until its
    lifecycle settles; the final state (``ready``, ``start_error``,
    ``start_timeout``), ``gone`` when the agent was revoked, or ``timeout``."""
    label = _label(owner, name)
    started = time.monotonic()
    deadline = started + timeout
    out.print(Text(f"Waiting for the agent of {label} to run the startup script...", style="dim"))
    while True:
        after, state = _print_agent_lines(api, owner, name, out, after)
        if state is None:
            return "gone"
        if state in AGENT_SETTLED:
            # Lines sent just before the transition are already stored:
            # the agent sends them first.
            after, _ = _print_agent_lines(api, owner, name, out, after)
            if state == "ready":
                took = _seconds(time.monotonic() - started)
                out.print(f"The agent of {label} is ready ({took}).")
            return state
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(AGENT_POLL_SECONDS)


def _workspace(
    api: Client,
    owner: str,
    name: str,
    known: types.Workspace | None,
    build: types.WorkspaceBuild,
) -> types.Workspace:
    """The workspace now; once deleted, the last view marked deleted."""
    try:
        return api.get_workspace(owner, name)
    except ApiError as exc:
        if exc.status != 404 or known is None:
            raise
    status = "deleted" if build.transition == "delete" and build.status == "succeeded" else None
    return known.model_copy(update={"latest_build": build, "status": status or known.status})


# --- commands -------------------------------------------------------------------------


def create(
    name: NameArg,
    template: Annotated[str, typer.Option("--template", "-t", help="template name")],
    parameter: ParamOpt = None,
    org: Annotated[
        str | None,
        typer.Option("--org", help="the template's organization, when its name is in several"),
    ] = None,
    owner: Annotated[
        str | None,
        typer.Option(help="create it for another user (owners and user-admins)"),
    ] = None,
    no_follow: NoFollowOpt = False,
    no_wait: NoWaitOpt = False,
    agent_timeout: AgentTimeoutOpt = DEFAULT_AGENT_TIMEOUT,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a workspace from a template, start it and wait for its agent."""
    with client() as api:
        session = Session(api)
        if "/" in name:
            named_owner, name = session.target(name)
            if owner is not None and owner != named_owner:
                raise UserError(f"--owner {owner} and {named_owner}/{name} disagree")
            owner = named_owner
        manifest = _cached(lambda: _manifest(api, template, org=org))
        values = parse_parameters(parameter or [], manifest() if parameter else None)
        workspace = _asking_for_missing(
            lambda v: api.create_workspace(name, template, v, owner=owner, org=org),
            values,
            manifest,
        )
        _queued(
            session,
            workspace.owner_name,
            workspace.name,
            workspace.latest_build,
            follow_it=not no_follow,
            output=output,
            known=workspace,
            wait_agent=not no_wait,
            agent_timeout=agent_timeout,
        )


def list_(
    owner: Annotated[str | None, typer.Option(help="this user's workspaces")] = None,
    all_: Annotated[
        bool, typer.Option("--all", "-a", help="every workspace you may see (admins: all)")
    ] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """List your workspaces (or another user's, or all you may see)."""
    if owner is not None and all_:
        raise UserError("give --owner or --all, not both")
    with client() as api:
        if not all_ and owner is None:
            owner = Session(api).me()
        page = api.list_workspaces(owner=owner)
    if output is Format.JSON:
        print_json(page.workspaces)
        return
    columns = COLUMNS
    if any(w.organization != DEFAULT_ORG for w in page.workspaces):
        columns = [*COLUMNS[:3], "organization", *COLUMNS[3:]]
    print_table(page.workspaces, columns)
    console.print(f"{page.count} workspace(s)", style="dim")


def show_(name: NameArg, output: OutputOpt = Format.TABLE) -> None:
    """Show a workspace: status, template, parameters and its latest build."""
    with client() as api:
        owner, name = Session(api).target(name)
        workspace = api.get_workspace(owner, name)
    if output is Format.JSON:
        print_json(workspace)
        return
    show(workspace, output, SHOW_COLUMNS)
    build = workspace.latest_build
    summary = f"#{build.number} {build.transition} {build.status}"
    if build.restart:
        summary += " (restart)"
    if build.finished_at is not None:
        summary += f" in {_seconds(_build_seconds(build))}"
    if build.worker_name:
        summary += f" on {build.worker_name}"
    if build.error:
        summary += f": {build.error}"
    console.print(Text.assemble(("latest build:", "bold"), " ", summary))
    for stage in build.stages:
        console.print(Text(f"  {stage.name}  {_seconds(stage.seconds)}"))


def _build_command(
    spec: str,
    transition: Literal["start", "stop", "restart", "delete"],
    *,
    parameter: list[str] | None = None,
    update: bool = False,
    cancel_running: bool = False,
    no_follow: bool,
    output: Format,
    ask: bool = True,
    wait_agent: bool = False,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
) -> None:
    with client() as api:
        session = Session(api)
        owner, name = session.target(spec)
        known: types.Workspace | None = None
        if transition == "delete" or parameter or update:
            known = api.get_workspace(owner, name)
        workspace = known

        def manifest_of() -> Manifest | None:
            if workspace is None:
                return None
            number = None if update else workspace.template_version
            return _manifest(api, workspace.template_name, number, org=workspace.organization)

        manifest = _cached(manifest_of)
        values = parse_parameters(parameter or [], manifest() if parameter else None)

        def queue_it(v: dict[str, Any]) -> types.WorkspaceBuild:
            return api.create_build(
                owner,
                name,
                transition,
                update=update,
                parameters=v,
                cancel_running=cancel_running,
            )

        if ask and workspace is not None:
            build = _asking_for_missing(queue_it, values, manifest)
        else:
            build = queue_it(values)
        _queued(
            session,
            owner,
            name,
            build,
            follow_it=not no_follow,
            output=output,
            known=known,
            what="update" if update else None,
            wait_agent=wait_agent,
            agent_timeout=agent_timeout,
        )


def start(
    name: NameArg,
    parameter: ParamOpt = None,
    cancel_running: CancelRunningOpt = False,
    no_follow: NoFollowOpt = False,
    no_wait: NoWaitOpt = False,
    agent_timeout: AgentTimeoutOpt = DEFAULT_AGENT_TIMEOUT,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Start a workspace (mutable parameters may change with --parameter) and
    wait for its agent."""
    _build_command(
        name,
        "start",
        parameter=parameter,
        cancel_running=cancel_running,
        no_follow=no_follow,
        output=output,
        wait_agent=not no_wait,
        agent_timeout=agent_timeout,
    )


def stop(
    name: NameArg,
    cancel_running: CancelRunningOpt = False,
    no_follow: NoFollowOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Stop a workspace; its home stays."""
    _build_command(name, "stop", cancel_running=cancel_running, no_follow=no_follow, output=output)


def restart(
    name: NameArg,
    cancel_running: CancelRunningOpt = False,
    no_follow: NoFollowOpt = False,
    no_wait: NoWaitOpt = False,
    agent_timeout: AgentTimeoutOpt = DEFAULT_AGENT_TIMEOUT,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Stop a workspace, then start it again and wait for its agent."""
    _build_command(
        name,
        "restart",
        cancel_running=cancel_running,
        no_follow=no_follow,
        output=output,
        wait_agent=not no_wait,
        agent_timeout=agent_timeout,
    )


def update(
    name: NameArg,
    parameter: ParamOpt = None,
    cancel_running: CancelRunningOpt = False,
    no_follow: NoFollowOpt = False,
    no_wait: NoWaitOpt = False,
    agent_timeout: AgentTimeoutOpt = DEFAULT_AGENT_TIMEOUT,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Move a workspace to its template's active version, start it and wait
    for its agent.

    Parameters the new version requires are asked for on a terminal; give them
    with --parameter otherwise."""
    _build_command(
        name,
        "start",
        parameter=parameter,
        update=True,
        cancel_running=cancel_running,
        no_follow=no_follow,
        output=output,
        wait_agent=not no_wait,
        agent_timeout=agent_timeout,
    )


def delete(
    name: NameArg,
    yes: YesOpt = False,
    cancel_running: CancelRunningOpt = False,
    no_follow: NoFollowOpt = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Delete a workspace and its home: everything in it is lost."""
    confirm(
        f"Delete workspace {name}? Its home directory and everything in it are lost for good.",
        yes,
    )
    _build_command(
        name, "delete", cancel_running=cancel_running, no_follow=no_follow, output=output
    )


def logs(
    name: NameArg,
    build: Annotated[
        int | None, typer.Option("--build", "-b", min=1, help="build number (default: latest)")
    ] = None,
    follow_: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="print lines as they come until the build ends (and the agent is ready)",
        ),
    ] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Print a build's log (the latest build by default), then, for the
    latest build when it started the workspace, what its agent's startup
    script printed (``--output json``: the build's lines only)."""
    with client() as api:
        owner, name = Session(api).target(name)
        if follow_:
            _follow_logs(api, owner, name, build, output)
            if output is not Format.JSON:
                _agent_section(api, owner, name, build, follow_it=True)
            return
        lines: list[types.BuildLogLine] = []
        after = 0
        while True:
            page = api.build_logs(owner, name, build=build, after=after)
            lines.extend(page.logs)
            if len(page.logs) < 1000:
                break
            after = page.logs[-1].id
        if output is Format.JSON:
            print_json(lines)
            return
        printer = PlainDisplay(console)
        for line in lines:
            printer.line(line)
        if page.build_status not in FINISHED:
            err_console.print(f"(the build is {page.build_status}: add --follow to see the rest)")
            return
        _agent_section(api, owner, name, build, follow_it=False)


def _agent_section(
    api: Client, owner: str, name: str, build: int | None, *, follow_it: bool
) -> None:
    """The agent's startup log after the build log, when the build shown is
    the latest and it started the workspace (the agent belongs to it)."""
    workspace = api.get_workspace(owner, name)
    latest = workspace.latest_build
    if build not in (None, latest.number) or latest.transition != "start":
        return
    if latest.status != "succeeded":
        return
    agent = workspace.agent
    state = agent.lifecycle_state if agent is not None else "none"
    status = agent.status if agent is not None else "none"
    console.print(Text(f"== startup script (agent {status}, {state})", style="bold"))
    if follow_it:
        settled = wait_for_agent(api, owner, name, console, timeout=DEFAULT_AGENT_TIMEOUT)
        if settled not in ("ready",):
            err_console.print(f"agent: {settled}")
        return
    _, state_now = _print_agent_lines(api, owner, name, console, 0)
    if state_now not in AGENT_SETTLED:
        err_console.print(f"(the agent is {state_now or 'gone'}: add --follow to see the rest)")


def _follow_logs(api: Client, owner: str, name: str, build: int | None, output: Format) -> None:
    printer = PlainDisplay(console)
    for item in api.follow_build_logs(owner, name, build=build):
        if output is Format.JSON:
            console.file.write(json.dumps(item) + "\n")
            console.file.flush()
            continue
        if item.get("type") == "log":
            printer.line(_log_line(item))
        elif item.get("type") == "end":
            err_console.print(f"build {item.get('build_number')} {item.get('status')}")


def cancel(
    name: NameArg,
    build: Annotated[
        int | None, typer.Option("--build", "-b", min=1, help="build number (default: latest)")
    ] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Cancel a workspace's build (the latest by default)."""
    with client() as api:
        owner, name = Session(api).target(name)
        number = build if build is not None else api.get_workspace(owner, name).latest_build.number
        result = api.cancel_build(owner, name, number)
    if output is Format.JSON:
        print_json(result)
        return
    label = _label(owner, name)
    if result.status == "canceled":
        console.print(f"Canceled build {result.number} of {label}.")
    else:
        console.print(
            f"Asked the provisioner to stop build {result.number} of {label} (now {result.status})."
        )


def register(app: typer.Typer) -> None:
    """The workspace commands are top-level: ``stockade create`` ..."""
    app.command("create")(create)
    app.command("list")(list_)
    app.command("show")(show_)
    app.command("start")(start)
    app.command("stop")(stop)
    app.command("restart")(restart)
    app.command("update")(update)
    app.command("delete")(delete)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
