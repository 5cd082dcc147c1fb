"""Shared by the event-channel service tests: two domains talking through a broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

import grant_broker_client
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.evtchn import EventsLost, EvtchnSubscription, PortFired

TIMEOUT = 5.0

# No Xen host has a domain this high (DOMID_FIRST_RESERVED is 0x7FF0).
UNKNOWN_DOMID = 0x7FEF


@dataclass
class Pair:
    """Domain 2 (*server*) offered *server_port* to domain 1 (*client*), which
    connected to it as *client_port*."""

    client: Session
    server: Session
    client_port: int
    server_port: int


@asynccontextmanager
async def two_domains(socket_path: str) -> AsyncIterator[tuple[Session, Session]]:
    """Sessions acting as domain 1 and domain 2 on the emulated backend."""
    async with await grant_broker_client.connect(socket_path, domid=1, client_name="domain 1") as one, \
               await grant_broker_client.connect(socket_path, domid=2, client_name="domain 2") as two:
        yield one, two


async def connect_pair(client: Session, server: Session) -> Pair:
    server_port = await server.evtchn.bind_unbound_port(remote_domain=client.domid)
    client_port = await client.evtchn.bind_interdomain(remote_domain=server.domid, remote_port=server_port)
    return Pair(client, server, client_port, server_port)


async def next_event(subscription: EvtchnSubscription) -> PortFired | EventsLost:
    return await asyncio.wait_for(anext(subscription), TIMEOUT)


async def nothing_more(subscription: EvtchnSubscription, wait: float = 0.2) -> None:
    """Assert that no event arrives within *wait* seconds."""
    try:
        event = await asyncio.wait_for(anext(subscription), wait)
    except TimeoutError:
        return
    pytest.fail(f"unexpected event {event}")


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, errno_: int) -> BrokerClientError:
    with pytest.raises(BrokerClientError) as raised:
        await call
    error = raised.value
    assert (error.code, error.errno) == (code, errno_), str(error)
    return error
