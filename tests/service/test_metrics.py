"""The metrics endpoint (``serve --metrics``): scraped from a running broker over
HTTP and read with the Prometheus parser, its figures follow what clients did.

Every test runs over both transports (the ``transport`` fixture of conftest.py):
the calls are labelled with the one the SDK used.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import grant_broker_client
from grant_broker.core.policy import Limits
from grant_broker.daemon.metrics import LATENCY_BUCKETS, CallStats, MetricsAddress
from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker_client import BrokerClientError
from grant_broker_client.evtchn import EventsLost, PortFired
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc

from .conftest import start_broker_process
from .evtchn_helpers import connect_pair, next_event, two_domains

SHARER, MAPPER = 1, 2
UID = str(os.getuid())
WIRE = {"fast-path": "fast_path", "grpc": "grpc"}  # the transport fixture's names -> the metrics' label


class Scrape:
    """One scrape, parsed by prometheus_client's parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = [sample for family in self.families.values() for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples *name* whose labels include *labels* (0 if none: a series that is gone)."""
        return sum(s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def http(address: MetricsAddress, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send *request* and read the answer to its end: (status line, headers, body)."""
    if address.path is not None:
        reader, writer = await asyncio.open_unix_connection(address.path)
    else:
        reader, writer = await asyncio.open_connection(address.host or "127.0.0.1", address.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


async def scrape(address: MetricsAddress) -> Scrape:
    status, headers, body = await http(address, b"GET /metrics HTTP/1.1\r\nHost: broker\r\n\r\n")
    assert status == "HTTP/1.0 200 OK", status
    assert headers["content-type"].startswith("text/plain"), headers
    assert int(headers["content-length"]) == len(body)
    return Scrape(body.decode())


async def eventually(address: MetricsAddress, predicate: Callable[[Scrape], bool], what: str) -> Scrape:
    deadline = time.monotonic() + 10
    while True:
        scraped = await scrape(address)
        if predicate(scraped):
            return scraped
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}\n{scraped.text}")
        await asyncio.sleep(0.02)


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
async def server(short_tmp: Path, limits: Limits) -> AsyncIterator[BrokerServer]:
    config = ServerConfig(
        socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0, limits=limits, metrics="127.0.0.1:0"
    )
    async with BrokerServer(config) as broker:
        yield broker


def endpoint(server: BrokerServer) -> MetricsAddress:
    assert server.metrics is not None and server.metrics.endpoint is not None
    return server.metrics.endpoint.address


# A client in a process of its own, killed while it maps the grants.
_MAPPER = """
import asyncio, sys
import grant_broker_client

async def main():
    socket_path, fast_path, refs = sys.argv[1], sys.argv[2] == "1", [int(r) for r in sys.argv[3].split(",")]
    session = await grant_broker_client.connect(socket_path, domid=2, client_name="doomed mapper", fast_path=fast_path)
    mapping = await session.gntdev.map([(1, ref) for ref in refs])
    print("mapped", mapping.count, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_gauges_follow_what_clients_hold_and_return_to_zero_when_a_client_is_killed(
    server: BrokerServer, transport: str
) -> None:
    address = endpoint(server)
    wire = WIRE[transport]
    idle = await scrape(address)
    assert idle.value("grant_broker_sessions") == 0
    assert idle.value("grant_broker_info", backend="emulated") == 1
    assert idle.value("grant_broker_budget_limit", budget="max_pool_pages_per_uid") == Limits().max_pool_pages_per_uid

    async with await grant_broker_client.connect(server.config.socket_path, domid=SHARER, client_name="sharer") as sharer:
        async with await sharer.gntalloc.share(MAPPER, 2) as pages:
            mapper = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _MAPPER, server.config.socket_path, "1" if transport == "fast-path" else "0",
                ",".join(str(ref) for ref in pages.refs), stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert mapper.stdout is not None
                assert await asyncio.wait_for(mapper.stdout.readline(), 30) == b"mapped 2\n"
                held = await scrape(address)
                # Two sessions of this uid; two grants of domain 1 mapped, two pages granted to domain 2.
                assert held.value("grant_broker_sessions", uid=UID) == 2
                assert held.value("grant_broker_grants_mapped", uid=UID, remote_domain=str(SHARER)) == 2
                assert held.value("grant_broker_grants_mapped") == 2
                assert held.value("grant_broker_grants_shared", uid=UID, remote_domain=str(MAPPER)) == 2
                assert held.value("grant_broker_grants_shared") == 2
                # Domain 1's gntalloc pool: two pages of its limit (the emulated hypervisor's 1024).
                assert held.value("grant_broker_gntalloc_pool_pages", domain=str(SHARER)) == 2
                assert held.value("grant_broker_gntalloc_pool_limit_pages", domain=str(SHARER)) == 1024
                assert held.value("grant_broker_uid_budget_used", uid=UID, budget="max_pool_pages_per_uid") == 2
                assert held.value("grant_broker_uid_budget_used", uid=UID, budget="max_sessions_per_uid") == 2
                assert held.value("grant_broker_open_fds") > 0 and held.value("process_open_fds") > 0
                # The calls, each labelled with the transport that carried it, and their latency.
                assert held.value("grant_broker_calls_total", service="Gntalloc", method="AllocGref", transport=wire,
                                  status="OK") == 1
                assert held.value("grant_broker_calls_total", service="Gntdev", method="Map", transport=wire,
                                  status="OK") == 1
                assert held.value("grant_broker_calls_total", service="FdChannel", method="Hello",
                                  transport="fd_channel", status="OK") == 2
                assert held.value("grant_broker_call_duration_seconds_count", service="Gntdev", method="Map",
                                  transport=wire) == 1
                assert held.value("grant_broker_call_duration_seconds_bucket", service="Gntdev", method="Map",
                                  transport=wire, le="+Inf") == 1
                assert 0 < held.value("grant_broker_call_duration_seconds_sum", service="Gntdev", method="Map",
                                      transport=wire) < 10
                assert held.labels("grant_broker_calls_total", "transport") == {wire, "fd_channel"}
            finally:
                if mapper.returncode is None:
                    mapper.send_signal(signal.SIGKILL)
                await mapper.wait()
            # The killed client's session ends: its mappings and its session are gone from the gauges.
            gone = await eventually(address, lambda s: s.value("grant_broker_sessions") == 1, "the killed client's session ended")
            assert gone.value("grant_broker_grants_mapped") == 0
            assert gone.value("grant_broker_grants_shared", remote_domain=str(MAPPER)) == 2
        after = await scrape(address)
        assert after.value("grant_broker_grants_shared") == 0
        assert after.value("grant_broker_gntalloc_pool_pages", domain=str(SHARER)) == 0
        assert after.value("grant_broker_calls_total", service="Gntalloc", method="DeallocGref", transport=wire,
                           status="OK") == 1
    closed = await eventually(address, lambda s: s.value("grant_broker_sessions") == 0, "the sharer's session ended")
    for gauge in ("grant_broker_grants_mapped", "grant_broker_grants_shared", "grant_broker_gntalloc_pool_pages",
                  "grant_broker_uid_budget_used", "grant_broker_event_channels", "grant_broker_subscriptions"):
        assert closed.value(gauge) == 0, gauge


@pytest.mark.parametrize("limits", [Limits(max_pool_pages_per_session=1)])
async def test_refusals_count_by_status_errno_and_reason(server: BrokerServer, transport: str) -> None:
    address = endpoint(server)
    wire = WIRE[transport]
    async with await grant_broker_client.connect(server.config.socket_path, domid=SHARER) as sharer:
        with pytest.raises(BrokerClientError) as raised:
            await sharer.gntalloc.share(MAPPER, 2)  # past the session's budget of one page
        assert raised.value.errno == errno.EDQUOT
        refused = await scrape(address)
        assert refused.value("grant_broker_calls_total", service="Gntalloc", method="AllocGref", transport=wire,
                             status="RESOURCE_EXHAUSTED") == 1
        assert refused.value("grant_broker_calls_total", service="Gntalloc", method="AllocGref", status="OK") == 0
        assert refused.value("grant_broker_call_errors_total", service="Gntalloc", method="AllocGref", errno="EDQUOT") == 1
        assert refused.value("grant_broker_refusals_total", reason="budget") == 1
        assert refused.value("grant_broker_refusals_total", reason="policy") == 0
    # A call without a session: refused as PERMISSION_DENIED (EPERM), counted as a policy refusal.
    async with grpc.aio.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await broker_pb2_grpc.BrokerStub(channel).DescribeSession(broker_pb2.DescribeSessionRequest())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = await scrape(address)
    assert after.value("grant_broker_calls_total", service="Broker", method="DescribeSession", transport="grpc",
                       status="PERMISSION_DENIED") == 1
    assert after.value("grant_broker_call_errors_total", service="Broker", method="DescribeSession", errno="EPERM") == 1
    assert after.value("grant_broker_refusals_total", reason="policy") == 1
    assert after.value("grant_broker_refusals_total", reason="budget") == 1


async def test_event_channels_subscriptions_and_events_delivered_and_lost(server: BrokerServer, transport: str) -> None:
    address = endpoint(server)
    before = await scrape(address)
    async with two_domains(server.config.socket_path) as (one, two):
        async with one.evtchn.subscribe() as drain:  # the ports' first events (binding fires them), taken
            pairs = [await connect_pair(one, two) for _ in range(4)]
            assert {await next_event(drain) for _ in pairs} == {PortFired(p.client_port) for p in pairs}
        async with one.evtchn.subscribe(queue_size=1) as events:
            assert server.registry is not None
            sender = next(s for s in server.registry.sessions if s.id == two.session_id)
            for pair in pairs:  # all within one read of domain 1's device: one is queued, three are lost
                sender.evtchn.notify(pair.server_port)
            assert await next_event(events) == PortFired(pairs[0].client_port)
            await two.evtchn.notify(pairs[3].server_port)
            assert await next_event(events) == EventsLost(3)
            held = await scrape(address)
            assert held.value("grant_broker_event_channels", uid=UID) == 8
            assert held.value("grant_broker_subscriptions", uid=UID) == 1
            assert held.value("grant_broker_events_lost_total") - before.value("grant_broker_events_lost_total") == 3
            # At least the four fired at once and the last one (besides the ports' first events).
            delivered = held.value("grant_broker_events_delivered_total") - before.value("grant_broker_events_delivered_total")
            assert delivered >= 5
        # Both streams ended by their client: cancelled, whichever transport carried them.  Waited for while
        # the session lives: a gRPC cancellation travels apart from the session's socket, and a stream whose
        # session ends first ends with OK.
        await eventually(
            address,
            lambda s: s.value("grant_broker_calls_total", service="Evtchn", method="Subscribe",
                              transport=WIRE[transport], status="CANCELLED") == 2,
            "both subscriptions counted as cancelled",
        )
    after = await eventually(address, lambda s: s.value("grant_broker_sessions") == 0, "the sessions ended")
    assert after.value("grant_broker_event_channels") == 0 and after.value("grant_broker_subscriptions") == 0
    assert after.value("grant_broker_calls_total", service="Evtchn", method="Subscribe", status="OK") == 0


async def test_unix_endpoint_serves_metrics_only_and_goes_with_the_broker(short_tmp: Path) -> None:
    path = short_tmp / "metrics.sock"
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0,
                          metrics=f"unix:{path}")
    async with BrokerServer(config) as server:
        address = endpoint(server)
        assert address == MetricsAddress(path=str(path))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        async with await grant_broker_client.connect(config.socket_path, domid=3):
            scraped = await scrape(address)
            assert scraped.value("grant_broker_sessions", uid=UID) == 1
        # OpenMetrics when the scraper asks for it.
        status, headers, body = await http(
            address, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
        )
        assert status.endswith("200 OK") and headers["content-type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        status, headers, body = await http(address, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status.endswith("200 OK") and int(headers["content-length"]) > 0 and body == b""
        assert (await http(address, b"GET / HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 404 Not Found"
        assert (await http(address, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 405 Method Not Allowed"
        assert (await http(address, b"nonsense\r\n\r\n"))[0] == "HTTP/1.0 400 Bad Request"
        # A second broker cannot take the live endpoint's path.
        other = ServerConfig(socket_path=str(short_tmp / "other.sock"), backend="emulated", metrics=f"unix:{path}")
        with pytest.raises(BrokerError) as raised:
            async with BrokerServer(other):
                pass
        assert raised.value.errno == errno.EADDRINUSE
        assert not os.path.exists(short_tmp / "other.sock")
    assert not path.exists()


async def test_metrics_are_off_by_default_and_a_bad_address_is_refused(short_tmp: Path) -> None:
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0)
    async with BrokerServer(config) as server:
        assert server.metrics is None
    bad = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", metrics="localhost")
    with pytest.raises(BrokerError) as raised:
        await BrokerServer(bad).start()
    assert raised.value.errno == errno.EINVAL and "HOST:PORT" in str(raised.value)
    assert not os.path.exists(bad.socket_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/gb/metrics.sock", MetricsAddress(path="/run/gb/metrics.sock")),
        ("127.0.0.1:9464", MetricsAddress(host="127.0.0.1", port=9464)),
        ("[::1]:0", MetricsAddress(host="::1", port=0)),
        (":9464", MetricsAddress(port=9464)),
    ],
)
def test_address_forms(text: str, expected: MetricsAddress) -> None:
    assert MetricsAddress.parse(text) == expected
    assert MetricsAddress.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["unix:", "9464", "host:port", "::1:9464", "host:65536", ""])
def test_bad_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected unix:PATH, HOST:PORT"):
        MetricsAddress.parse(text)


def test_a_call_is_one_bucket_and_one_count() -> None:
    stats = CallStats("Gntdev", "Map", "grpc")
    stats.record(0, LATENCY_BUCKETS[0])  # on the bound: in that bucket (le)
    stats.record(errno.EPERM, 0.003)
    stats.record(0, 99.0)
    assert stats.by_errno == {0: 2, errno.EPERM: 1}
    assert stats.buckets[0] == 1 and stats.buckets[LATENCY_BUCKETS.index(0.005)] == 1 and stats.buckets[-1] == 1
    assert sum(stats.buckets) == 3 and stats.seconds == pytest.approx(LATENCY_BUCKETS[0] + 0.003 + 99.0)


def test_serve_metrics_on_a_unix_socket(short_tmp: Path) -> None:
    path = short_tmp / "metrics.sock"
    broker = start_broker_process(str(short_tmp / "broker.sock"), "--metrics", f"unix:{path}")
    try:
        assert path.exists()  # made before the broker says it is ready
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        scraped = Scrape(body.decode())
        assert scraped.value("grant_broker_info", backend="emulated") == 1
        assert scraped.value("grant_broker_sessions") == 0
        assert broker.stop(signal.SIGTERM) == 0
        output = broker.process.stdout.read() if broker.process.stdout else ""
        assert f"metrics: unix:{path} (GET /metrics)" in output
        assert not path.exists()
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
            broker.process.wait()
        if broker.process.stdout:
            broker.process.stdout.close()
        broker.close_notify_socket()
