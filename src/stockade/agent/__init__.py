"""The workspace agent: runs inside every workspace, connects out to the
control plane, runs the template's startup script and reports.

It imports nothing from the server, the CLI, the SDK or the provisioner, and
runs on Python 3.9+ with only the standard library plus ``wsproto`` and
``h11`` (pure Python), which the control plane delivers in the agent bundle
(:mod:`stockade.agent.bundle`). Importing this package is cheap: the server
imports :mod:`stockade.agent.protocol` and :mod:`stockade.agent.bundle`
without loading the agent itself.
"""

from __future__ import annotations


def main() -> int:
    """Run the agent (see :mod:`stockade.agent.agent`); the exit code."""
    from stockade.agent.agent import main as agent_main

    return agent_main()
