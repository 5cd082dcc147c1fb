"""Soak: mixed traffic and client crashes for a while; the broker's memory and descriptors stay flat.

Steady clients (in this process) loop over every kind of call and renew their
sessions now and then; worker processes (worker.py) are started and SIGKILLed
at random moments, over and over.  After a warm-up the broker's VmRSS and
descriptor count are taken at a quiet moment (traffic paused, every dead
client's session released); at the end they are taken again the same way.
Descriptors must be back exactly; RSS may grow by at most 10 % + 8 MiB
(allocator noise), and no steady client may have seen an error.

``GRANT_BROKER_SOAK_SECONDS`` sets the length (default 30; e.g. 3600 for an
hour by hand).
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

import grant_broker_client
from grant_broker_client import Session
from grant_broker_client.gntdev import CopySegment, Foreign

from .conftest import Daemon, Worker, knob

SECONDS = knob("GRANT_BROKER_SOAK_SECONDS", 30.0)
SHARER = 1
STEADY = 6
SLOTS = 2
CLEAR_OFFSET = 100


class Steady:
    """A well-behaved client doing everything, renewing its session every so often."""

    def __init__(self, daemon: Daemon, n: int, sharer: Session, ref: int, rng: random.Random) -> None:
        self.daemon = daemon
        self.domid = 20 + n
        self.sharer = sharer
        self.ref = ref
        self.rng = rng
        self.errors: list[BaseException] = []
        self.operations = 0
        self.sessions = 0

    async def run(self, running: asyncio.Event, stop: asyncio.Event, idle: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                async with await grant_broker_client.connect(self.daemon.socket_path, domid=self.domid) as session:
                    self.sessions += 1
                    for _ in range(self.rng.randrange(20, 80)):
                        if not running.is_set():
                            break
                        await self.operation(session)
                        self.operations += 1
                if not running.is_set():
                    idle.set()
                    await running.wait()
                    idle.clear()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)
            idle.set()

    async def operation(self, session: Session) -> None:
        kind = self.rng.choice(["describe", "map", "copy", "share", "evtchn", "subscribe", "buffer"])
        if kind == "describe":
            await session.describe()
        elif kind == "map":
            async with await session.gntdev.map([(SHARER, self.ref)], writable=self.rng.random() < 0.5) as mapping:
                _ = bytes(mapping.view[0:8])
        elif kind == "copy":
            (result,) = await session.gntdev.grant_copy([CopySegment(Foreign(SHARER, self.ref, 512), None, 64)])
            result.raise_for_status()
        elif kind == "share":
            async with await session.gntalloc.share(SHARER, self.rng.randrange(1, 4)) as pages:
                pages.view[0:4] = b"soak"
        elif kind == "evtchn":
            port = await session.evtchn.bind_unbound_port(SHARER)
            await session.evtchn.unbind(port)
        elif kind == "subscribe":
            async with session.evtchn.subscribe():
                pass
        else:
            async with await session.gntdev.copy_buffer(8192) as buffer:
                (result,) = await session.gntdev.grant_copy([CopySegment(Foreign(SHARER, self.ref), None, 16)])
                result.raise_for_status()
                buffer.view[0:2] = b"ok"


@pytest.mark.timeout(SECONDS + 120)  # the long runs outlast the suite's 120 s per test
async def test_memory_and_descriptors_stay_flat_under_traffic_and_crashes(daemon: Daemon, workers: list[Worker], seed: int) -> None:
    rng = random.Random(seed)
    context = f"(GRANT_BROKER_SEED={seed})"
    async with await grant_broker_client.connect(daemon.socket_path, domid=SHARER, client_name="sharer") as sharer:
        steady_pages = {n: await sharer.gntalloc.share(20 + n, 1) for n in range(STEADY)}
        slots = []
        for i in range(SLOTS):
            domid = 40 + i
            pages = await sharer.gntalloc.share(domid, 1)
            slots.append((domid, pages, await sharer.evtchn.bind_unbound_port(domid), await sharer.evtchn.bind_unbound_port(domid)))
        # The emulated backend opens one read-only descriptor per shared page at
        # its first read-only mapping and keeps it as long as the page: make them
        # all now, so that the counts compare steady state with steady state.
        grantees = [(20 + n, pages) for n, pages in steady_pages.items()] + [(domid, pages) for domid, pages, *_ in slots]
        for domid, pages in grantees:
            async with await grant_broker_client.connect(daemon.socket_path, domid=domid) as warmup:
                await (await warmup.gntdev.map([(SHARER, pages.refs[0])], writable=False)).aclose()
        clients = [Steady(daemon, n, sharer, steady_pages[n].refs[0], random.Random(rng.random())) for n in range(STEADY)]
        running, stop = asyncio.Event(), asyncio.Event()
        running.set()
        idles = [asyncio.Event() for _ in clients]
        tasks = [asyncio.ensure_future(c.run(running, stop, idle)) for c, idle in zip(clients, idles)]
        crashes = 0

        async def crash_loop(slot: int) -> None:
            nonlocal crashes
            domid, pages, notify_port, ping_port = slots[slot]
            while running.is_set():
                pages.view[CLEAR_OFFSET] = 0xEE
                config = {
                    "socket": daemon.socket_path, "domid": domid, "name": f"soak worker {slot}", "sharer_domid": SHARER,
                    "ref": pages.refs[0], "notify_port": notify_port, "ping_port": ping_port, "clear_offset": CLEAR_OFFSET,
                    "activities": rng.sample(["map", "copy", "stream", "fds", "share", "dmabuf", "burst"], 3),
                    "seed": rng.randrange(2**32),
                }
                worker = await Worker.start(f"soak worker {slot}", json.dumps(config))
                workers.append(worker)
                await worker.expect("running")
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                worker.kill()
                _, stderr = await worker.rest()
                assert worker.process.returncode == -9, f"{worker.name} failed {context}:\n{stderr}"
                for _ in range(500):
                    if pages.view[CLEAR_OFFSET] == 0:
                        break
                    await asyncio.sleep(0.01)
                assert pages.view[CLEAR_OFFSET] == 0, f"a killed worker's unmap notification never came {context}"
                crashes += 1

        async def quiet() -> tuple[int, int]:
            """Pause everything, let the broker settle; return (RSS KiB, fds)."""
            running.clear()
            await asyncio.gather(*crashers)
            await asyncio.gather(*(idle.wait() for idle in idles))
            await daemon.settle(lambda s: len(s.sessions) == 1, f"only the sharer's session {context}")
            await asyncio.sleep(0.3)
            return daemon.rss_kib(), daemon.fd_count()

        warmup = max(5.0, SECONDS / 4)
        started = time.monotonic()
        crashers = [asyncio.ensure_future(crash_loop(i)) for i in range(SLOTS)]
        try:
            await asyncio.sleep(warmup)
            rss_before, fds_before = await quiet()
            ops_before, crashes_before = sum(c.operations for c in clients), crashes
            running.set()
            crashers = [asyncio.ensure_future(crash_loop(i)) for i in range(SLOTS)]
            samples = [rss_before]
            while time.monotonic() - started < SECONDS:
                await asyncio.sleep(min(5.0, SECONDS / 6))
                samples.append(daemon.rss_kib())
                assert not any(c.errors for c in clients), [c.errors for c in clients]
            rss_after, fds_after = await quiet()
        finally:
            running.set()
            stop.set()
            running.clear()
            for crasher in crashers:
                crasher.cancel()
            await asyncio.gather(*crashers, return_exceptions=True)
            running.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [e for c in clients for e in c.errors]
        assert not errors, f"steady clients saw errors {context}: {errors!r}"
        assert fds_after == fds_before, f"descriptors {fds_before} -> {fds_after} {context}: {sorted(daemon.fd_targets().values())}"
        assert rss_after <= rss_before * 1.10 + 8 * 1024, f"RSS {rss_before} -> {rss_after} KiB {context}; samples {samples}"
        operations = sum(c.operations for c in clients)
        sessions = sum(c.sessions for c in clients)
        assert crashes > crashes_before and operations > ops_before
        print(f"soak {SECONDS:.0f}s: {operations} operations over {sessions} steady sessions, {crashes} clients killed; "
              f"broker RSS {rss_before // 1024} -> {rss_after // 1024} MiB (peak {max(samples) // 1024}), fds {fds_before} -> {fds_after}")
        for pages in [*steady_pages.values(), *(slot[1] for slot in slots)]:
            await pages.aclose()
    assert daemon.alive()
