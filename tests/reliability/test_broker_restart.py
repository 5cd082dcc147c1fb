"""The broker killed and restarted under running clients: UNAVAILABLE, then a new session.

What must hold (and what the README and ``grant_broker_client.reconnect``
promise):

* every call of a session whose broker went away fails with
  ``BrokerClientError`` code UNAVAILABLE — in flight at the crash, made while
  no broker runs, and made once a new broker runs (which does not know the
  token) — never PERMISSION_DENIED, CANCELLED, INTERNAL or UNKNOWN;
* ``ReconnectingSession`` / ``connect(retry=Retry())`` open a new session with
  backoff once a broker is back, and the work goes on there;
* nothing of the old session survives in the broker, but the memory the
  client had mapped (memfd-backed on the emulated backend) stays readable in
  the client.
"""

from __future__ import annotations

import asyncio
import errno
import random
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

import grant_broker_client
from grant_broker_client import BrokerClientError, ReconnectingSession, Retry, Session

from .conftest import Daemon, start_daemon, stop_daemon

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAST = Retry(initial_delay=0.02, max_delay=0.5, timeout=30)
RESTARTS = 3


async def restart(daemon: Daemon, sig: int) -> Daemon:
    """Stop *daemon* with *sig* and start a new broker on the same socket."""
    await asyncio.to_thread(daemon.kill, sig)
    await asyncio.sleep(0.2)  # clients run into a missing broker for a while
    return await asyncio.to_thread(start_daemon, daemon.socket_path, log_path=daemon.log_path)


@pytest.fixture
def socket_path(short_tmp: Path) -> str:
    return str(short_tmp / "broker.sock")


