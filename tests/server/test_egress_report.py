"""The egress report's storage on both databases: counts from several
flushes (and several replicas) add up per destination and decision, first
and last seen widen, and a failed flush loses nothing."""

from __future__ import annotations

import pytest

from stockade.egress import EgressLedger, EgressPolicy
from stockade.egress.guard import REASON_PRIVATE
from stockade.server.db import Database, migrate
from stockade.server.egress.service import EgressService


async def test_report_adds_up(empty_database: Database) -> None:
    await migrate.upgrade(empty_database)
    policy = EgressPolicy.build(["idp.corp.internal"])
    # Two replicas: two ledgers, one table.
    first, second = EgressLedger(), EgressLedger()
    replica_a = EgressService(empty_database, policy, first)
    replica_b = EgressService(empty_database, policy, second)
    first.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE, 2, 100.0, 200.0)
    first.record("server", "resolve", "example.com", 443, False, "not on the allow-list")
    await replica_a.flush()
    second.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE, 3, 50.0, 150.0)
    second.record("provisioner", "resolve", "idp.corp.internal", 443, True,
                  "allow-list entry idp.corp.internal")  # fmt: skip
    # What an agent sent: taken under its workspace, malformed records dropped.
    taken = replica_b.add_remote(
        "agent:00000000-0000-0000-0000-000000000000",
        [{"kind": "connect", "destination": "203.0.113.7", "port": 80, "allowed": False,
          "reason": "not on the allow-list", "count": 4, "first_seen": 10, "last_seen": 20},
         {"kind": "connect"}, "junk"],
    )  # fmt: skip
    assert taken == 1
    await replica_b.flush()

    report = await replica_a.report()
    rows = {(d.component, d.kind, d.destination, d.allowed): d for d in report.destinations}
    database = rows[("server", "connect", "10.0.0.5", True)]
    assert database.count == 5 and database.internal
    assert database.first_seen.timestamp() == 50.0 and database.last_seen.timestamp() == 200.0
    idp = rows[("provisioner", "resolve", "idp.corp.internal", True)]
    assert not idp.internal  # allowed only because the allow-list names it
    agent = rows[("agent", "connect", "203.0.113.7", False)]
    assert agent.workspace == "(deleted workspace 00000000-0000-0000-0000-000000000000)"
    assert agent.count == 4
    assert report.denied == 4 + 1
    assert report.external_allowed == 1
    assert "idp.corp.internal" in report.allow_list


async def test_a_failed_flush_keeps_the_counts(empty_database: Database) -> None:
    ledger = EgressLedger()
    service = EgressService(empty_database, EgressPolicy.build(), ledger)
    ledger.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE)
    with pytest.raises(Exception, match="egress_destinations"):
        await service.flush()  # not migrated: the table is missing
    await migrate.upgrade(empty_database)
    await service.flush()
    report = await service.report()
    assert [(d.destination, d.count) for d in report.destinations] == [("10.0.0.5", 1)]
