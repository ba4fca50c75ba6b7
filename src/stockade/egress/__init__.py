"""The egress guard: an in-process allow-list for every outbound connection
and name lookup, shared by the server, the provisioner daemon and the
workspace agent.

It runs in the agent too, so it needs the standard library only and
Python 3.9 (the agent's floor); it imports nothing else of Stockade's."""

from stockade.egress.guard import (
    DEFAULT_PRIVATE_NETWORKS,
    EgressDenied,
    EgressLedger,
    EgressPolicy,
    EgressRecord,
    as_component,
    check,
    guard_installed,
    install,
    is_internal,
    ledger,
)

__all__ = [
    "DEFAULT_PRIVATE_NETWORKS",
    "EgressDenied",
    "EgressLedger",
    "EgressPolicy",
    "EgressRecord",
    "as_component",
    "check",
    "guard_installed",
    "install",
    "is_internal",
    "ledger",
]
