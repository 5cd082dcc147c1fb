"""Where the time of a fast-path call goes: timestamps at each hop, in both processes.

``python -m bench.hops [--calls N] [--only floor,map,event,batch,fanout,ring] [--light]
[--broker-sndbuf BYTES] [--json PATH]``

Starts a broker (emulated backend) whose fast-path code is wrapped with
timestamps, wraps the SDK in this process the same way, and runs the
fast-path figures of :mod:`bench.run` one call at a time: the asyncio floor
(``floor``: only its client is stamped), a one-grant map (``map_fast``),
notify -> PortFired (``event_fast``), a 1024-ref map + unmap
(``batched_map_fast``), one notification to many subscribers
(``event_fanout_fast``, with the asyncio floor of handing one event to as
many tasks) and grant copy through a copy ring (``ring``: one 4 KiB segment,
``grant_copy_ring_4KiB``, and 1 MiB in 256 segments, ``grant_copy_ring_1MiB``).
``--light`` stamps only ``sendmsg`` (the fan-out's sends at the least cost);
``--broker-sndbuf`` is an experiment: the broker's fd channels get that
``SO_SNDBUF``.  The stamps are ``time.perf_counter_ns()`` — CLOCK_MONOTONIC,
one clock for both processes — taken on entry (``>``) and exit (``<``, or
``!`` when it raised) of: the SDK's map/call/fast call and ring submit, the
fd channel's send and receive, every ``socket.sendmsg``/``recvmsg``, the fd
channel's reader callback (``readable``: the loop saw the socket readable;
``wake``: a future-based wait woke, now only the writer's and the hello's),
each side's frame dispatch (``on_frame``), the broker's fast-path call
handling, the operation itself, and the ring's steps in both processes.

For each traced call the stamps of both processes inside its window are put
in time order; the most common sequence is reported with the median time of
each stamp from the call's start, and the step from the stamp before it.  The
wrappers cost what :func:`stamp_cost_ns` prints per stamp (and a Python call
each): totals here are that much above the uninstrumented figures.

This is a diagnostic, not a figure: ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import collections
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CLOCK = time.perf_counter_ns
# Stamps as two arrays (name code, time): appending allocates no Python
# object for the garbage collector to walk.
NAMES: list[str] = []
_CODES: dict[str, int] = {}
CODES = array.array("I")
TIMES = array.array("q")
_PREFIX = "?"


def code(name: str) -> int:
    """The code of stamp *name* (of this process: prefixed ``c.`` or ``b.``)."""
    name = _PREFIX + name
    if name not in _CODES:
        _CODES[name] = len(NAMES)
        NAMES.append(name)
    return _CODES[name]


def stamps() -> list[tuple[str, int]]:
    return [(NAMES[c], t) for c, t in zip(CODES, TIMES)]


def stamp_cost_ns(n: int = 200_000) -> float:
    """What one stamp costs here (the wrappers add a Python call on top)."""
    saved = len(CODES)
    x = code("x")
    start = CLOCK()
    for _ in range(n):
        CODES.append(x)
        TIMES.append(CLOCK())
    cost = (CLOCK() - start) / n
    del CODES[saved:], TIMES[saved:]
    return cost


# --------------------------------------------------------------------------- wrapping


def _wrap_sync(owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr)
    enter, leave, fail = code(name + ">"), code(name + "<"), code(name + "!")
    codes, times, clock = CODES, TIMES, CLOCK

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        codes.append(enter)
        times.append(clock())
        try:
            result = original(*args, **kwargs)
        except BaseException:
            codes.append(fail)
            times.append(clock())
            raise
        codes.append(leave)
        times.append(clock())
        return result

    setattr(owner, attr, wrapped)


def _wrap_async(owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr)
    enter, leave, fail = code(name + ">"), code(name + "<"), code(name + "!")
    codes, times, clock = CODES, TIMES, CLOCK

    @functools.wraps(original)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        codes.append(enter)
        times.append(clock())
        try:
            result = await original(*args, **kwargs)
        except BaseException:
            codes.append(fail)
            times.append(clock())
            raise
        codes.append(leave)
        times.append(clock())
        return result

    setattr(owner, attr, wrapped)


def _wrap_common() -> None:
    """The fd channel and the socket calls, in either process."""
    from grant_broker_protocol import fdchannel

    _wrap_sync(socket.socket, "sendmsg", "sendmsg")
    _wrap_sync(socket.socket, "recvmsg", "recvmsg")
    _wrap_sync(fdchannel, "_wake", "wake")  # a future-based wait (writer, hello): looked up at each add_reader/add_writer
    # The reader callback, bound when start_reading registers it (after this wrapping).
    _wrap_sync(fdchannel.FdChannel, "_on_readable", "readable")
    _wrap_async(fdchannel.FdChannel, "send", "send")
    _wrap_sync(fdchannel.FdChannel, "try_receive", "try_receive")


def wrap_sdk(light: bool = False) -> None:
    global _PREFIX
    _PREFIX = "c."
    if light:
        _wrap_sync(socket.socket, "sendmsg", "sendmsg")
        return
    _wrap_common()
    from grant_broker_client import evtchn, fastpath, gntdev, session

    _wrap_async(gntdev.GntdevClient, "map", "map")
    _wrap_async(gntdev.Mapping, "aclose", "unmap")
    _wrap_async(gntdev, "receive_spans", "receive_spans")
    _wrap_sync(gntdev, "map_received", "mmap")
    _wrap_async(session.Session, "call", "call")
    _wrap_sync(session.Session, "_on_frame", "on_frame")
    _wrap_async(fastpath.FastCalls, "call", "fast_call")
    _wrap_sync(fastpath.FastCalls, "on_reply", "on_reply")
    _wrap_sync(fastpath.FastCalls, "on_stream_frame", "on_stream_frame")
    _wrap_async(fastpath.FastStream, "read", "stream_read")
    _wrap_async(evtchn.EvtchnSubscription, "__anext__", "subscription_next")
    # The copy ring: records written, the doorbell, the statuses read back.
    _wrap_async(gntdev.CopyRing, "submit", "ring.submit")
    _wrap_sync(gntdev.CopyRing, "_encode", "ring.encode")
    _wrap_sync(gntdev, "read_statuses", "ring.read_statuses")


def wrap_broker(light: bool = False) -> None:
    global _PREFIX
    _PREFIX = "b."
    if light:
        _wrap_sync(socket.socket, "sendmsg", "sendmsg")
        return
    _wrap_common()
    from grant_broker.core import events
    from grant_broker.transport import fastpath
    from grant_broker.transport import fdchannel as channel_server

    _wrap_sync(channel_server.FdChannelServer, "_on_frame", "on_frame")
    _wrap_sync(fastpath.FastPath, "submit", "submit")
    _wrap_async(fastpath.FastPath, "_serve", "serve")
    _wrap_async(fastpath.FastPath, "_reply", "reply")
    _wrap_sync(fastpath, "_stream_frame", "stream_frame")
    _wrap_sync(events.EventFanout, "_on_readable", "fanout_readable")
    # Inside the map operation: the emulated device's reserve and hand-out.
    from grant_broker.backend.emulated import gntdev as emulated_gntdev
    from grant_broker.core.operations import gntdev as gntdev_operations

    _wrap_sync(emulated_gntdev.EmulatedGntdev, "map_grant_refs", "dev.map_grant_refs")
    _wrap_sync(emulated_gntdev.EmulatedGntdev, "map_memory", "dev.map_memory")
    _wrap_sync(emulated_gntdev.EmulatedGntdev, "unmap_grant_ref", "dev.unmap_grant_ref")
    _wrap_sync(gntdev_operations, "map_grants", "map_grants")
    # Inside SubmitCopyRing: the records read and checked, the policy's peer
    # check, the device's copy (its checks, claims and contiguous runs), the
    # statuses written.
    from grant_broker.core.operations import copyring

    _wrap_sync(copyring, "_segments", "ring.segments")
    _wrap_sync(copyring, "check_copy_peers", "ring.check_peers")
    _wrap_sync(copyring, "write_statuses", "ring.write_statuses")
    _wrap_sync(emulated_gntdev.EmulatedGntdev, "grant_copy", "dev.grant_copy")
    _wrap_sync(emulated_gntdev._CopyRun, "copy", "dev.copy_run")
    original_init = fastpath.FastPath.__init__

    def init(self: Any, session: Any, routes: Any, *args: Any, **kwargs: Any) -> None:
        traced = {}
        for name, route in routes.items():
            if not route.streaming:
                route = dataclasses.replace(route, operation=_traced_operation(route.operation))
            traced[name] = route
        original_init(self, session, traced, *args, **kwargs)

    fastpath.FastPath.__init__ = init  # type: ignore[method-assign]


def _traced_operation(operation: Callable[..., Any]) -> Callable[..., Any]:
    enter, leave = code("op>"), code("op<")

    async def traced(session: Any, request: Any) -> Any:
        CODES.append(enter)
        TIMES.append(CLOCK())
        try:
            return await operation(session, request)
        finally:
            CODES.append(leave)
            TIMES.append(CLOCK())

    return traced


def _enlarge_send_buffers(size: int) -> None:
    """An experiment, not the broker's code: SO_SNDBUF of every fd channel
    the broker accepts set to *size* (the kernel doubles it, up to
    ``net.core.wmem_max``)."""
    from grant_broker_protocol import fdchannel

    original_init = fdchannel.FdChannel.__init__

    def init(self: Any, sock: socket.socket) -> None:
        original_init(self, sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    fdchannel.FdChannel.__init__ = init  # type: ignore[method-assign]


def broker_child(stamps_path: str, argv: list[str]) -> int:
    """The broker, wrapped; its stamps go to *stamps_path* when it exits."""
    wrap_broker(light=bool(os.environ.get("HOPS_LIGHT")))
    if os.environ.get("HOPS_BROKER_SNDBUF"):
        _enlarge_send_buffers(int(os.environ["HOPS_BROKER_SNDBUF"]))

    def dump() -> None:
        with open(stamps_path, "w") as out:
            json.dump(stamps(), out)

    atexit.register(dump)
    from grant_broker.cli import main

    return main(argv)


# --------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class Trace:
    name: str
    windows: list[tuple[int, int]]  # (start, end) ns of each traced call, in this process


def timelines(trace: Trace, stamps: Sequence[tuple[str, int]]) -> tuple[list[str], list[list[float]], int]:
    """The most common sequence of stamps within the windows; per stamp the
    µs from the window's start of each call that followed that sequence; and
    how many calls did."""
    ordered = sorted(stamps, key=lambda item: item[1])
    times = [t for _, t in ordered]
    import bisect

    sequences: list[tuple[tuple[str, ...], list[float]]] = []
    for start, end in trace.windows:
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        inside = ordered[lo:hi]
        names = tuple(name for name, _ in inside) + ("end",)
        offsets = [(t - start) / 1e3 for _, t in inside] + [(end - start) / 1e3]
        sequences.append((names, offsets))
    counts = collections.Counter(names for names, _ in sequences)
    common, _ = counts.most_common(1)[0]
    rows = [offsets for names, offsets in sequences if names == common]
    return list(common), [list(column) for column in zip(*rows)], len(rows)


def report(trace: Trace, stamps: Sequence[tuple[str, int]], *, collapse: bool = False) -> dict[str, Any]:
    names, columns, n = timelines(trace, stamps)
    totals = [(end - start) / 1e3 for start, end in trace.windows]
    print(f"\n{trace.name}: {len(trace.windows)} calls, total median {statistics.median(totals):.1f} µs; "
          f"{n} calls followed the most common sequence of {len(names)} stamps")
    print(f"  {'stamp':<34} {'median µs':>10} {'step µs':>9}")
    previous = 0.0
    rows = []
    for name, column in zip(names, columns):
        at = statistics.median(column)
        step = at - previous
        rows.append({"stamp": name, "median_us": at, "step_us": step})
        print(f"  {name:<34} {at:>10.1f} {step:>9.1f}")
        previous = at
    return {"calls": len(trace.windows), "total_median_us": statistics.median(totals), "followed": n, "stamps": rows}


def fanout_report(name: str, deliveries: list[list[int]], starts: list[int], stamps: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """For one notification to many subscribers: when the broker sent the k-th
    PortFired and when the SDK handed the k-th event to its reader."""
    ordered = sorted(stamps, key=lambda item: item[1])
    sends_by_rep: list[list[int]] = []
    for index, start in enumerate(starts):
        end = max(deliveries[index])
        sends = [t for n, t in ordered if start <= t <= end and n == "b.sendmsg<"]
        sends_by_rep.append(sends)
    count = len(deliveries[0])

    def at(fraction: float, values: list[int], start: int) -> float:
        values = sorted(values)
        if not values:
            return float("nan")
        return (values[min(len(values) - 1, int(fraction * len(values)))] - start) / 1e3

    print(f"\n{name}: {len(starts)} notifications to {count} subscribers (ms from the notify)")
    print(f"  {'':<40} {'first':>8} {'10 %':>8} {'50 %':>8} {'90 %':>8} {'last':>8}")
    rows: dict[str, Any] = {}
    for label, series in (("broker sent PortFired (sendmsg returned)", sends_by_rep),
                          ("subscriber has it (SDK)", deliveries)):
        med = [statistics.median(at(f, s, st) for s, st in zip(series, starts)) / 1e3 for f in (0, 0.1, 0.5, 0.9, 1.0)]
        rows[label] = med
        print(f"  {label:<40} " + " ".join(f"{m:>8.2f}" for m in med))
    sent = statistics.median(len(s) for s in sends_by_rep)
    print(f"  sendmsg calls in the broker per notification: {sent:.0f}")
    # What each process did meanwhile: stamps counted per notification, and
    # the longest gaps between the broker's sends.
    counted: dict[str, list[int]] = collections.defaultdict(list)
    gaps: list[float] = []
    for index, start in enumerate(starts):
        end = max(deliveries[index])
        inside = [(n, t) for n, t in ordered if start <= t <= end]
        for stamp_name in {n for n, _ in inside}:
            counted[stamp_name].append(sum(1 for n, _ in inside if n == stamp_name))
        sends = sends_by_rep[index]
        gaps.extend((b - a) / 1e3 for a, b in zip(sends, sends[1:]))
    print("  stamps per notification (median): " + ", ".join(
        f"{n} {statistics.median(c):.0f}" for n, c in sorted(counted.items()) if n.endswith(("<", "!"))))
    gaps.sort()
    if gaps:
        print(f"  µs between consecutive PortFired sends: median {statistics.median(gaps):.1f}, "
              f"p99 {gaps[int(0.99 * (len(gaps) - 1))]:.1f}, max {gaps[-1]:.1f}")
    rows["stamps_per_notification"] = {n: statistics.median(c) for n, c in counted.items()}
    return rows


async def wake_floor_ms(count: int, reps: int = 30) -> float:
    """The least an asyncio client pays to hand one event to *count* subscriber
    tasks: one callback puts into *count* queues, each awaited by its own task;
    median ms until the last task has it (in this process, no I/O)."""
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(count)]
    got = [0] * count
    left = 0
    done = asyncio.Event()

    async def reader(i: int, queue: asyncio.Queue[int]) -> None:
        nonlocal left
        while True:
            await queue.get()
            got[i] = CLOCK()
            left -= 1
            if left == 0:
                done.set()

    tasks = [asyncio.ensure_future(reader(i, q)) for i, q in enumerate(queues)]
    await asyncio.sleep(0.05)
    times = []
    for _ in range(reps + 3):
        left = count
        done.clear()
        start = CLOCK()
        for queue in queues:
            queue.put_nowait(1)
        await done.wait()
        times.append((max(got) - start) / 1e6)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return statistics.median(times[3:])


# --------------------------------------------------------------------------- the traced calls


async def run(args: argparse.Namespace, socket_path: str) -> dict[str, Any]:
    import grant_broker_client

    async def connect(domid: int, name: str) -> Any:
        session = await grant_broker_client.connect(socket_path, domid=domid, client_name=name, fast_path=True)
        assert session.fast_path
        return session

    traces: dict[str, Any] = {}
    only = set(args.only.split(","))
    clock = CLOCK
    if "floor" in only:
        from bench.baselines import AsyncSeqpacketClient

        path = str(Path(socket_path).parent / "seq-async.sock")
        server = subprocess.Popen([sys.executable, "-m", "bench.baselines", "seqpacket-async", path],
                                  stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            client = AsyncSeqpacketClient(path)
            windows = []
            for i in range(args.calls + 50):
                start = clock()
                await client.round_trip()
                end = clock()
                if i >= 50:
                    windows.append((start, end))
            client.close()
            traces["floor"] = Trace("seqpacket_fd_async: request, fd, mmap, read (the server is not traced)", windows)
        finally:
            server.terminate()
            server.wait(10)
    if "map" in only:
        sharer, mapper = await connect(1, "hops-sharer"), await connect(2, "hops-mapper")
        async with await sharer.gntalloc.share(2, 1) as pages:
            pages.view[0] = 0x5A
            windows = []
            for i in range(args.calls + 50):
                start = clock()
                mapping = await mapper.gntdev.map([(1, pages.refs[0])], writable=False)
                assert mapping.view[0] == 0x5A
                end = clock()
                if i >= 50:
                    windows.append((start, end))
                await mapping.aclose()
            traces["map_fast"] = Trace("map_fast: one-grant map, fd, mmap, read", windows)
        await sharer.close()
        await mapper.close()
    if "event" in only:
        listener, notifier = await connect(10, "hops-listener"), await connect(11, "hops-notifier")
        offered = await listener.evtchn.bind_unbound_port(11)
        port = await notifier.evtchn.bind_interdomain(10, offered)
        windows = []
        async with listener.evtchn.subscribe(ports=[offered]) as events:
            for i in range(args.calls + 50):
                start = clock()
                sent = asyncio.ensure_future(notifier.evtchn.notify(port))
                event = await anext(events)
                end = clock()
                assert event.port == offered
                await sent
                if i >= 50:
                    windows.append((start, end))
        traces["event_fast"] = Trace("event_fast: notify -> PortFired on another session", windows)
        await listener.close()
        await notifier.close()
    if "batch" in only:
        sharer, mapper = await connect(3, "hops-batch-sharer"), await connect(4, "hops-batch-mapper")
        async with await sharer.gntalloc.share(4, 1024) as pages:
            refs = [(3, ref) for ref in pages.refs]
            maps, cycles = [], []
            for i in range(max(30, args.calls // 20) + 3):
                start = clock()
                mapping = await mapper.gntdev.map(refs, writable=False)
                mapped = clock()
                await mapping.aclose()
                end = clock()
                if i >= 3:
                    maps.append((start, mapped))
                    cycles.append((mapped, end))
            traces["batch_map"] = Trace("batched_map_fast, the map of 1024 refs", maps)
            traces["batch_unmap"] = Trace("batched_map_fast, the unmap (munmap, call) of 1024 refs", cycles)
        await sharer.close()
        await mapper.close()
    if "ring" in only:
        from grant_broker_client.gntdev import CopySegment, Foreign, Local

        sharer, copier = await connect(7, "hops-ring-sharer"), await connect(8, "hops-ring-copier")
        async with await sharer.gntalloc.share(8, 256) as pages, await copier.gntdev.copy_buffer(
            256 * 4096
        ) as buffer, await copier.gntdev.copy_ring(buffer, entries=256) as ring:
            pages.view[:] = os.urandom(256 * 4096)
            for name, count, calls in (("ring_4KiB", 1, args.calls), ("ring_1MiB", 256, max(30, args.calls // 10))):
                segments = [CopySegment(Foreign(7, pages.refs[i]), Local(buffer, i * 4096), 4096) for i in range(count)]
                windows = []
                for i in range(calls + 20):
                    start = clock()
                    statuses = await ring.submit(segments)
                    end = clock()
                    assert not any(statuses)
                    if i >= 20:
                        windows.append((start, end))
                traces[name] = Trace(f"{name}: {count} x 4 KiB through a copy ring, one doorbell", windows)
            assert bytes(buffer.view) == bytes(pages.view)
        await sharer.close()
        await copier.close()
    if "fanout" in only:
        listener, notifier = await connect(12, "hops-fan-listener"), await connect(13, "hops-fan-notifier")
        offered = await listener.evtchn.bind_unbound_port(13)
        port = await notifier.evtchn.bind_interdomain(12, offered)
        subscriptions = [await listener.evtchn.subscribe(ports=[offered], queue_size=4) for _ in range(args.subscribers)]
        received = [0] * len(subscriptions)
        remaining = 0
        all_in = asyncio.Event()

        async def reader(i: int, subscription: Any) -> None:
            nonlocal remaining
            async for _ in subscription:
                received[i] = clock()
                remaining -= 1
                if remaining == 0:
                    all_in.set()

        readers = [asyncio.ensure_future(reader(i, s)) for i, s in enumerate(subscriptions)]
        starts, deliveries = [], []
        for rep in range(12):
            remaining = len(subscriptions)
            all_in.clear()
            start = clock()
            await notifier.evtchn.notify(port)
            await asyncio.wait_for(all_in.wait(), 60)
            if rep >= 2:
                starts.append(start)
                deliveries.append(list(received))
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for subscription in subscriptions:
            await subscription.close()
        traces["fanout"] = (starts, deliveries)
        traces["wake_floor_ms"] = await wake_floor_ms(len(subscriptions))
        await listener.close()
        await notifier.close()
    return traces


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "broker-child":
        return broker_child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="traced calls per figure (default 1000)")
    parser.add_argument("--subscribers", type=int, default=1000, help="subscribers of the fan-out (default 1000)")
    parser.add_argument("--only", default="floor,map,event,batch,fanout,ring")
    parser.add_argument("--json", type=Path, default=None, help="also write the timelines as JSON here")
    parser.add_argument("--light", action="store_true",
                        help="stamp only sendmsg in both processes (the fan-out's sends, at the least cost)")
    parser.add_argument("--broker-sndbuf", type=int, default=None, metavar="BYTES",
                        help="experiment: SO_SNDBUF of the broker's fd channels (default: the kernel's)")
    args = parser.parse_args(argv)

    import uvloop

    from bench.run import DEFAULT_PLAN, broker_limits, raise_fd_limit

    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="gb-hops-"))
    socket_path = str(workdir / "broker.sock")
    stamps_path = workdir / "broker-stamps.json"
    plan = dataclasses.replace(DEFAULT_PLAN, subscribers=args.subscribers)
    limits = [a for name, value in broker_limits(plan).items() for a in ("--limit", f"{name}={value}")]
    log = open(workdir / "broker.log", "w")  # noqa: SIM115
    env = dict(os.environ)
    if args.broker_sndbuf:
        env["HOPS_BROKER_SNDBUF"] = str(args.broker_sndbuf)
    if args.light:
        env["HOPS_LIGHT"] = "1"
    broker = subprocess.Popen(
        [sys.executable, "-m", "bench.hops", "broker-child", str(stamps_path), "--", "--socket", socket_path,
         "--log-level", "warning", "serve", "--backend", "emulated", "--grace", "1", *limits],
        stdout=log, stderr=log, cwd=Path(__file__).resolve().parent.parent, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(socket_path) and os.path.exists(socket_path + ".fds")):
            if broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start: {(workdir / 'broker.log').read_text()[-2000:]}")
            time.sleep(0.02)
        wrap_sdk(light=args.light)
        print(f"load average {os.getloadavg()[0]:.2f}; one stamp costs {stamp_cost_ns():.0f} ns", flush=True)
        traces = uvloop.run(run(args, socket_path))
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        log.close()
    every = stamps() + [(name, t) for name, t in json.loads(stamps_path.read_text())]
    shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {}
    for name, trace in traces.items():
        if name == "wake_floor_ms":
            print(f"\nasyncio floor: one callback hands an event to {args.subscribers} tasks (queues), the last has it "
                  f"after {trace:.1f} ms (median)")
            results[name] = trace
        elif isinstance(trace, Trace):
            results[name] = report(trace, every)
        else:
            starts, deliveries = trace
            results[name] = fanout_report("event_fanout_fast", deliveries, starts, every)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
