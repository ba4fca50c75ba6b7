"""The agent <-> control plane protocol (version 1), shared by both sides.

The agent opens a WebSocket to ``{access_url}/api/v2/workspaceagents/me/connect``
with ``Authorization: Bearer <agent token>`` (the token is per workspace, new
at every start build, revoked at stop and delete). Every frame is a JSON text
frame: an object with a ``type``.

Agent -> server:
  ``hello``        {version, hostname, os, arch, python}; first frame of every connection
  ``lifecycle``    {state, time}; state in LIFECYCLE_STATES
  ``startup_log``  {lines: [{time, line}]}; the startup script's output, in order
  ``metadata``     {items: [{key, value, error, collected_at}]}
Server -> agent:
  ``manifest``     {workspace_id, workspace_name, owner, startup_script,
                    startup_timeout, metadata: [{key, display_name, script,
                    interval, timeout}], env: {NAME: value}}; the answer to hello
  ``close``        {reason}; the token was revoked: stop reconnecting

Times are ISO 8601 UTC strings. Unknown types and fields are ignored by both
sides, so either can be newer than the other.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
CONNECT_PATH = "/api/v2/workspaceagents/me/connect"
LIFECYCLE_STATES = (
    "created",
    "starting",
    "ready",
    "start_error",
    "start_timeout",
    "shutting_down",
    "off",
)
# Close code the server uses for a refused or revoked token: do not retry.
CLOSE_TOKEN_REFUSED = 4401
