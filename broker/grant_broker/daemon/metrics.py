"""The broker's metrics: a Prometheus / OpenMetrics endpoint (``serve --metrics ADDRESS``).

Off by default.  Two kinds of figures, kept in two ways:

* What happened — calls by method, transport and status, their latency, failed
  calls by errno, refusals — is counted as it happens, by :class:`CallMetrics`,
  the :class:`~grant_broker.core.observe.CallObserver` the daemon gives the
  transports.  Per call: one dict increment, one bucket increment and one
  addition, in plain Python integers (the event loop is the only thread that
  counts, so no lock), read only when scraped.  prometheus_client's own
  Counter and Histogram take a lock per update and are not used on that path.
* What is held — sessions, grants, ports, subscriptions, budgets, pools,
  descriptors — is read from the session registry when scraped
  (:class:`BrokerCollector`, :mod:`grant_broker.core.census`): the hot path
  pays nothing for it.

The exposition is prometheus_client's (``generate_latest``, or OpenMetrics
when the scraper asks for it), served by a small HTTP/1.0 server on the
broker's own event loop (:class:`MetricsEndpoint`), on TCP or on a Unix socket
(``unix:PATH``, for hosts whose sandbox forbids TCP): one implementation for
both, no thread.  A scrape runs on the loop too, between calls, and so sees a
consistent state.  The metrics and their meaning: README, "Metrics".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from grant_broker import __version__
from grant_broker.core import census
from grant_broker.core.policy import Limits
from grant_broker.core.registry import SessionRegistry
from grant_broker_protocol.unix_paths import claim_unix_path
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import open_fd_count
from grant_broker_protocol.status import status_code_for

log = logging.getLogger(__name__)

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds) of the call latency histogram: a fast-path call is
tens of µs, a gRPC one ~100 µs, a dma-buf wait up to its deadline."""

POLICY_ERRNOS: Final = frozenset({errno.EPERM, errno.EACCES})
"""Errnos counted as refusals by the policy (PERMISSION_DENIED)."""
BUDGET_ERRNOS: Final = frozenset({errno.EDQUOT})
"""Errnos counted as refusals by a budget (RESOURCE_EXHAUSTED, EDQUOT)."""

GntallocPool = Callable[[int], tuple[int | None, int | None]]
"""A backend's view of a domain's gntalloc pool: (pages in use by every user
of the domain's pool, the pool's limit), each None where it cannot tell."""


# --------------------------------------------------------------------------- calls


