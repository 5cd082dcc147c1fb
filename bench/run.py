"""Benchmark the broker against its floors: ``python -m bench.run [--quick] [--json PATH]``.

Starts its own broker (``grant-broker serve --backend emulated``) and the
baseline servers (see :mod:`bench.baselines`) as subprocesses in a temporary
directory, measures every figure and its baseline in the same run, prints a
table on stdout and writes the figures as JSON (``bench-results/latest.json``
unless ``--json`` says otherwise).  Progress goes to stderr.

Figures (see README, "Performance"):

1. map round trip — map one grant, receive its fd, mmap it, read the first
   byte; against a bare grpc.aio unary call and the two SEQPACKET + SCM_RIGHTS
   floors (blocking on both ends, and uvloop server / asyncio client);
2. batched map — grants mapped per second with 1024-ref batches;
3. event latency (one subscriber) and fan-out (many subscribers of one port);
4. grant copy bandwidth, 4 KiB .. 1 MiB, through a registered copy buffer and
   through protobuf bytes, against memcpy in this process; and through a copy
   ring on a fast-path session: one 4 KiB segment (latency, against the asyncio
   floor) and 1 MiB in 4 KiB segments (against memcpy);
5. scale — sessions each holding mappings (broker RSS and fds per session),
   then thousands of calls in flight at once across client processes;
6. bystander under flood — another client's median latency while one client
   floods (unread event subscriptions and a notify loop; large calls without
   a token: :mod:`bench.flood`), as a ratio to its unloaded median;
7. metrics — the map round trip on two fresh brokers alike but for
   ``serve --metrics`` (``map_metrics_on``, ``map_fast_metrics_on``: metrics
   on, against metrics off in the same interleaved rounds).

Figures 1-4 (but grant copy) are measured twice: over gRPC (``map_round_trip``,
``batched_map``, ``event_latency_1``, ``event_fanout``: sessions opened with
``fast_path=False``) and over the fast path, calls as frames on the session's
fd channel (``map_fast``, ``batched_map_fast``, ``event_fast``,
``event_fanout_fast``), whose targets are against the asyncio floor
``seqpacket_fd_async``.  Grant copy (the GrantCopy call) and scale are gRPC
figures; the copy ring (``grant_copy_ring_4KiB``, ``grant_copy_ring_1MiB``)
is a fast-path one.

Latency samples are taken in interleaved rounds (broker, then its baselines,
round after round) so that a slow spell of the machine hits all of them alike;
the first round and explicit warm-up calls are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The scale figure starts client processes once grpc has threads running;
# they exec at once, so grpc's fork handlers have nothing to do (and would
# log that they skip).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402
import uvloop  # noqa: E402

import grant_broker_client  # noqa: E402
from bench.baselines import ECHO_METHOD, AsyncSeqpacketClient, SeqpacketClient, memcpy_seconds
from grant_broker_client.gntdev import CopySegment, Foreign, Local
from grant_broker_protocol.copyring import MAX_RING_ENTRIES

KIB = 1024
MIB = 1024 * 1024
PAGE = 4096
DEFAULT_JSON = Path("bench-results") / "latest.json"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """How much of everything to do.  ``rounds`` x ``per_round`` samples per
    latency figure (the first round is warm-up)."""

    rounds: int = 21
    per_round: int = 100
    batch_refs: int = 1024
    batch_reps: int = 150
    subscribers: int = 1000
    fanout_reps: int = 60
    copy_sizes: tuple[int, ...] = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB)
    copy_reps: int = 200
    pipeline_depth: int = 8
    sessions: int = 1000
    mappings: int = 16
    in_flight: int = 5000
    workers: int = 4
    flood_seconds: float = 3.0


DEFAULT_PLAN = Plan()
QUICK_PLAN = Plan(
    rounds=6, per_round=40, batch_reps=20, subscribers=200, fanout_reps=10, copy_reps=30,
    sessions=100, in_flight=500, workers=2, flood_seconds=1.0,
)


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Summary:
    """min / median / p99 of samples, in the unit they were given in."""

    n: int
    min: float
    median: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Summary":
        values = sorted(samples)
        if not values:
            return cls(0, math.nan, math.nan, math.nan)
        mid = len(values) // 2
        median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        return cls(len(values), values[0], median, percentile(values, 0.99))


@dataclass
class Figure:
    """One row of the table.

    ``time`` summarises the per-operation times (µs) when the figure is timed;
    ``value`` is the figure in its own unit, ``baseline`` the floor it is
    compared with (same unit), ``ratio`` = value / baseline.  ``target`` says
    what is asked and ``met`` whether this run meets it (None: only reported).
    """

    name: str
    title: str
    unit: str
    value: float
    time: Summary | None = None
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str = "reported"
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def us(seconds: Sequence[float]) -> list[float]:
    return [s * 1e6 for s in seconds]


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every child)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Child:
    """A subprocess whose output goes to a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, ready_line: bool) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if ready_line else self._log,
            stderr=self._log,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        if ready_line:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if line.strip() != "ready":
                self.stop()
                raise RuntimeError(f"{name} did not start: {line!r}; see {self.log_path}: {self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode


def broker_limits(plan: Plan) -> dict[str, int]:
    """The broker's limits the plan needs (``serve --limit``), never below the defaults.

    Every client of the benchmark runs as one uid, so the per-uid budgets —
    there so that one user cannot starve the others — would refuse what the
    figures ask: a thousand sessions, 1024-page allocations, a thousand
    subscriptions of one session, thousands of calls in flight.  They are
    raised to what the plan uses; the broker still counts and checks them."""
    subscriptions = plan.subscribers + 8
    pages = max(plan.batch_refs, max(plan.copy_sizes) // PAGE, plan.mappings)
    return {
        "max_subscriptions_per_session": max(64, subscriptions),
        "max_subscriptions_per_uid": max(256, 2 * subscriptions),
        # A fast-path subscription is a call in flight of its session for as
        # long as it lives (each holds one of the session's call slots).
        "max_fast_calls_in_flight": max(256, subscriptions + 64),
        "max_calls_per_session": max(1024, subscriptions + 64),
        "max_calls_per_uid": max(4096, plan.in_flight + 2 * subscriptions + 1024),
        "max_pool_pages_per_session": max(256, pages),
        "max_pool_pages_per_uid": max(512, 2 * pages + plan.mappings + 16),
        "max_sessions_per_uid": max(256, plan.sessions + 64),
        "max_sessions": max(4096, plan.sessions + 64),
    }


def start_broker(
    socket_path: str, log_dir: Path, plan: Plan, profile: Path | None = None, *, extra: Sequence[str] = (), name: str = "broker"
) -> Child:
    # Under cProfile when asked: the broker exits cleanly on SIGTERM, which
    # is when cProfile writes its statistics.
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    limits = [arg for name, value in broker_limits(plan).items() for arg in ("--limit", f"{name}={value}")]
    argv = [
        sys.executable, *profiler, "-m", "grant_broker.cli", "--socket", socket_path, "--log-level", "warning",
        "serve", "--backend", "emulated", "--grace", "1", *limits, *extra,
    ]
    broker = Child(name, argv, log_dir, ready_line=False)
    deadline = time.monotonic() + 30
    while not (os.path.exists(socket_path) and os.path.exists(socket_path + ".fds")):
        if broker.process.poll() is not None:
            broker.stop()
            raise RuntimeError(f"the broker exited with {broker.process.returncode}: {broker.log_tail()}")
        if time.monotonic() > deadline:
            broker.stop()
            raise RuntimeError("the broker did not start within 30 s")
        time.sleep(0.02)
    return broker


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "uvloop": version("uvloop"),
        "loadavg_at_start": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- measurement helpers


async def timed_rounds(
    kinds: dict[str, Callable[[], Awaitable[Any]]],
    rounds: int,
    per_round: int,
    after: Callable[[str, Any], Awaitable[None]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each kind, in interleaved rounds; round 0 is warm-up.

    *after* (untimed) undoes what a call made, e.g. unmaps a mapping."""
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    clock = time.perf_counter
    for round_number in range(rounds):
        for name, call in kinds.items():
            kept = samples[name]
            for _ in range(per_round):
                start = clock()
                result = await call()
                elapsed = clock() - start
                if round_number:
                    kept.append(elapsed)
                if after is not None:
                    await after(name, result)
    return samples


def ratio(value: float, baseline: float | None) -> float | None:
    if baseline is None or not baseline or math.isnan(baseline):
        return None
    return value / baseline


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, plan: Plan, workdir: Path, profile: Path | None = None) -> None:
        self.plan = plan
        self.profile = profile
        self.workdir = workdir
        self.socket = str(workdir / "broker.sock")
        self.figures: list[Figure] = []
        self.baselines: dict[str, Any] = {}
        self.children: list[Child] = []
        self.broker: Child | None = None
        self.echo_call: Any = None
        self.seqpacket: SeqpacketClient | None = None
        self.seqpacket_async: AsyncSeqpacketClient | None = None
        # Medians (µs) of the map round trip's rounds, for the figures measured later.
        self.grpc_median_us = math.nan
        self.floor_median_us = math.nan
        self.async_floor_median_us = math.nan

    # ---------------------------------------------------------------- set-up

    async def start(self) -> None:
        progress("starting the broker and the baseline servers")
        self.broker = start_broker(self.socket, self.workdir, self.plan, self.profile)
        self.children.append(self.broker)
        echo = Child("grpc-echo", [sys.executable, "-m", "bench.baselines", "grpc-echo", str(self.workdir / "echo.sock")],
                     self.workdir, ready_line=True)
        self.children.append(echo)
        floor = Child("seqpacket", [sys.executable, "-m", "bench.baselines", "seqpacket", str(self.workdir / "seq.sock")],
                      self.workdir, ready_line=True)
        self.children.append(floor)
        async_floor = Child("seqpacket-async",
                            [sys.executable, "-m", "bench.baselines", "seqpacket-async", str(self.workdir / "seq-async.sock")],
                            self.workdir, ready_line=True)
        self.children.append(async_floor)
        self.echo_channel = grpc.aio.insecure_channel(f"unix:{self.workdir / 'echo.sock'}")
        self.echo_call = self.echo_channel.unary_unary(ECHO_METHOD)
        self.seqpacket = SeqpacketClient(str(self.workdir / "seq.sock"))
        self.seqpacket_async = AsyncSeqpacketClient(str(self.workdir / "seq-async.sock"))

    async def stop(self) -> None:
        if self.seqpacket is not None:
            self.seqpacket.close()
        if self.seqpacket_async is not None:
            self.seqpacket_async.close()
        if self.echo_call is not None:
            await self.echo_channel.close()
        for child in reversed(self.children):
            code = child.stop()
            if child is self.broker and code not in (0, None):
                progress(f"the broker exited with {code}: {child.log_tail()}")

    async def connect(self, domid: int, name: str, *, fast_path: bool = False) -> Any:
        """A session acting as *domid*: over gRPC (the figures from before the
        fast path), or with its calls as frames on its fd channel."""
        session = await grant_broker_client.connect(self.socket, domid=domid, client_name=name, fast_path=fast_path)
        if session.fast_path != fast_path:
            await session.close()
            raise RuntimeError(f"session {name}: fast path {'not offered by the broker' if fast_path else 'used unasked'}")
        return session

    async def bare_grpc(self) -> None:
        await self.echo_call(b"grant-broker-bench")

    async def floor(self) -> None:
        assert self.seqpacket is not None
        self.seqpacket.round_trip()

    async def floor_async(self) -> None:
        assert self.seqpacket_async is not None
        await self.seqpacket_async.round_trip()

    def vs_floors(self, value_us: float) -> dict[str, Any]:
        """``extra`` of a fast-path figure: its ratio to the blocking floor too."""
        return {"vs_seqpacket_fd": ratio(value_us, self.floor_median_us), "seqpacket_fd_us": self.floor_median_us,
                "seqpacket_fd_async_us": self.async_floor_median_us}

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        shown = f"{figure.value:,.1f} {figure.unit}"
        if figure.ratio is not None:
            shown += f" ({figure.ratio:.2f}x {figure.baseline_name})"
        progress(f"  {figure.title}: {shown}")

    # ---------------------------------------------------------------- 1. map round trip

    async def map_round_trip(self) -> None:
        """The map round trip over gRPC and over the fast path, in the same
        interleaved rounds as the bare gRPC call and both SEQPACKET floors."""
        plan = self.plan
        progress(f"map round trip, gRPC and fast path: {plan.rounds - 1} rounds of {plan.per_round} "
                 "(+1 warm-up round), with the bare gRPC call and both floors")
        sharer, mapper = await self.connect(1, "bench-sharer"), await self.connect(2, "bench-mapper")
        fast_mapper = await self.connect(2, "bench-fast-mapper", fast_path=True)
        try:
            async with await sharer.gntalloc.share(2, 1) as pages:
                pages.view[0] = 0x5A
                ref = pages.refs[0]

                def mapper_of(session: Any) -> Callable[[], Awaitable[Any]]:
                    async def map_one() -> Any:
                        mapping = await session.gntdev.map([(1, ref)], writable=False)
                        if mapping.view[0] != 0x5A:
                            raise AssertionError("the mapped page does not hold the granter's byte")
                        return mapping

                    return map_one

                async def unmap(kind: str, result: Any) -> None:
                    if kind in ("broker", "fast"):
                        await result.aclose()

                samples = await timed_rounds(
                    {"broker": mapper_of(mapper), "grpc": self.bare_grpc, "seqpacket": self.floor,
                     "fast": mapper_of(fast_mapper), "seqpacket_async": self.floor_async},
                    plan.rounds, plan.per_round, unmap,
                )
        finally:
            await sharer.close()
            await mapper.close()
            await fast_mapper.close()
        grpc_time = Summary.of(us(samples["grpc"]))
        floor_time = Summary.of(us(samples["seqpacket"]))
        async_floor = Summary.of(us(samples["seqpacket_async"]))
        self.baselines["grpc_unary_us"] = dataclasses.asdict(grpc_time)
        self.baselines["seqpacket_fd_us"] = dataclasses.asdict(floor_time)
        self.baselines["seqpacket_fd_async_us"] = dataclasses.asdict(async_floor)
        self.grpc_median_us = grpc_time.median
        self.floor_median_us = floor_time.median
        self.async_floor_median_us = async_floor.median
        broker = Summary.of(us(samples["broker"]))
        self.add(Figure(
            "map_round_trip", "map round trip (1 grant: map, fd, mmap, read)", "µs", broker.median, broker,
            grpc_time.median, "bare gRPC unary", ratio(broker.median, grpc_time.median), "≤ 1.3x bare gRPC",
            broker.median <= 1.3 * grpc_time.median,
            {"vs_seqpacket_floor": ratio(broker.median, floor_time.median), "seqpacket_floor_us": floor_time.median},
        ))
        fast = Summary.of(us(samples["fast"]))
        self.add(Figure(
            "map_fast", "map round trip, fast path (1 grant: map, fd, mmap, read)", "µs", fast.median, fast,
            async_floor.median, "seqpacket_fd_async", ratio(fast.median, async_floor.median), "≤ 1.5x seqpacket_fd_async",
            fast.median <= 1.5 * async_floor.median,
            {**self.vs_floors(fast.median), "vs_map_round_trip_grpc": ratio(fast.median, broker.median)},
        ))
        self.add(Figure("baseline_grpc_unary", "baseline: bare grpc.aio unary call", "µs", grpc_time.median, grpc_time))
        self.add(Figure("baseline_seqpacket_fd", "baseline: SEQPACKET request + fd (+mmap, read)", "µs",
                        floor_time.median, floor_time))
        self.add(Figure(
            "baseline_seqpacket_fd_async", "baseline: SEQPACKET request + fd (+mmap, read), uvloop + asyncio", "µs",
            async_floor.median, async_floor, floor_time.median, "seqpacket_fd", ratio(async_floor.median, floor_time.median),
        ))

    # ---------------------------------------------------------------- 1b. the map round trip, metrics off and on

    async def map_metrics(self) -> None:
        """What the metrics cost a call (issue 11): the map round trip on two
        fresh brokers alike but for ``--metrics`` (off, and on a Unix socket),
        over gRPC and over the fast path, in the same interleaved rounds.  The
        broker with metrics is scraped at the end: the scrape's time is
        reported, and the calls it counted must be the calls made."""
        plan = self.plan
        progress(f"map round trip, metrics off and on: {plan.rounds - 1} rounds of {plan.per_round} (+1 warm-up round) "
                 "on two fresh brokers, over gRPC and the fast path")
        metrics_path = self.workdir / "metrics.sock"
        brokers = {
            kind: start_broker(str(self.workdir / f"metrics-{kind}.sock"), self.workdir, plan,
                               extra=["--metrics", f"unix:{metrics_path}"] if kind == "on" else [],
                               name=f"broker-metrics-{kind}")
            for kind in ("off", "on")
        }
        sessions: list[Any] = []
        try:
            kinds: dict[str, Callable[[], Awaitable[Any]]] = {}
            for kind, broker in brokers.items():
                socket_path = str(self.workdir / f"metrics-{kind}.sock")
                sharer = await grant_broker_client.connect(socket_path, domid=1, client_name=f"bench-metrics-{kind}-sharer")
                sessions.append(sharer)
                pages = await sharer.gntalloc.share(2, 1)
                pages.view[0] = 0x5A
                for wire, fast_path in (("grpc", False), ("fast", True)):
                    mapper = await grant_broker_client.connect(
                        socket_path, domid=2, client_name=f"bench-metrics-{kind}-{wire}", fast_path=fast_path
                    )
                    sessions.append(mapper)
                    kinds[f"{wire}_{kind}"] = _map_one(mapper, pages.refs[0])

            async def unmap(kind: str, mapping: Any) -> None:
                await mapping.aclose()

            # The brokers' own CPU time per call, less noisy than latencies on a busy machine.
            cpu_before = {kind: _cpu_ns(broker.pid) for kind, broker in brokers.items()}
            samples = await timed_rounds(kinds, plan.rounds, plan.per_round, unmap)
            cpu_us = {kind: (_cpu_ns(broker.pid) - cpu_before[kind]) / 1e3 for kind, broker in brokers.items()}
            scrape_started = time.perf_counter()
            exposition = await _scrape_unix(str(metrics_path))
            scrape_us = (time.perf_counter() - scrape_started) * 1e6
        finally:
            for session in reversed(sessions):
                await session.close()
            for broker in brokers.values():
                code = broker.stop()
                if code not in (0, None):
                    progress(f"{broker.name} exited with {code}: {broker.log_tail()}")
        counted = _counted_maps(exposition)
        expected = plan.rounds * plan.per_round
        if counted != {"grpc": expected, "fast_path": expected}:
            raise AssertionError(f"the broker with metrics counted {counted} Map calls, not {expected} per transport")
        # Per map + unmap, both transports (each broker served 2 x expected of them).
        cpu_per_call = {kind: cpu / (2 * expected) for kind, cpu in cpu_us.items()}
        for wire, name, title in (("grpc", "map_metrics_on", "map round trip, metrics on (gRPC)"),
                                  ("fast", "map_fast_metrics_on", "map round trip, metrics on (fast path)")):
            on, off = Summary.of(us(samples[f"{wire}_on"])), Summary.of(us(samples[f"{wire}_off"]))
            self.add(Figure(
                name, title, "µs", on.median, on, off.median, "metrics off", ratio(on.median, off.median),
                "≤ 1.05x metrics off", on.median <= 1.05 * off.median,
                {"metrics_off_us": dataclasses.asdict(off), "extra_us": on.median - off.median,
                 "broker_cpu_us_per_call_on": cpu_per_call["on"], "broker_cpu_us_per_call_off": cpu_per_call["off"],
                 "broker_cpu_ratio": ratio(cpu_per_call["on"], cpu_per_call["off"]),
                 "scrape_us": scrape_us, "scrape_bytes": len(exposition)},
            ))

    # ---------------------------------------------------------------- 2. batched map

    async def batched_map(self) -> None:
        plan = self.plan
        refs_per_batch = plan.batch_refs
        progress(f"batched map: {plan.batch_reps} batches of {refs_per_batch} refs (+warm-up), each mapped then unmapped")
        cycle, mapped_only = await self._batches(3, 4, fast_path=False)
        rate = refs_per_batch / (cycle.median / 1e6)
        ceiling = refs_per_batch / (self.grpc_median_us / 1e6)
        self.add(Figure(
            "batched_map", f"batched map ({refs_per_batch} refs, map+unmap)", "grants/s", rate, cycle,
            ceiling, "1024 refs per bare gRPC call", ratio(rate, ceiling), "≥ 100,000 grants/s", rate >= 100_000,
            {"map_only_us": dataclasses.asdict(mapped_only), "map_only_grants_per_s": refs_per_batch / (mapped_only.median / 1e6)},
        ))

    async def batched_map_fast(self) -> None:
        plan = self.plan
        refs_per_batch = plan.batch_refs
        progress(f"batched map, fast path: {plan.batch_reps} batches of {refs_per_batch} refs (+warm-up), each mapped "
                 "then unmapped")
        cycle, mapped_only = await self._batches(30, 31, fast_path=True)
        rate = refs_per_batch / (cycle.median / 1e6)
        # As the gRPC figure: the batch at the price of one round trip of the floor.
        ceiling = refs_per_batch / (self.async_floor_median_us / 1e6)
        blocking_ceiling = refs_per_batch / (self.floor_median_us / 1e6)
        self.add(Figure(
            "batched_map_fast", f"batched map, fast path ({refs_per_batch} refs, map+unmap)", "grants/s", rate, cycle,
            ceiling, f"{refs_per_batch} refs per seqpacket_fd_async round trip", ratio(rate, ceiling),
            "≥ 500,000 grants/s", rate >= 500_000,
            {"vs_seqpacket_fd": ratio(rate, blocking_ceiling), "seqpacket_fd_us": self.floor_median_us,
             "seqpacket_fd_async_us": self.async_floor_median_us,
             "map_only_us": dataclasses.asdict(mapped_only), "map_only_grants_per_s": refs_per_batch / (mapped_only.median / 1e6)},
        ))

    async def _batches(self, granter: int, domid: int, *, fast_path: bool) -> tuple[Summary, Summary]:
        """µs of map + unmap, and of the map alone, of plan.batch_refs refs at a time."""
        plan = self.plan
        refs_per_batch = plan.batch_refs
        sharer = await self.connect(granter, "bench-batch-sharer")
        mapper = await self.connect(domid, "bench-batch-mapper", fast_path=fast_path)
        try:
            async with await sharer.gntalloc.share(domid, refs_per_batch) as pages:
                refs = [(granter, ref) for ref in pages.refs]
                map_times: list[float] = []
                cycle_times: list[float] = []
                clock = time.perf_counter
                warmup = max(2, plan.batch_reps // 10)
                for i in range(warmup + plan.batch_reps):
                    start = clock()
                    mapping = await mapper.gntdev.map(refs, writable=False)
                    mapped = clock()
                    if mapping.view[-PAGE] != 0:
                        raise AssertionError("unexpected page contents")
                    await mapping.aclose()
                    done = clock()
                    if i >= warmup:
                        map_times.append(mapped - start)
                        cycle_times.append(done - start)
        finally:
            await sharer.close()
            await mapper.close()
        return Summary.of(us(cycle_times)), Summary.of(us(map_times))

    # ---------------------------------------------------------------- 3. events

    async def _event_pair(
        self, listener_domid: int, notifier_domid: int, *, fast_path: bool = False
    ) -> tuple[Any, Any, int, int]:
        listener = await self.connect(listener_domid, "bench-listener", fast_path=fast_path)
        notifier = await self.connect(notifier_domid, "bench-notifier", fast_path=fast_path)
        offered = await listener.evtchn.bind_unbound_port(notifier_domid)
        port = await notifier.evtchn.bind_interdomain(listener_domid, offered)
        return listener, notifier, offered, port

    async def _event_rounds(
        self, listener_domid: int, notifier_domid: int, fast_path: bool, baselines: dict[str, Callable[[], Awaitable[Any]]]
    ) -> dict[str, list[float]]:
        """Notify -> the subscriber has the event, interleaved with *baselines*."""
        plan = self.plan
        listener, notifier, offered, port = await self._event_pair(listener_domid, notifier_domid, fast_path=fast_path)
        try:
            async with listener.evtchn.subscribe(ports=[offered]) as events:

                async def notify_and_receive() -> Any:
                    # Timed until the subscriber has the event; the notifier's
                    # own reply is awaited after, untimed.
                    sent = asyncio.ensure_future(notifier.evtchn.notify(port))
                    event = await anext(events)
                    if getattr(event, "port", None) != offered:
                        raise AssertionError(f"unexpected event {event!r}")
                    return sent

                async def reply(kind: str, sent: Any) -> None:
                    if kind == "broker":
                        await sent

                return await timed_rounds(
                    {"broker": notify_and_receive, **baselines}, plan.rounds, plan.per_round, reply
                )
        finally:
            await listener.close()
            await notifier.close()

    async def event_latency(self) -> None:
        plan = self.plan
        progress(f"event latency, one subscriber: {plan.rounds - 1} rounds of {plan.per_round} (+1 warm-up), with bare gRPC")
        samples = await self._event_rounds(10, 11, False, {"grpc": self.bare_grpc})
        broker = Summary.of(us(samples["broker"]))
        grpc_time = Summary.of(us(samples["grpc"]))
        self.add(Figure(
            "event_latency_1", "event latency, 1 subscriber (notify -> stream)", "µs", broker.median, broker,
            grpc_time.median, "bare gRPC unary", ratio(broker.median, grpc_time.median), "≤ 1.5x bare gRPC",
            broker.median <= 1.5 * grpc_time.median,
        ))

    async def event_fast(self) -> None:
        plan = self.plan
        progress(f"event latency, fast path, one subscriber: {plan.rounds - 1} rounds of {plan.per_round} (+1 warm-up), "
                 "with both floors")
        samples = await self._event_rounds(14, 15, True, {"seqpacket_async": self.floor_async, "seqpacket": self.floor})
        fast = Summary.of(us(samples["broker"]))
        async_floor = Summary.of(us(samples["seqpacket_async"]))
        floor_time = Summary.of(us(samples["seqpacket"]))
        self.add(Figure(
            "event_fast", "event latency, fast path, 1 subscriber (notify -> PortFired)", "µs", fast.median, fast,
            async_floor.median, "seqpacket_fd_async", ratio(fast.median, async_floor.median), "≤ 1.5x seqpacket_fd_async",
            fast.median <= 1.5 * async_floor.median,
            # Both floors measured in this figure's own rounds, as event_latency_1 measures its bare call.
            {"vs_seqpacket_fd": ratio(fast.median, floor_time.median), "seqpacket_fd_us": floor_time.median,
             "seqpacket_fd_async_us": async_floor.median, "seqpacket_fd_async_p99_us": async_floor.p99},
        ))

    async def event_fanout(self) -> None:
        count = self.plan.subscribers
        progress(f"event fan-out: {count} subscribers of one port, {self.plan.fanout_reps} notifications (+warm-up)")
        each, everyone = await self._fanout(12, 13, fast_path=False)
        self.add(Figure(
            "event_fanout", f"event fan-out, {count} subscribers: p99 per subscriber", "µs", each.p99, each,
            self.grpc_median_us, "bare gRPC unary", ratio(each.p99, self.grpc_median_us), "p99 reported",
            None, {"subscribers": count, "all_delivered_us": dataclasses.asdict(everyone)},
        ))

    async def event_fanout_fast(self) -> None:
        count = self.plan.subscribers
        progress(f"event fan-out, fast path: {count} subscribers of one port, {self.plan.fanout_reps} notifications "
                 "(+warm-up)")
        each, everyone = await self._fanout(16, 17, fast_path=True)
        self.add(Figure(
            "event_fanout_fast", f"event fan-out, fast path, {count} subscribers: p99 per subscriber", "µs", each.p99, each,
            self.async_floor_median_us, "seqpacket_fd_async", ratio(each.p99, self.async_floor_median_us),
            "p99 ≤ 20 ms", each.p99 <= 20_000,
            {**self.vs_floors(each.p99), "subscribers": count, "all_delivered_us": dataclasses.asdict(everyone)},
        ))

    async def _fanout(self, listener_domid: int, notifier_domid: int, *, fast_path: bool) -> tuple[Summary, Summary]:
        """*plan.subscribers* subscriptions of one port in one session; µs from
        each notify to each subscriber having it, and to the last one having it."""
        plan = self.plan
        count = plan.subscribers
        listener, notifier, offered, port = await self._event_pair(listener_domid, notifier_domid, fast_path=fast_path)
        per_subscriber: list[float] = []
        last: list[float] = []
        try:
            subscriptions = []
            try:
                for _ in range(count):
                    subscriptions.append(await listener.evtchn.subscribe(ports=[offered], queue_size=4))
                clock = time.perf_counter
                received = [0.0] * count
                remaining = 0
                all_in = asyncio.Event()

                async def reader(i: int, subscription: Any) -> None:
                    nonlocal remaining
                    async for _event in subscription:
                        received[i] = clock()
                        remaining -= 1
                        if remaining == 0:
                            all_in.set()

                readers = [asyncio.ensure_future(reader(i, s)) for i, s in enumerate(subscriptions)]
                try:
                    warmup = max(2, plan.fanout_reps // 10)
                    for rep in range(warmup + plan.fanout_reps):
                        remaining = count
                        all_in.clear()
                        start = clock()
                        await notifier.evtchn.notify(port)
                        await asyncio.wait_for(all_in.wait(), 60)
                        if rep >= warmup:
                            per_subscriber.extend(t - start for t in received)
                            last.append(max(received) - start)
                finally:
                    for task in readers:
                        task.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)
            finally:
                for subscription in subscriptions:
                    await subscription.close()
        finally:
            await listener.close()
            await notifier.close()
        return Summary.of(us(per_subscriber)), Summary.of(us(last))

    # ---------------------------------------------------------------- 4. grant copy

    async def grant_copy(self) -> None:
        plan = self.plan
        largest = max(plan.copy_sizes)
        progress(f"grant copy: sizes {', '.join(_size(s) for s in plan.copy_sizes)}, {plan.copy_reps} calls each path "
                 f"(+warm-up), and memcpy")
        sharer, copier = await self.connect(5, "bench-copy-sharer"), await self.connect(6, "bench-copier")
        try:
            async with await sharer.gntalloc.share(6, largest // PAGE) as pages:
                pages.view[:] = os.urandom(largest)
                expected = bytes(pages.view)
                async with await copier.gntdev.copy_buffer(largest) as buffer:
                    for size in plan.copy_sizes:
                        await self._copy_size(copier, pages.refs, buffer, size, expected)
                    await self._copy_pipelined(copier, pages.refs, buffer, largest)
        finally:
            await sharer.close()
            await copier.close()

    async def _copy_size(self, copier: Any, refs: Sequence[int], buffer: Any, size: int, expected: bytes) -> None:
        plan = self.plan
        pages = size // PAGE
        to_buffer = [CopySegment(Foreign(5, refs[i]), Local(buffer, i * PAGE), PAGE) for i in range(pages)]
        to_bytes = [CopySegment(Foreign(5, refs[i]), None, PAGE) for i in range(pages)]

        async def via_buffer() -> None:
            results = await copier.gntdev.grant_copy(to_buffer)
            if not results[-1].ok:
                raise AssertionError(f"grant copy failed: {results[-1].status_name}")

        async def via_bytes() -> None:
            results = await copier.gntdev.grant_copy(to_bytes)
            if not results[-1].ok or len(results[-1].data) != PAGE:
                raise AssertionError("grant copy (inline bytes) failed")

        rounds = 5
        per_round = max(1, plan.copy_reps // (rounds - 1))
        samples = await timed_rounds({"buffer": via_buffer, "bytes": via_bytes}, rounds, per_round)
        if bytes(buffer.view[:size]) != expected[:size]:
            raise AssertionError("the copy buffer does not hold the granted bytes")
        memcpy = Summary.of(memcpy_seconds(size, max(200, plan.copy_reps)))
        memcpy_rate = size / memcpy.median / 1e9
        self.baselines[f"memcpy_{_size(size)}_GBps"] = memcpy_rate
        target_size = size == MIB
        for path, title in (("buffer", "shared buffer"), ("bytes", "protobuf bytes")):
            times = Summary.of(us(samples[path]))
            rate = size / (times.median / 1e6) / 1e9
            is_target = target_size and path == "buffer"
            self.add(Figure(
                f"grant_copy_{path}_{_size(size)}", f"grant copy {_size(size)}, {title}", "GB/s", rate, times,
                memcpy_rate, "memcpy", ratio(rate, memcpy_rate),
                "≥ 50% of memcpy" if is_target else "reported", (rate >= 0.5 * memcpy_rate) if is_target else None,
                # One call at a time can move no more than this: size / one bare call.
                {"grpc_ceiling_GBps": size / (self.grpc_median_us / 1e6) / 1e9},
            ))

    async def _copy_pipelined(self, copier: Any, refs: Sequence[int], buffer: Any, size: int) -> None:
        """Throughput with several calls in flight, each into its own part of the buffer... of the same size."""
        plan = self.plan
        depth = plan.pipeline_depth
        pages = size // PAGE
        segments = [CopySegment(Foreign(5, refs[i]), Local(buffer, i * PAGE), PAGE) for i in range(pages)]
        calls = max(depth * 4, plan.copy_reps)
        for _ in range(depth):  # warm-up
            await copier.gntdev.grant_copy(segments)
        start = time.perf_counter()
        for _ in range(calls // depth):
            await asyncio.gather(*(copier.gntdev.grant_copy(segments) for _ in range(depth)))
        elapsed = time.perf_counter() - start
        done = (calls // depth) * depth
        rate = done * size / elapsed / 1e9
        memcpy_rate = self.baselines[f"memcpy_{_size(size)}_GBps"]
        self.add(Figure(
            f"grant_copy_buffer_{_size(size)}_pipelined", f"grant copy {_size(size)}, shared buffer, {depth} in flight",
            "GB/s", rate, None, memcpy_rate, "memcpy", ratio(rate, memcpy_rate), "≥ 50% of memcpy",
            rate >= 0.5 * memcpy_rate, {"calls": done, "seconds": elapsed},
        ))
        # The most any design moving one copy per gRPC call could reach: bare
        # calls with as many in flight, as if each one carried `size` bytes.
        for _ in range(depth):
            await self.bare_grpc()
        start = time.perf_counter()
        for _ in range(calls // depth):
            await asyncio.gather(*(self.bare_grpc() for _ in range(depth)))
        bare_calls_per_second = done / (time.perf_counter() - start)
        ceiling = bare_calls_per_second * size / 1e9
        self.add(Figure(
            "baseline_grpc_copy_ceiling", f"baseline: bare gRPC calls, {depth} in flight, x {_size(size)} each",
            "GB/s", ceiling, None, memcpy_rate, "memcpy", ratio(ceiling, memcpy_rate), "reported", None,
            {"calls_per_second": bare_calls_per_second, "depth": depth},
        ))

    # ---------------------------------------------------------------- 4b. grant copy through the ring (fast path)

    async def grant_copy_ring(self) -> None:
        """Grant copy through a copy ring (``session.gntdev.copy_ring``) on a
        fast-path session: one 4 KiB segment (latency, in interleaved rounds
        with both floors and the same segment as a GrantCopy call on the same
        session), then 1 MiB in 4 KiB segments (one 256-record doorbell per
        MiB; and *pipeline_depth* of them in flight on a larger ring)."""
        plan = self.plan
        size, pages_count = MIB, MIB // PAGE
        depth = max(1, min(plan.pipeline_depth, MAX_RING_ENTRIES // pages_count))
        progress(f"grant copy ring, fast path: 4 KiB in {plan.rounds - 1} rounds of {plan.per_round} (+1 warm-up) with "
                 f"both floors; 1 MiB in {pages_count} segments, {plan.copy_reps} doorbells (+warm-up), then {depth} in flight")
        sharer = await self.connect(7, "bench-ring-sharer")
        copier = await self.connect(8, "bench-ring-copier", fast_path=True)
        try:
            async with await sharer.gntalloc.share(8, pages_count) as pages:
                pages.view[:] = os.urandom(size)
                expected = bytes(pages.view)
                async with await copier.gntdev.copy_buffer(size) as buffer:
                    async with await copier.gntdev.copy_ring(buffer, entries=pages_count) as ring:
                        await self._ring_4k(copier, ring, buffer, pages.refs, expected)
                        buffer.view[:] = bytes(size)
                        times = await self._ring_1m(ring, buffer, pages.refs, expected)
                    async with await copier.gntdev.copy_ring(buffer, entries=depth * pages_count) as ring:
                        in_flight = await self._ring_in_flight(ring, buffer, pages.refs, depth)
        finally:
            await sharer.close()
            await copier.close()
        memcpy_rate = self.baselines.get(f"memcpy_{_size(size)}_GBps")
        if memcpy_rate is None:  # the plan's copy sizes left out 1 MiB (or --only ring)
            memcpy_rate = size / Summary.of(memcpy_seconds(size, max(200, plan.copy_reps))).median / 1e9
            self.baselines[f"memcpy_{_size(size)}_GBps"] = memcpy_rate
        rate = size / (times.median / 1e6) / 1e9
        in_flight_rate = in_flight["GBps"]
        # One doorbell round trip per MiB at the floors' price, the copy free: what the transport allows.
        async_ceiling = size / (self.async_floor_median_us / 1e6) / 1e9
        blocking_ceiling = size / (self.floor_median_us / 1e6) / 1e9
        grpc_call = self._figure(f"grant_copy_buffer_{_size(size)}")
        grpc_rate = grpc_call.value if grpc_call is not None else None
        self.add(Figure(
            "grant_copy_ring_1MiB", f"grant copy ring, fast path, 1 MiB in {pages_count} x 4 KiB (one doorbell)", "GB/s",
            rate, times, memcpy_rate, "memcpy", ratio(rate, memcpy_rate), "≥ 50% of memcpy", rate >= 0.5 * memcpy_rate,
            {"vs_seqpacket_fd": ratio(rate, blocking_ceiling), "seqpacket_fd_ceiling_GBps": blocking_ceiling,
             "seqpacket_fd_async_ceiling_GBps": async_ceiling, "seqpacket_fd_us": self.floor_median_us,
             "seqpacket_fd_async_us": self.async_floor_median_us,
             "in_flight": {**in_flight, "vs_memcpy": ratio(in_flight_rate, memcpy_rate)},
             # The same MiB as one GrantCopy call over gRPC (grant_copy_buffer_1MiB), when measured.
             "grant_copy_call_grpc_GBps": grpc_rate, "vs_grant_copy_call_grpc": ratio(rate, grpc_rate)},
        ))

    def _figure(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    async def _ring_4k(self, copier: Any, ring: Any, buffer: Any, refs: Sequence[int], expected: bytes) -> None:
        plan = self.plan
        segment = [CopySegment(Foreign(7, refs[0]), Local(buffer, 0), PAGE)]

        async def via_ring() -> None:
            statuses = await ring.submit(segment)
            if statuses[0] != 0:
                raise AssertionError(f"grant copy ring failed: status {statuses[0]}")

        async def via_call() -> None:  # the same segment as a GrantCopy call, on the same fast-path session
            results = await copier.gntdev.grant_copy(segment)
            if not results[0].ok:
                raise AssertionError(f"grant copy failed: {results[0].status_name}")

        samples = await timed_rounds(
            {"ring": via_ring, "seqpacket_async": self.floor_async, "seqpacket": self.floor, "call": via_call},
            plan.rounds, plan.per_round,
        )
        if bytes(buffer.view[:PAGE]) != expected[:PAGE]:
            raise AssertionError("the copy buffer does not hold the granted page")
        fast = Summary.of(us(samples["ring"]))
        async_floor = Summary.of(us(samples["seqpacket_async"]))
        floor_time = Summary.of(us(samples["seqpacket"]))
        call = Summary.of(us(samples["call"]))
        grpc_call = self._figure("grant_copy_buffer_4KiB")
        self.add(Figure(
            "grant_copy_ring_4KiB", "grant copy ring, fast path, one 4 KiB segment", "µs", fast.median, fast,
            async_floor.median, "seqpacket_fd_async", ratio(fast.median, async_floor.median), "≤ 1.5x seqpacket_fd_async",
            fast.median <= 1.5 * async_floor.median,
            # Both floors in this figure's own rounds, as event_fast; and the
            # same copy as a GrantCopy call on the same session.
            {"vs_seqpacket_fd": ratio(fast.median, floor_time.median), "seqpacket_fd_us": floor_time.median,
             "seqpacket_fd_async_us": async_floor.median, "seqpacket_fd_async_p99_us": async_floor.p99,
             "grant_copy_call_fast_us": dataclasses.asdict(call), "vs_grant_copy_call_fast": ratio(fast.median, call.median),
             "grant_copy_call_grpc_us": grpc_call.time.median if grpc_call is not None and grpc_call.time else None},
        ))

    async def _ring_1m(self, ring: Any, buffer: Any, refs: Sequence[int], expected: bytes) -> Summary:
        """µs per 1 MiB doorbell, one at a time."""
        plan = self.plan
        segments = [CopySegment(Foreign(7, refs[i]), Local(buffer, i * PAGE), PAGE) for i in range(len(refs))]

        async def one_mib() -> None:
            statuses = await ring.submit(segments)
            if any(statuses):
                raise AssertionError(f"grant copy ring failed: statuses {sorted(set(statuses))}")

        rounds = 5
        per_round = max(1, plan.copy_reps // (rounds - 1))
        samples = await timed_rounds({"ring": one_mib}, rounds, per_round)
        if bytes(buffer.view) != expected:
            raise AssertionError("the copy buffer does not hold the granted bytes")
        return Summary.of(us(samples["ring"]))

    async def _ring_in_flight(self, ring: Any, buffer: Any, refs: Sequence[int], depth: int) -> dict[str, Any]:
        """GB/s with *depth* 1 MiB doorbells in flight on one ring (disjoint slots)."""
        plan = self.plan
        size = len(refs) * PAGE
        segments = [CopySegment(Foreign(7, refs[i]), Local(buffer, i * PAGE), PAGE) for i in range(len(refs))]
        calls = max(depth * 4, plan.copy_reps)
        await asyncio.gather(*(ring.submit(segments) for _ in range(depth)))  # warm-up
        start = time.perf_counter()
        for _ in range(calls // depth):
            done = await asyncio.gather(*(ring.submit(segments) for _ in range(depth)))
            if any(any(statuses) for statuses in done):
                raise AssertionError("grant copy ring failed")
        elapsed = time.perf_counter() - start
        copied = (calls // depth) * depth
        return {"depth": depth, "doorbells": copied, "seconds": elapsed, "GBps": copied * size / elapsed / 1e9}

    # ---------------------------------------------------------------- 5. scale

    async def scale(self) -> None:
        plan = self.plan
        assert self.broker is not None
        # A fresh broker: memory the earlier figures freed (1000 subscriptions,
        # copy buffers...) would otherwise be reused by these sessions and
        # hide part of their cost.
        code = self.broker.stop()
        if code != 0:
            progress(f"the broker exited with {code}: {self.broker.log_tail()}")
        self.children.remove(self.broker)
        profile = self.profile.with_name(self.profile.name + ".scale") if self.profile is not None else None
        self.broker = start_broker(self.socket, self.workdir, self.plan, profile)
        self.children.append(self.broker)
        pid = self.broker.pid
        workers = max(1, min(plan.workers, plan.sessions))
        progress(f"scale: {plan.sessions} sessions x {plan.mappings} mappings in {workers} client processes, "
                 f"then {plan.in_flight} calls in flight")
        sharer = await self.connect(20, "bench-scale-sharer")
        try:
            async with await sharer.gntalloc.share(21, plan.mappings) as pages:
                await asyncio.sleep(0.2)
                rss_before, fds_before = vm_rss_kib(pid), fd_count(pid)
                shares = [plan.sessions // workers + (1 if w < plan.sessions % workers else 0) for w in range(workers)]
                started = time.perf_counter()
                procs = [
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "bench.scale_worker",
                        json.dumps({"socket": self.socket, "sessions": n, "mappings": plan.mappings, "granter": 20,
                                    "domid": 21, "refs": list(pages.refs), "worker": w,
                                    "connect_options": {"fast_path": False}}),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        cwd=Path(__file__).resolve().parent.parent,
                    )
                    for w, n in enumerate(shares)
                ]
                try:
                    ready = await asyncio.gather(*(_answer(p, "ready", 600) for p in procs))
                    setup_seconds = time.perf_counter() - started
                    opened = sum(r["sessions"] for r in ready)
                    setup_failed = sum(r["failed"] for r in ready)
                    await asyncio.sleep(0.5)
                    rss_held, fds_held = vm_rss_kib(pid), fd_count(pid)
                    progress(f"  {opened} sessions ({setup_failed} failed) holding {sum(r['mappings'] for r in ready)} "
                             f"mappings after {setup_seconds:.1f}s; broker RSS {rss_before} -> {rss_held} KiB, "
                             f"fds {fds_before} -> {fds_held}")
                    per_worker = [plan.in_flight // workers + (1 if w < plan.in_flight % workers else 0) for w in range(workers)]
                    for proc, calls in zip(procs, per_worker):
                        _command(proc, {"cmd": "burst", "calls": calls})
                    bursts = await asyncio.gather(*(_answer(p, "burst", 600) for p in procs))
                    for proc in procs:
                        _command(proc, {"cmd": "close"})
                    await asyncio.gather(*(_answer(p, "closed", 120) for p in procs))
                finally:
                    for proc in procs:
                        if proc.returncode is None:
                            with contextlib.suppress(ProcessLookupError):
                                proc.kill()
                        await proc.wait()
                await asyncio.sleep(0.5)
                fds_after = fd_count(pid)
        finally:
            await sharer.close()
        failed = sum(b["failed"] for b in bursts)
        errors = [e for b in bursts for e in b["errors"]][:5]
        intervals = [tuple(i) for b in bursts for i in b["intervals"]]
        peak = _peak_overlap(intervals)
        call_times = Summary.of([(end - start) / 1e3 for start, end in intervals])
        burst_seconds = max(b["seconds"] for b in bursts)
        sessions = max(opened, 1)
        rss_per_session = (rss_held - rss_before) / sessions
        fds_per_session = (fds_held - fds_before) / sessions
        self.add(Figure(
            "scale_rss_per_session", f"broker RSS per session ({opened} sessions x {plan.mappings} mappings)", "KiB",
            rss_per_session, None, None, None, None, "≤ 64 KiB", rss_per_session <= 64,
            {"rss_before_kib": rss_before, "rss_held_kib": rss_held, "sessions": opened, "setup_failed": setup_failed,
             "setup_seconds": setup_seconds},
        ))
        self.add(Figure(
            "scale_fds_per_session", "broker fds per session", "fds", fds_per_session, None, None, None, None,
            "reported", None, {"fds_before": fds_before, "fds_held": fds_held, "fds_after_release": fds_after},
        ))
        self.add(Figure(
            "scale_in_flight_failures", f"{plan.in_flight} calls in flight across {workers} processes: failures",
            "calls", float(failed), call_times, None, None, None, "0 failures", failed == 0 and setup_failed == 0,
            {"calls": sum(b["calls"] for b in bursts), "peak_in_flight": peak, "seconds": burst_seconds,
             "calls_per_second": sum(b["calls"] for b in bursts) / burst_seconds if burst_seconds else None,
             "errors": errors},
        ))

    # ---------------------------------------------------------------- 6. bystander under flood

    async def bystander_under_flood(self) -> None:
        """A bystander's median latency under each flood of :mod:`bench.flood`,
        against its unloaded median in the same run; the figure is the worst
        ratio (issue 14: target ≤ 2x for every flood)."""
        from bench.flood import bystander_under_flood

        plan = self.plan
        results = await bystander_under_flood(self.socket, plan.flood_seconds, max(50, plan.per_round), progress)
        unloaded = results.pop("unloaded_median_us")
        worst_kind = max(results, key=lambda kind: results[kind]["ratio"])
        worst = results[worst_kind]
        self.add(Figure(
            "bystander_under_flood", f"bystander's median under a flood (worst: {worst_kind})", "µs", worst["median_us"],
            None, unloaded, "its unloaded median", worst["ratio"], "≤ 2x for every flood", worst["ratio"] <= 2,
            {"floods": results},
        ))

    # ---------------------------------------------------------------- all

    async def run(self, only: set[str] | None = None) -> None:
        await self.map_round_trip()  # also measures the baselines the others use, and map_fast
        for name, figures in (
            ("metrics", (self.map_metrics,)),
            ("batch", (self.batched_map, self.batched_map_fast)),
            ("events", (self.event_latency, self.event_fast)),
            ("fanout", (self.event_fanout, self.event_fanout_fast)),
            ("copy", (self.grant_copy,)),
            ("ring", (self.grant_copy_ring,)),
            ("scale", (self.scale,)),
            ("flood", (self.bystander_under_flood,)),
        ):
            if only is None or name in only:
                for figure in figures:
                    await figure()


def _map_one(session: Any, ref: int) -> Callable[[], Awaitable[Any]]:
    """Map one grant of domain 1 on *session*, check its first byte (0x5A): the map round trip."""

    async def map_one() -> Any:
        mapping = await session.gntdev.map([(1, ref)], writable=False)
        if mapping.view[0] != 0x5A:
            raise AssertionError("the mapped page does not hold the granter's byte")
        return mapping

    return map_one


def _cpu_ns(pid: int) -> int:
    """The CPU time (ns) the threads of process *pid* have used so far (their schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as stats:
            total += int(stats.read().split()[0])
    return total


async def _scrape_unix(path: str) -> str:
    """``GET /metrics`` from a broker's metrics endpoint on a Unix socket."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"scraping {path}: {head[:200]!r}")
    return body.decode()


def _counted_maps(exposition: str) -> dict[str, int]:
    """The successful Gntdev.Map calls an exposition counts, by transport."""
    from prometheus_client.parser import text_string_to_metric_families

    counted: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "grant_broker_calls_total" and labels.get("service") == "Gntdev"
                    and labels.get("method") == "Map" and labels.get("status") == "OK"):
                counted[labels["transport"]] = counted.get(labels["transport"], 0) + int(sample.value)
    return counted


def _size(size: int) -> str:
    return f"{size // MIB}MiB" if size >= MIB else f"{size // KIB}KiB"


def _command(proc: asyncio.subprocess.Process, command: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(command) + "\n").encode())


async def _answer(proc: asyncio.subprocess.Process, event: str, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a scale worker exited (code {await proc.wait()}) before answering {event!r}")
            answer = json.loads(line)
            if answer.get("event") == event:
                return answer


def _peak_overlap(intervals: Sequence[tuple[int, int]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def table(figures: Sequence[Figure]) -> str:
    header = ("figure", "min µs", "median µs", "p99 µs", "value", "baseline", "ratio", "target", "met")
    rows = [header]
    for f in figures:
        digits = 2 if f.unit in ("GB/s", "fds") else (1 if f.unit == "KiB" else 0)
        if f.unit == "GB/s" and f.value < 1:
            digits = 3
        rows.append((
            f.title,
            _fmt(f.time.min if f.time else None),
            _fmt(f.time.median if f.time else None),
            _fmt(f.time.p99 if f.time else None),
            f"{_fmt(f.value, digits)} {f.unit}",
            f"{_fmt(f.baseline, digits)} {f.unit}" if f.baseline is not None else "-",
            f"{f.ratio:.2f}x" if f.ratio is not None else "-",
            f.target,
            {True: "yes", False: "NO", None: "-"}[f.met],
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) if i == 0 or i >= 7 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(figures: Sequence[Figure], baselines: dict[str, Any], info: dict[str, Any], mode: str, plan: Plan,
            seconds: float) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean({
        "mode": mode,
        "seconds": seconds,
        "machine": info,
        "plan": dataclasses.asdict(plan),
        "baselines": baselines,
        "figures": {f.name: dataclasses.asdict(f) for f in figures},
    })


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and 100 sessions (about a minute)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the figures (default {DEFAULT_JSON})")
    parser.add_argument("--profile-broker", type=Path, default=None, metavar="PATH",
                        help="run the broker under cProfile and write its statistics to PATH (read with python -m pstats)")
    parser.add_argument("--only", default=None, metavar="FIGURES",
                        help="comma-separated subset of: map,metrics,batch,events,fanout,copy,ring,scale,flood, each over gRPC and (but "
                             "copy and scale) the fast path; ring: grant copy through a copy ring, fast path only; metrics: the map "
                             "round trip on two fresh brokers, metrics off and on (the map round trip, which measures the "
                             "baselines, always runs)")
    tune = parser.add_argument_group("overrides (for the smoke test and experiments)")
    for name in ("rounds", "per_round", "batch_reps", "subscribers", "fanout_reps", "copy_reps", "sessions", "mappings",
                 "in_flight", "workers", "pipeline_depth"):
        tune.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    tune.add_argument("--copy-sizes", default=None, help="comma-separated sizes in KiB (default 4,16,64,256,1024)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    overrides = {name: getattr(args, name) for name in (
        "rounds", "per_round", "batch_reps", "subscribers", "fanout_reps", "copy_reps", "sessions", "mappings",
        "in_flight", "workers", "pipeline_depth") if getattr(args, name) is not None}
    if args.copy_sizes:
        overrides["copy_sizes"] = tuple(int(s) * KIB for s in args.copy_sizes.split(","))
    plan = dataclasses.replace(plan, **overrides)
    if plan.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (the first round is warm-up)")
    return plan


async def amain(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    soft, _ = raise_fd_limit()
    info = machine()
    info["rlimit_nofile"] = soft
    mode = "quick" if args.quick else "default"
    progress(f"{mode} run on {info['nproc']} x {info['cpu']}, Python {info['python']}, grpcio {info['grpcio']}")
    began = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="gb-bench-"))
    bench = Bench(plan, workdir, args.profile_broker.resolve() if args.profile_broker else None)
    only = set(args.only.split(",")) if args.only else None
    known = {"map", "metrics", "batch", "events", "fanout", "copy", "ring", "scale", "flood"}
    if only is not None and only - known:
        raise SystemExit(f"--only: unknown figures {', '.join(sorted(only - known))}")
    try:
        await bench.start()
        await bench.run(only)
    finally:
        await bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - began
    info["loadavg_at_end"] = os.getloadavg()[0]
    print(table(bench.figures))
    print(f"\n{mode} run, {seconds:.0f} s; {info['nproc']} x {info['cpu']}; Python {info['python']}; "
          f"grpcio {info['grpcio']}; load average {info['loadavg_at_start']:.2f} -> {info['loadavg_at_end']:.2f}")
    result = to_json(bench.figures, bench.baselines, info, mode, plan, seconds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    progress(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return uvloop.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
