"""The tunnel's wire contract (version 1), shared by server, agent and CLI.

This module runs inside workspaces too (Python 3.9+, standard library only).

How a stream comes to be, with the agent only ever connecting out:

1. A client (``stockade ssh``, ``port-forward``, the app proxy, the web
   terminal) opens a WebSocket to :data:`CLIENT_PATH` on any server replica,
   naming the kind of stream in the query (``kind=ssh``, ``kind=tcp&port=N``,
   ``kind=pty&id=...``), authenticated as a user. The server checks that the
   user may connect to the workspace and records the connection (audit).
2. The server sends the workspace's agent, over the agent's control
   connection, an ``open_stream`` message: ``{type, id, kind, port?, host?,
   pty?}``. ``id`` is a random stream id (:data:`STREAM_ID_LENGTH` hex chars).
3. The agent opens the target (a TCP connection inside the workspace, its SSH
   server, a PTY) and *dials back*: a new WebSocket to :data:`AGENT_STREAM_PATH`
   with its agent token. If the target cannot be opened it answers on the
   control connection instead: ``{type: "stream_error", id, code, reason}``
   with a close code below.
4. The server tells the client the stream is open (the text message
   :data:`OPENED_MESSAGE`; a refusal is a close with a code below instead),
   pairs the two WebSockets and relays their messages both ways until either
   side closes; a 4xxx close code and its reason travel to the other side.
   Binary messages are the stream's bytes. Text messages are JSON control
   messages: ``{"type": "eof"}`` (:data:`EOF_MESSAGE`) says the sender will
   send no more bytes but still reads (TCP half-close); a kind may define
   more (a PTY's window size).

Each stream is its own WebSocket (its own TCP connection), so streams never
wait behind each other: a slow reader stalls only its own stream, and TCP's
flow control does the backpressure with nothing buffered without bound. The
agent's control connection carries only small JSON messages.

Replicas: step 2 is the only step that must reach the replica holding the
agent's control connection (another replica passes the message through it).
The stream id begins with the id of the replica the client reached, so a
replica that receives the dial-back of step 3 for another's stream carries
it there (``stockade.server.connections.hop``); agents see none of this.
"""

from __future__ import annotations

import json

CLIENT_PATH = "/api/v2/workspaces/{owner}/{name}/tunnel"
AGENT_STREAM_PATH = "/api/v2/workspaceagents/me/streams/{stream_id}"
STREAM_ID_LENGTH = 32

KIND_SSH = "ssh"
KIND_TCP = "tcp"
KIND_PTY = "pty"

OPENED_MESSAGE = json.dumps({"type": "opened"})
EOF_MESSAGE = json.dumps({"type": "eof"})


def control_type(message: str) -> str:
    """The ``type`` of a text (control) message, or "" when it has none."""
    try:
        parsed = json.loads(message)
    except ValueError:
        return ""
    value = parsed.get("type") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else ""


# The agent has this long to dial back after an open_stream.
DIAL_TIMEOUT_SECONDS = 15.0
# Largest message either side sends on a stream; readers accept any size up
# to MAX_MESSAGE_BYTES.
CHUNK_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024

# Close codes (4000-4999 are the application's). A client maps them to its
# message; the reason text is for a person.
CLOSE_NORMAL = 1000
CLOSE_BAD_REQUEST = 4400  # malformed kind/port/id
CLOSE_UNAUTHENTICATED = 4401  # no valid session or token
CLOSE_NOT_FOUND = 4404  # no such workspace, or not allowed to see it
CLOSE_FORBIDDEN = 4403  # may see the workspace but not connect to it
CLOSE_AGENT_UNAVAILABLE = 4409  # workspace not running / agent not connected
CLOSE_PTY_TAKEN_OVER = 4410  # another client attached to this terminal: do not reconnect
CLOSE_TOO_MANY = 4429  # too many open streams
CLOSE_TARGET_REFUSED = 4502  # the port inside the workspace refused or is closed
CLOSE_UNSUPPORTED = 4503  # the agent cannot serve this kind (e.g. no SSH here)
CLOSE_DIAL_TIMEOUT = 4504  # the agent did not dial back in time


def valid_stream_id(value: str) -> bool:
    """Whether ``value`` looks like a stream id (lower-case hex of the length)."""
    return len(value) == STREAM_ID_LENGTH and all(c in "0123456789abcdef" for c in value)


def valid_port(value: object) -> bool:
    """A TCP port a stream may target (1-65535)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