async def test_running_clients_see_unavailable_and_carry_on_in_new_sessions(socket_path: str, seed: int) -> None:
    rng = random.Random(seed)
    daemon = start_daemon(socket_path)
    codes: Counter[str] = Counter()
    progress: Counter[tuple[int, int]] = Counter()  # (client, generation) -> iterations
    stop = asyncio.Event()

    async def client(n: int) -> int:
        async with ReconnectingSession(socket_path, domid=1 + n, retry=FAST, client_name=f"client {n}") as broker:

            async def work(session: Session) -> None:
                async with await session.gntalloc.share(9, 1) as pages:
                    port = await session.evtchn.bind_unbound_port(9)
                    async with session.evtchn.subscribe([port]):
                        while not stop.is_set():
                            pages.view[0:8] = rng.randbytes(8)
                            await session.describe()
                            await session.evtchn.unmask(port)
                            progress[n, broker.generation] += 1
                            await asyncio.sleep(0.002)

            while not stop.is_set():
                try:
                    await broker.run(work, max_renewals=0)
                except BrokerClientError as exc:
                    codes[exc.code.name] += 1
                    assert exc.code == UNAVAILABLE, f"client {n}: {exc}"
            return broker.generation

    clients = [asyncio.ensure_future(client(n)) for n in range(4)]
    try:
        await asyncio.sleep(0.5)
        for r in range(RESTARTS):
            daemon = await restart(daemon, signal.SIGKILL if r % 2 == 0 else signal.SIGTERM)
            deadline = time.monotonic() + 20
            # Every client works again, in a new session (its generation r + 2), before the next restart.
            while not all(progress[n, r + 2] >= 10 for n in range(4)):
                assert time.monotonic() < deadline, f"no progress after restart {r + 1}: {progress} {codes}"
                await asyncio.sleep(0.05)
        stop.set()
        generations = await asyncio.gather(*clients)
    finally:
        stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        stop_daemon(daemon)
    assert generations == [RESTARTS + 1] * 4, generations
    assert set(codes) <= {"UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] >= RESTARTS, codes  # each client's work was interrupted, and said so
    print(f"restart: {RESTARTS} restarts, {sum(progress.values())} iterations, errors seen by the clients: {dict(codes)}")


async def test_a_lost_session_answers_unavailable_also_on_the_new_broker(socket_path: str) -> None:
    daemon = start_daemon(socket_path)
    try:
        async with await grant_broker_client.connect(socket_path, domid=1) as sharer, \
                await grant_broker_client.connect(socket_path, domid=2) as mapper:
            pages = await sharer.gntalloc.share(2, 2)
            pages.view[0:5] = b"kept?"
            mapping = await mapper.gntdev.map([(1, ref) for ref in pages.refs])
            assert bytes(mapping.view[0:5]) == b"kept?"
            port = await sharer.evtchn.bind_unbound_port(2)
            events = await sharer.evtchn.subscribe([port])
            in_flight = [asyncio.ensure_future(sharer.describe()) for _ in range(200)]

            daemon.kill(signal.SIGKILL)
            for call in asyncio.as_completed(in_flight):
                try:
                    await call
                except BrokerClientError as exc:
                    assert exc.code == UNAVAILABLE, str(exc)
            with pytest.raises(BrokerClientError) as raised:
                await anext(events)
            assert raised.value.code == UNAVAILABLE, str(raised.value)
            await events.close()

            # No broker: UNAVAILABLE, and the SDK knows the session is gone.
            with pytest.raises(BrokerClientError) as raised:
                await sharer.describe()
            assert raised.value.code == UNAVAILABLE and sharer.broker_lost and mapper.broker_lost

            # A new broker on the same socket does not know the old tokens: still UNAVAILABLE, not PERMISSION_DENIED.
            daemon = start_daemon(socket_path, log_path=daemon.log_path)
            for call in (sharer.describe(), mapper.gntdev.map([(1, pages.refs[0])]), sharer.evtchn.notify(port)):
                with pytest.raises(BrokerClientError) as raised:
                    await call
                assert raised.value.code == UNAVAILABLE, str(raised.value)
                assert raised.value.errno == errno.ECONNRESET and "open a new session" in raised.value.detail

            # The memory mapped before the crash is still there, in this process.
            assert bytes(mapping.view[0:5]) == b"kept?" and bytes(pages.view[0:5]) == b"kept?"
            mapping.view[5:7] = b"!!"
            assert bytes(pages.view[0:7]) == b"kept?!!"  # one memfd, still shared within this process
            # Closing the old objects does not try the dead session.
            await mapping.aclose()
            await pages.aclose()

            # Nothing of the old sessions in the new broker; a new session works.
            status = await daemon.status()
            assert list(status.sessions) == []
            async with await grant_broker_client.connect(socket_path, domid=1) as again:
                assert again.session_id == 1
                async with await again.gntalloc.share(2, 1) as fresh:
                    assert bytes(fresh.view[0:5]) == bytes(5)
    finally:
        stop_daemon(daemon)


async def test_connect_with_retry_waits_for_a_broker_that_starts_later(socket_path: str) -> None:
    connecting = asyncio.ensure_future(grant_broker_client.connect(socket_path, domid=4, retry=FAST))
    await asyncio.sleep(0.5)
    assert not connecting.done()
    daemon = await asyncio.to_thread(start_daemon, socket_path)
    try:
        async with await asyncio.wait_for(connecting, 20) as session:
            assert (await session.describe()).domid == 4
    finally:
        stop_daemon(daemon)


async def test_connect_with_retry_gives_up_with_unavailable(socket_path: str) -> None:
    retry = Retry(initial_delay=0.05, multiplier=2, max_delay=0.1, jitter=0, attempts=4)
    started = time.monotonic()
    with pytest.raises(BrokerClientError) as raised:
        await grant_broker_client.connect(socket_path, retry=retry)
    elapsed = time.monotonic() - started
    assert raised.value.code == UNAVAILABLE and "gave up after 4 attempts" in str(raised.value)
    assert 0.05 + 0.1 + 0.1 <= elapsed < 5  # three pauses between four attempts


async def test_connect_with_retry_does_not_retry_a_refusal(daemon: Daemon) -> None:
    # A refused hello (here: a domain the emulated hypervisor cannot have) will
    # not change by waiting: it is raised at once, not retried until the timeout.
    started = time.monotonic()
    with pytest.raises(BrokerClientError) as raised:
        await grant_broker_client.connect(daemon.socket_path, domid=0x7FF0, retry=Retry(timeout=30))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.errno == errno.EINVAL and "0x7FEF" in str(raised.value)
    assert time.monotonic() - started < 5


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    retry = Retry(initial_delay=0.1, multiplier=2, max_delay=1.0, jitter=0.25)
    rng = random.Random(1)
    for attempt, nominal in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        for _ in range(50):
            assert nominal * 0.75 <= retry.delay(attempt, rng) <= nominal