class CallStats:
    """The calls of one method over one transport (a :class:`~grant_broker.core.observe.CallRecorder`)."""

    __slots__ = ("service", "method", "transport", "by_errno", "buckets", "seconds")

    def __init__(self, service: str, method: str, transport: str) -> None:
        self.service = service
        self.method = method
        self.transport = transport
        self.by_errno: dict[int, int] = {}  # errno (0: OK) -> calls
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # not cumulative; the last one is +Inf
        self.seconds = 0.0

    def record(self, error: int, seconds: float) -> None:
        by_errno = self.by_errno
        by_errno[error] = by_errno.get(error, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds


class CallMetrics:
    """The daemon's :class:`~grant_broker.core.observe.CallObserver`: one
    :class:`CallStats` per (service, method, transport)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str, str], CallStats] = {}

    def recorder(self, service: str, method: str, transport: str) -> CallStats:
        key = (service, method, transport)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = CallStats(service, method, transport)
        return stats

    def stats(self) -> list[CallStats]:
        return list(self._stats.values())


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def status_name(code: int) -> str:
    """The gRPC status a call that ended with errno *code* gets (the protocol's table)."""
    return "OK" if code == 0 else status_code_for(code).name


# --------------------------------------------------------------------------- what is held, at scrape time


class BrokerCollector:
    """Every ``grant_broker_*`` metric, made when scraped (a prometheus_client collector)."""

    def __init__(
        self,
        registry: SessionRegistry,
        calls: CallMetrics,
        *,
        backend: str,
        gntalloc_pool: GntallocPool | None = None,
    ) -> None:
        self._registry = registry
        self._calls = calls
        self._backend = backend
        self._pool = gntalloc_pool

    def collect(self) -> Iterator[Metric]:
        yield from self._held()
        yield from self._events()
        yield from self._call_metrics()

    # ------------------------------------------------------------ state

    def _held(self) -> Iterator[Metric]:
        registry = self._registry
        sessions = registry.sessions
        info = InfoMetricFamily("grant_broker", "The broker's version and backend.")
        info.add_metric([], {"version": __version__, "backend": self._backend})
        yield info

        by_uid: Counter[int] = Counter()
        event_channels: Counter[int] = Counter()
        subscriptions: Counter[int] = Counter()
        for session in sessions:
            uid = session.creds.uid
            by_uid[uid] += 1
            event_channels[uid] += session.usage.event_channels
            subscriptions[uid] += session.usage.subscriptions
        yield _gauge("grant_broker_sessions", "Live sessions, by their client's uid.", ["uid"],
                     (([str(uid)], n) for uid, n in sorted(by_uid.items())))

        grants = census.grants(sessions)
        yield _gauge(
            "grant_broker_grants_mapped",
            "Grants of other domains the sessions of a uid map (gntdev mappings and dma-buf exports), by granting domain.",
            ["uid", "remote_domain"],
            (([str(uid), str(domid)], n) for (uid, domid), n in sorted(grants.mapped.items())),
        )
        yield _gauge(
            "grant_broker_grants_shared",
            "Pages the sessions of a uid grant to other domains (gntalloc and dma-buf imports), by the domain granted to.",
            ["uid", "remote_domain"],
            (([str(uid), str(domid)], n) for (uid, domid), n in sorted(grants.shared.items())),
        )
        yield _gauge("grant_broker_event_channels", "Event-channel ports the sessions of a uid have bound.", ["uid"],
                     (([str(uid)], n) for uid, n in sorted(event_channels.items())))
        yield _gauge("grant_broker_subscriptions", "Event subscriptions (Subscribe streams) of the sessions of a uid.",
                     ["uid"], (([str(uid)], n) for uid, n in sorted(subscriptions.items())))

        used = GaugeMetricFamily(
            "grant_broker_uid_budget_used",
            "What the sessions of a uid hold against each per-uid budget (budget: its limit's name).",
            labels=["uid", "budget"],
        )
        for uid in sorted(by_uid):
            budget = registry.user_budget(uid)
            if budget is None:
                continue
            for name, count in sorted(budget.usage().items()):
                used.add_metric([str(uid), name], count)
        yield used
        limits = GaugeMetricFamily("grant_broker_budget_limit", "The broker's limits and budgets (serve --limit).",
                                   labels=["budget"])
        for spec in dataclasses.fields(Limits):
            value = getattr(registry.limits, spec.name)
            if isinstance(value, int | float):
                limits.add_metric([spec.name], value)
        yield limits

        pool_used = GaugeMetricFamily(
            "grant_broker_gntalloc_pool_pages",
            "gntalloc pages in use in the pool of a domain with live sessions (where the backend cannot tell, "
            "as on Xen, the pages the broker's sessions hold).",
            labels=["domain"],
        )
        pool_limit = GaugeMetricFamily("grant_broker_gntalloc_pool_limit_pages",
                                       "The gntalloc pool's limit of pages of a domain with live sessions.",
                                       labels=["domain"])
        held_pages = census.pool_pages_by_domain(sessions)
        for domid in sorted(held_pages):
            in_use, limit = self._pool(domid) if self._pool is not None else (None, None)
            pool_used.add_metric([str(domid)], held_pages[domid] if in_use is None else in_use)
            if limit is not None:
                pool_limit.add_metric([str(domid)], limit)
        yield pool_used
        yield pool_limit

        yield GaugeMetricFamily("grant_broker_open_fds", "Descriptors the broker process holds.", value=open_fd_count())

    def _events(self) -> Iterator[Metric]:
        hub = self._registry.event_hub
        yield CounterMetricFamily("grant_broker_events_delivered",
                                  "Fired event-channel ports handed to subscribers (once per port firing).",
                                  value=hub.deliveries)
        yield CounterMetricFamily("grant_broker_events_lost",
                                  "Events lost because a subscriber's queue was full (once per subscriber).",
                                  value=hub.lost)

    # ------------------------------------------------------------ calls

    def _call_metrics(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "grant_broker_calls", "Calls served, by method, transport and gRPC status (errno mapped by the protocol's table).",
            labels=["service", "method", "transport", "status"],
        )
        errors = CounterMetricFamily(
            "grant_broker_call_errors", "Failed calls by errno: the backends' errors and the broker's own refusals.",
            labels=["service", "method", "errno"],
        )
        duration = HistogramMetricFamily(
            "grant_broker_call_duration_seconds",
            "How long calls were served (a Subscribe: how long its stream lived; the hello: from connect to ServerHello).",
            labels=["service", "method", "transport"],
        )
        refusals = {"policy": 0, "budget": 0}
        by_errno: Counter[tuple[str, str, int]] = Counter()
        for stats in sorted(self._calls.stats(), key=lambda s: (s.service, s.method, s.transport)):
            total = sum(stats.buckets)
            if not total:
                continue
            by_status: Counter[str] = Counter()
            for code, count in stats.by_errno.items():
                by_status[status_name(code)] += count
                if code:
                    by_errno[stats.service, stats.method, code] += count
                if code in POLICY_ERRNOS:
                    refusals["policy"] += count
                elif code in BUDGET_ERRNOS:
                    refusals["budget"] += count
            for status, count in sorted(by_status.items()):
                calls.add_metric([stats.service, stats.method, stats.transport, status], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*(repr(b) for b in LATENCY_BUCKETS), "+Inf"), stats.buckets):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([stats.service, stats.method, stats.transport], buckets, stats.seconds)
        for (service, method, code), count in sorted(by_errno.items()):
            errors.add_metric([service, method, errno_name(code)], count)
        yield calls
        yield errors
        yield duration
        refused = CounterMetricFamily(
            "grant_broker_refusals",
            "Calls and hellos refused by the policy (EPERM/EACCES: access, domains, authentication) or by a budget (EDQUOT).",
            labels=["reason"],
        )
        for reason, count in refusals.items():
            refused.add_metric([reason], count)
        yield refused


def _gauge(name: str, documentation: str, labels: list[str], samples: Iterable[tuple[Sequence[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, count in samples:
        family.add_metric(values, count)
    return family


# --------------------------------------------------------------------------- the endpoint


@dataclass(frozen=True)
class MetricsAddress:
    """Where the metrics are served: a Unix socket *path*, or TCP *host*:*port*
    (host None: every interface)."""

    path: str | None = None
    host: str | None = None
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> "MetricsAddress":
        """``unix:PATH``, ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface).

        Raises:
            ValueError: anything else (the message says what is expected).
        """
        expected = f"{text!r}: expected unix:PATH, HOST:PORT, [IPV6]:PORT or :PORT"
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path:
                raise ValueError(f"{expected} (the path is empty)")
            return cls(path=path)
        host, colon, port_text = text.rpartition(":")
        if not colon or not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(expected)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{expected} (an IPv6 address goes in brackets)")
        return cls(host=host or None, port=int(port_text))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class MetricsEndpoint:
    """``GET /metrics`` (and HEAD) over HTTP/1.0, on the running event loop.

    Bounded: at most :attr:`MAX_CONNECTIONS` connections at once (others are
    closed at once), a request head of at most :attr:`MAX_REQUEST_BYTES`,
    read within :attr:`REQUEST_SECONDS`; one request per connection.
    """

    MAX_CONNECTIONS = 16
    MAX_REQUEST_BYTES = 8192
    REQUEST_SECONDS = 10.0

    def __init__(self, registry: CollectorRegistry, address: MetricsAddress, *, socket_mode: int = 0o660) -> None:
        self.registry = registry
        self.requested = address
        self._socket_mode = socket_mode
        self._server: asyncio.AbstractServer | None = None
        self._bound: MetricsAddress | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> MetricsAddress:
        """Where it listens (the port the kernel chose, for port 0)."""
        assert self._bound is not None, "not started"
        return self._bound

    async def start(self) -> None:
        """Listen.

        Raises:
            BrokerError: the address cannot be listened on (EADDRINUSE for a
                live server on the Unix path, the socket call's errno otherwise).
        """
        address = self.requested
        try:
            if address.path is not None:
                os.makedirs(os.path.dirname(address.path) or ".", mode=0o755, exist_ok=True)
                claim_unix_path(address.path, socket.SOCK_STREAM, "metrics", "something")
                self._server = await asyncio.start_unix_server(self._serve, address.path, limit=self.MAX_REQUEST_BYTES)
                os.chmod(address.path, self._socket_mode)
                self._bound = address
            else:
                self._server = await asyncio.start_server(
                    self._serve, address.host, address.port, limit=self.MAX_REQUEST_BYTES, reuse_address=True
                )
                name = self._server.sockets[0].getsockname()
                self._bound = MetricsAddress(host=address.host or "", port=int(name[1]))
        except OSError as exc:
            await self.close()
            raise BrokerError(exc.errno or errno.EIO, "metrics", f"cannot listen on {address}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._connections):
            writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await server.wait_closed()
        path = self.requested.path
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(writer)
        try:
            try:
                async with asyncio.timeout(self.REQUEST_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, content_type, body, head_only = self._respond(head)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if not head_only:
                writer.write(body)
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(self.REQUEST_SECONDS):
                    await writer.drain()
        finally:
            self._connections.discard(writer)
            writer.close()

    def _respond(self, head: bytes) -> tuple[str, str, bytes, bool]:
        """(status line, content type, body, whether to send the head only) for a request *head*."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        text = "text/plain; charset=utf-8"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n", False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"only GET and HEAD\n", False
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return "404 Not Found", text, b"the metrics are at /metrics\n", method == "HEAD"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(self.registry)
        except Exception:  # noqa: BLE001 - a bug in a collector: the scrape fails, the broker goes on
            log.exception("making the metrics failed")
            return "500 Internal Server Error", text, b"making the metrics failed; see the broker's log\n", False
        return "200 OK", content_type, body, method == "HEAD"


# --------------------------------------------------------------------------- the whole


class BrokerMetrics:
    """The metrics of one broker: the call counters the transports report to
    (:attr:`calls`), the collectors, and the endpoint once started."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        backend: str,
        gntalloc_pool: GntallocPool | None = None,
    ) -> None:
        self.calls = CallMetrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(registry, self.calls, backend=backend, gntalloc_pool=gntalloc_pool))
        # process_*: CPU, memory, descriptors and their limit, start time.
        ProcessCollector(registry=self.registry)
        self.endpoint: MetricsEndpoint | None = None

    async def serve(self, address: MetricsAddress, *, socket_mode: int = 0o660) -> MetricsEndpoint:
        endpoint = MetricsEndpoint(self.registry, address, socket_mode=socket_mode)
        await endpoint.start()
        self.endpoint = endpoint
        log.info("metrics served on %s (GET /metrics)", endpoint.address)
        return endpoint

    async def close(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.close()
