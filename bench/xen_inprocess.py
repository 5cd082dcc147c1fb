"""The broker against the in-process baseline, on a real Xen: ``python -m bench.xen_inprocess``.

Run in dom0 (``make bench-xen`` boots a real Xen 4.17 under QEMU and runs it
there; ``tests/xen/ci-suite`` runs it once after the suite).  What a user
would pick instead of the broker is opening ``/dev/xen/*`` in their own
process: ``ioctl`` + ``mmap``, no hop.  Each operation is measured both ways
in the same run, in interleaved rounds (broker over the fast path, broker
over gRPC, in-process; round after round), and reported as medians and the
ratio broker / in-process:

* ``map`` — map one grant, mmap it, read its first byte, unmap (the broker:
  ``session.gntdev.map`` + close; in-process: the Xen backend's
  ``map_grant_refs`` + ``map_memory`` + ``mmap`` + ``munmap`` + ``unmap_grant_ref``);
* ``notify_event`` — notify a port, receive the event on its peer port
  (the broker: ``notify`` + a subscription; in-process: the ``IOCTL_EVTCHN_NOTIFY``
  + ``poll`` + read + unmask);
* ``grant_copy_4KiB`` — copy one granted page into local memory (the broker:
  a ``GrantCopy`` call into a registered copy buffer; in-process:
  ``IOCTL_GNTDEV_GRANT_COPY``);
* ``copy_ring_4KiB`` — the same copy through the broker's copy ring (fast path
  only), against the same in-process figure.

The grants are dom0's own (gntalloc to domain 0): the same hypercalls as
between two domains.  Under TCG the absolute times mean little (everything
is 15-25x slower than native, the kernel's share less so); the ratios are
what the broker costs over the in-process way on a real hypervisor.  Figures
are printed (and written as JSON with ``--json``), never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import grant_broker_client
from grant_broker.backend.contract import PAGE_SIZE, CopyForeign, CopyLocal, GrantCopySegment, GrantRef
from grant_broker.backend.xen import XenBackend
from grant_broker_client.evtchn import PortFired
from grant_broker_client.gntdev import CopySegment, Foreign, Local
from grant_broker_protocol.memory import map_spans

BROKER_START_TIMEOUT = 240.0
Sample = Callable[[], Awaitable[None]]


@contextmanager
def broker_process(socket_dir: str) -> Iterator[str]:
    """``grant-broker serve --backend xen`` for the run; yields its socket path."""
    socket_path = os.path.join(socket_dir, "broker.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "xen", "--grace", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + BROKER_START_TIMEOUT
        while not (os.path.exists(socket_path) and os.path.exists(socket_path + ".fds")):
            if process.poll() is not None:
                raise SystemExit(f"the broker exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the broker did not start within {BROKER_START_TIMEOUT} s")
            time.sleep(0.05)
        yield socket_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


class InProcess:
    """The same operations with the devices opened in this process (the baseline)."""

    def __init__(self, stack: ExitStack) -> None:
        backend = stack.enter_context(XenBackend.open())
        self.domid = backend.domid
        self.gntalloc = stack.enter_context(backend.open_gntalloc())
        self.allocation = self.gntalloc.alloc_gref(self.domid, 1)
        self.ref = self.allocation.refs[0]
        self.gntdev = stack.enter_context(backend.open_gntdev())
        self.sender = stack.enter_context(backend.open_evtchn())
        self.receiver = stack.enter_context(backend.open_evtchn())
        self.port = self.receiver.bind_unbound_port(self.domid)
        self.peer_port = self.sender.bind_interdomain(self.domid, self.port)
        self._drain(0.2)  # a fresh interdomain binding may be pending once
        self.buffer = memoryview(bytearray(PAGE_SIZE))

    def _drain(self, timeout: float) -> None:
        while select.select([self.receiver.fileno()], [], [], timeout)[0]:
            for port in self.receiver.read_pending():
                self.receiver.unmask(port)
            timeout = 0

    async def map(self) -> None:
        index = self.gntdev.map_grant_refs([GrantRef(self.domid, self.ref)])
        try:
            spans = self.gntdev.map_memory(index, 1, writable=True)
            try:
                with map_spans(spans, writable=True) as memory:
                    memory.view[0]
            finally:
                for span in spans:
                    span.close()
        finally:
            self.gntdev.unmap_grant_ref(index, 1)

    async def notify_event(self) -> None:
        self.sender.notify(self.peer_port)
        fd = self.receiver.fileno()
        while True:
            select.select([fd], [], [], 10.0)
            ports = self.receiver.read_pending()
            for port in ports:
                self.receiver.unmask(port)
            if self.port in ports:
                return

    async def grant_copy(self) -> None:
        (status,) = self.gntdev.grant_copy(
            [GrantCopySegment(CopyForeign(self.ref, 0, self.domid), CopyLocal(self.buffer, 0), PAGE_SIZE)])
        assert status == 0, status


class ThroughBroker:
    """The operations through one broker session (fast path or gRPC)."""

    def __init__(self, session: grant_broker_client.Session, domid: int, ref: int) -> None:
        self.session, self.domid, self.ref = session, domid, ref
        self.events: Any = None
        self.buffer: Any = None
        self.ring: Any = None

    async def start(self) -> None:
        gntdev, evtchn = self.session.gntdev, self.session.evtchn
        self.port = await evtchn.bind_unbound_port(self.domid)
        self.peer_port = await evtchn.bind_interdomain(self.domid, self.port)
        self.events = await evtchn.subscribe(ports=[self.port])
        self.buffer = await gntdev.copy_buffer(PAGE_SIZE)
        if self.session.fast_path:
            self.ring = await gntdev.copy_ring(self.buffer, entries=8)

    async def stop(self) -> None:
        if self.ring is not None:
            await self.ring.aclose()
        await self.buffer.aclose()
        await self.events.close()

    async def map(self) -> None:
        async with await self.session.gntdev.map([(self.domid, self.ref)]) as mapping:
            mapping.view[0]

    async def notify_event(self) -> None:
        await self.session.evtchn.notify(self.peer_port)
        while await anext(self.events) != PortFired(self.port):
            pass

    async def grant_copy(self) -> None:
        (result,) = await self.session.gntdev.grant_copy(
            [CopySegment(Foreign(self.domid, self.ref), Local(self.buffer, 0), PAGE_SIZE)])
        assert result.ok, result.status_name

    async def copy_ring(self) -> None:
        statuses = await self.ring.submit([CopySegment(Foreign(self.domid, self.ref), Local(self.buffer, 0), PAGE_SIZE)])
        assert statuses == [0], statuses


async def interleaved(samples: dict[str, Sample], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per call of each sample, taken round-robin; round 0 is a warm-up."""
    taken: dict[str, list[float]] = {name: [] for name in samples}
    for round_number in range(rounds + 1):
        for name, sample in samples.items():
            for _ in range(per_round):
                start = time.perf_counter()
                await sample()
                elapsed = time.perf_counter() - start
                if round_number:
                    taken[name].append(elapsed)
    return taken


