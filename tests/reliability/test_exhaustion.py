"""Exhaustion: out of descriptors, out of grant quota, a peer domain gone.

Each time, the caller that hit the wall gets a precise error (a status chosen
from the errno, with the errno in the details), everybody else goes on, and
the broker recovers once the resource is given back.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import grpc
import pytest

import grant_broker_client
from grant_broker.backend.emulated import EmulatedHypervisor
from grant_broker.daemon.server import BrokerServer
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.evtchn import PortFired
from grant_broker_client.gntdev import CopySegment, Foreign
from grant_broker.uapi.grant_table import GNTST_bad_domain
from waiting import eventually

from .conftest import Daemon, start_daemon, stop_daemon

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOFILE = 64


async def expect(call, code: grpc.StatusCode, *errnos: int) -> BrokerClientError:  # type: ignore[no-untyped-def]
    with pytest.raises(BrokerClientError) as raised:
        await call
    error = raised.value
    assert error.code == code and error.errno in errnos, str(error)
    return error


# --------------------------------------------------------------------------- descriptors


@pytest.fixture
def starved(short_tmp: Path):  # type: ignore[no-untyped-def]
    daemon = start_daemon(str(short_tmp / "broker.sock"), nofile=NOFILE)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


async def test_out_of_descriptors_fails_the_caller_precisely_and_spares_the_others(starved: Daemon) -> None:
    path = starved.socket_path
    async with await grant_broker_client.connect(path, domid=1, client_name="innocent") as innocent, \
            await grant_broker_client.connect(path, domid=3, client_name="bystander") as bystander:
        pages = await innocent.gntalloc.share(2, 1)
        for_bystander = await innocent.gntalloc.share(3, 1)
        for_bystander.view[0:9] = b"bystander"
        mapping = await bystander.gntdev.map([(1, for_bystander.refs[0])])
        baseline = await starved.quiet_fd_count()

        # The hog takes descriptors (sessions, mappings) until the broker has none left.
        hog: list[Session] = []
        hog_error: BrokerClientError | None = None
        try:
            for _ in range(NOFILE):
                session = await grant_broker_client.connect(path, domid=2, client_name="hog")
                hog.append(session)
                await session.gntdev.map([(1, pages.refs[0])])
        except BrokerClientError as exc:
            hog_error = exc
        assert hog_error is not None, "the hog never ran out"
        assert hog_error.code == RESOURCE_EXHAUSTED and hog_error.errno in (errno.EMFILE, errno.ENFILE), str(hog_error)
        # A failed map may leave a descriptor or two free (the backend gives
        # some back): sessions cost one each, so take the last ones too.
        for _ in range(8):
            try:
                hog.append(await grant_broker_client.connect(path, domid=2, client_name="hog"))
            except BrokerClientError as exc:
                assert exc.code == RESOURCE_EXHAUSTED and exc.errno in (errno.EMFILE, errno.ENFILE), str(exc)
                break
        else:
            pytest.fail("the broker kept accepting sessions after it ran out of descriptors")

        # While the broker is out of descriptors: calls that need none work,
        # calls that need one fail precisely, without ending the session...
        assert (await innocent.describe()).session_id == innocent.session_id
        assert bytes(mapping.view[0:9]) == b"bystander"
        (copied,) = await bystander.gntdev.grant_copy([CopySegment(Foreign(1, for_bystander.refs[0]), None, 9)])
        assert copied.data == b"bystander"
        await expect(innocent.gntdev.copy_buffer(4096), RESOURCE_EXHAUSTED, errno.EMFILE)
        assert (await innocent.describe()).session_id == innocent.session_id
        # ... and a new client is told at once, not left waiting in the backlog.
        await expect(grant_broker_client.connect(path, domid=4), RESOURCE_EXHAUSTED, errno.EMFILE, errno.ENFILE)

        for session in hog:
            await session.close()
        await starved.settle(lambda s: len(s.sessions) == 2, "the hog's sessions released")
        await starved.settle_fds(baseline)

        # Recovered: the same calls work again.
        async with await innocent.gntdev.copy_buffer(4096) as buffer:
            buffer.view[0:2] = b"ok"
        async with await grant_broker_client.connect(path, domid=4) as late:
            assert (await late.describe()).domid == 4
        await mapping.aclose()
        await pages.aclose()
        await for_bystander.aclose()
    assert starved.alive()
    assert "Traceback" not in starved.log()
    print(f"RLIMIT_NOFILE {NOFILE}: the hog got {hog_error.errno_name} after {len(hog)} sessions; others unaffected")


def test_the_broker_raises_its_soft_descriptor_limit_to_the_hard_one(short_tmp: Path) -> None:
    daemon = start_daemon(str(short_tmp / "broker.sock"), nofile="256:4096")
    try:
        with open(f"/proc/{daemon.pid}/limits") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        stop_daemon(daemon)


# --------------------------------------------------------------------------- grant quotas


@pytest.fixture
def quota_daemon(short_tmp: Path):  # type: ignore[no-untyped-def]
    # Pool budgets above the pool (default: 256 pages a session, 512 a uid),
    # so that a session can fill its domain's pool here and meet its ENOSPC.
    daemon = start_daemon(
        str(short_tmp / "broker.sock"), "--max-grants-per-session", "600",
        "--limit", "max_pool_pages_per_session=1024", "--limit", "max_pool_pages_per_uid=4096",
    )
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


async def test_a_full_grant_quota_refuses_that_session_only(quota_daemon: Daemon) -> None:
    path = quota_daemon.socket_path
    async with await grant_broker_client.connect(path, domid=1) as full, \
            await grant_broker_client.connect(path, domid=1) as other, \
            await grant_broker_client.connect(path, domid=2) as mapper:
        held = [await full.gntalloc.share(2, 500), await full.gntalloc.share(2, 100)]
        error = await expect(full.gntalloc.share(2, 1), RESOURCE_EXHAUSTED, errno.EDQUOT)
        assert "the limit is 600" in error.detail
        # Mapping counts against the same quota.
        await expect(full.gntdev.map([(2, 8)]), RESOURCE_EXHAUSTED, errno.EDQUOT)
        # Another session of the same domain has its own quota.
        async with await other.gntalloc.share(2, 5) as pages:
            async with await mapper.gntdev.map([(1, ref) for ref in pages.refs]):
                pass
        # Giving back makes room again.
        await held.pop().aclose()
        async with await full.gntalloc.share(2, 100):
            pass
        # The domain-wide limit (Linux gntalloc's `limit`, 1024 pages per
        # domain) is the hypervisor's: the session that crosses it gets ENOSPC.
        async with await other.gntalloc.share(2, 400):
            await expect(other.gntalloc.share(2, 200), RESOURCE_EXHAUSTED, errno.ENOSPC)
            async with await mapper.gntalloc.share(1, 200):  # another domain is not concerned
                pass
        async with await other.gntalloc.share(2, 200):
            pass
        for pages in held:
            await pages.aclose()
        status = await quota_daemon.status()
        assert sum(s.usage.granted_pages for s in status.sessions) == 0
    assert quota_daemon.alive()


# --------------------------------------------------------------------------- a domain disappears


def hypervisor_of(server: BrokerServer) -> EmulatedHypervisor:
    assert server.registry is not None
    backend = server.registry.sessions[0].backend
    return backend.hypervisor  # type: ignore[attr-defined,no-any-return]


async def test_a_peer_domain_that_disappears(in_process: tuple[str, BrokerServer]) -> None:
    path, server = in_process
    async with await grant_broker_client.connect(path, domid=5, client_name="doomed") as doomed, \
            await grant_broker_client.connect(path, domid=6, client_name="peer") as peer, \
            await grant_broker_client.connect(path, domid=7, client_name="bystander 7") as seven, \
            await grant_broker_client.connect(path, domid=8, client_name="bystander 8") as eight:
        pages = await doomed.gntalloc.share(6, 2)
        pages.view[0:4] = b"five"
        offered = await doomed.evtchn.bind_unbound_port(6)
        port = await peer.evtchn.bind_interdomain(5, offered)
        mapping = await peer.gntdev.map([(5, pages.refs[0])])
        other = await seven.gntalloc.share(8, 1)
        their_mapping = await eight.gntdev.map([(7, other.refs[0])])

        hypervisor_of(server).destroy_domain(5)

        # The peer: what it had mapped stays (until it unmaps); the rest is refused precisely.
        assert bytes(mapping.view[0:4]) == b"five"
        error = await expect(peer.gntdev.map([(5, pages.refs[1])]), grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL)
        assert error.gntst == GNTST_bad_domain
        (copied,) = await peer.gntdev.grant_copy([CopySegment(Foreign(5, pages.refs[1]), None, 4)])
        assert copied.status == GNTST_bad_domain
        await peer.evtchn.notify(port)  # the remote end is gone: dropped silently, as Xen does
        await mapping.aclose()
        await peer.evtchn.unbind(port)
        # The session acting as the destroyed domain: NOT_FOUND (ESRCH) for what needs the domain.
        await expect(doomed.gntalloc.share(6, 1), grpc.StatusCode.NOT_FOUND, errno.ESRCH)
        await expect(doomed.evtchn.notify(offered), grpc.StatusCode.NOT_FOUND, errno.ESRCH)
        assert (await doomed.describe()).domid == 5
        # Everybody else carries on.
        other.view[0:5] = b"seven"
        assert bytes(their_mapping.view[0:5]) == b"seven"
        offered8 = await eight.evtchn.bind_unbound_port(7)
        port7 = await seven.evtchn.bind_interdomain(8, offered8)
        async with eight.evtchn.subscribe([offered8]) as events:
            await seven.evtchn.notify(port7)
            assert await asyncio.wait_for(anext(events), 5) == PortFired(offered8)
        await their_mapping.aclose()
        await other.aclose()
    assert server.registry is not None
    registry = server.registry
    await eventually(lambda: registry.sessions == [], "every session ended")
