"""The hop endpoint between replicas only opens for a request signed with
the deployment's key, for the stream id and agent it names, recently; a
signed request for a stream nobody asked for opens nothing. (The hop at
work, between two replicas, is in test_replica_streams.py.)"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stockade.sdk import Client
from stockade.server.connections.hop import (
    AGENT_HEADER,
    HOP_PATH,
    MAX_SKEW_SECONDS,
    SIGNATURE_HEADER,
    HopSigner,
)
from tests.conftest import OWNER_PASSWORD, ServerFactory

SQLITE_ONLY = "the hop's checks happen before the database is read"
KEY = secrets.token_hex(32)


def test_a_signature_binds_the_stream_the_agent_and_the_time() -> None:
    signer = HopSigner(KEY.encode())
    stream, agent = "a" * 32, "agent1"
    good = signer.sign(stream, agent)
    assert signer.verify(stream, agent, good)
    assert not signer.verify("b" * 32, agent, good)
    assert not signer.verify(stream, "agent2", good)
    assert not HopSigner(b"another deployment").verify(stream, agent, good)
    old = int(time.time()) - MAX_SKEW_SECONDS - 5
    stale = f"{old}.{signer._mac(stream, agent, old)}"
    assert not signer.verify(stream, agent, stale)
    for garbage in ("", ".", "x.y", "12345678901234.00", good.replace(".", "")):
        assert not signer.verify(stream, agent, garbage)


def test_the_hop_endpoint_refuses_unsigned_requests_and_opens_no_unknown_stream(
    start_server: ServerFactory,
) -> None:
    server = start_server(env={"STOCKADE_AUDIT_KEY": KEY, "STOCKADE_PROVISIONER_WORKERS": "0"})
    url = server.url.replace("http", "ws", 1) + HOP_PATH.format(stream_id="c" * 32)
    signer = HopSigner(KEY.encode())

    async def attempt(headers: dict[str, str]) -> None:
        async with connect(url, additional_headers=headers, proxy=None, open_timeout=10) as ws:
            await asyncio.wait_for(ws.recv(), 10)

    refusals = [
        {},
        {AGENT_HEADER: "agent1"},
        {AGENT_HEADER: "agent1", SIGNATURE_HEADER: HopSigner(b"other").sign("c" * 32, "agent1")},
        {AGENT_HEADER: "agent2", SIGNATURE_HEADER: signer.sign("c" * 32, "agent1")},
    ]
    for headers in refusals:
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(attempt(headers))
        assert refused.value.response.status_code == 403
        assert refused.value.response.body in (b"", None)
    # Signed, but no stream of that id is waiting here: refused the same way
    # (what differs is only the counter of signed hops).
    signed = {AGENT_HEADER: "agent1", SIGNATURE_HEADER: signer.sign("c" * 32, "agent1")}
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(attempt(signed))
    assert refused.value.response.status_code == 403

    with Client(server.url) as owner:
        owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
        owner.login("owner", OWNER_PASSWORD)
        hops = owner.health().relay["hops"]
    assert hops["refused"] == len(refusals) and hops["accepted"] == 1, hops