async def measure(socket_path: str, rounds: int, per_round: int) -> dict[str, Any]:
    with ExitStack() as stack:
        local = InProcess(stack)
        async with await grant_broker_client.connect(socket_path, client_name="bench fast path") as fast, \
                await grant_broker_client.connect(socket_path, client_name="bench grpc", fast_path=False) as slow:
            brokers = {"fast": ThroughBroker(fast, local.domid, local.ref), "grpc": ThroughBroker(slow, local.domid, local.ref)}
            for broker in brokers.values():
                await broker.start()
            try:
                operations: dict[str, dict[str, Sample]] = {
                    "map": {"in_process": local.map, "fast": brokers["fast"].map, "grpc": brokers["grpc"].map},
                    "notify_event": {"in_process": local.notify_event, "fast": brokers["fast"].notify_event,
                                     "grpc": brokers["grpc"].notify_event},
                    "grant_copy_4KiB": {"in_process": local.grant_copy, "fast": brokers["fast"].grant_copy,
                                        "grpc": brokers["grpc"].grant_copy},
                    "copy_ring_4KiB": {"in_process": local.grant_copy, "fast": brokers["fast"].copy_ring},
                }
                figures: dict[str, Any] = {}
                for operation, samples in operations.items():
                    print(f"[bench-xen] {operation} ...", file=sys.stderr, flush=True)
                    taken = await interleaved(samples, rounds, per_round)
                    medians = {name: statistics.median(values) for name, values in taken.items()}
                    figures[operation] = {
                        "median_us": {name: round(value * 1e6, 1) for name, value in medians.items()},
                        "ratio_to_in_process": {name: round(value / medians["in_process"], 2)
                                                for name, value in medians.items() if name != "in_process"},
                        "samples": {name: len(values) for name, values in taken.items()},
                    }
                return figures
            finally:
                for broker in brokers.values():
                    await broker.stop()


def table(figures: dict[str, Any]) -> str:
    lines = [f"{'operation':<17} {'in-process':>12} {'fast path':>12} {'gRPC':>12} {'fast/in-proc':>13} {'gRPC/in-proc':>13}"]
    for operation, figure in figures.items():
        median, ratio = figure["median_us"], figure["ratio_to_in_process"]

        def cell(values: dict[str, float], name: str, unit: str) -> str:
            return f"{values[name]:.1f}{unit}" if name in values else "-"

        lines.append(f"{operation:<17} {cell(median, 'in_process', ' us'):>12} {cell(median, 'fast', ' us'):>12} "
                     f"{cell(median, 'grpc', ' us'):>12} {cell(ratio, 'fast', 'x'):>13} {cell(ratio, 'grpc', 'x'):>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (the CI's single run)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if not os.path.exists("/dev/xen/gntdev"):
        print("bench-xen: no /dev/xen/gntdev: run in dom0 of a real Xen (make bench-xen)", file=sys.stderr)
        return 2
    rounds, per_round = (5, 10) if args.quick else (15, 20)
    with tempfile.TemporaryDirectory(prefix="gb-bench-xen-") as directory, broker_process(directory) as socket_path:
        figures = asyncio.run(measure(socket_path, rounds, per_round))
    result = {"kind": "xen-in-process", "rounds": rounds, "per_round": per_round, "figures": figures}
    print("real Xen (dom0): the broker against the same operations in-process (medians; ratio = broker / in-process)")
    print(table(figures))
    if args.json:
        with open(args.json, "w") as sink:
            json.dump(result, sink, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
