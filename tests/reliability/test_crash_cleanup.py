"""Clients SIGKILLed at random points of their work: the broker gives everything back.

A broker daemon process; in this process a *sharer* (domain 1) that gives
each worker slot a page and two ports, and a *bystander* (domain 3) that keeps
working through all of it.  Each round starts worker processes (one domain
per slot, see worker.py) that map the sharer's page with an unmap
notification armed and then do several things at once — map/unmap, grant
copies, event streams, descriptors in flight on the fd channel, pages of their
own shared, dma-buf exports, bursts of calls — and kills each of them with
SIGKILL at a random moment.  After every round:

* the broker lists only the survivors' sessions, with their usage unchanged
  (Broker.Status), and holds exactly as many descriptors as before (from the
  second round on: the first creates the workers' domains, which stay);
* each killed worker's unmap notification was delivered: its byte in the
  sharer's page is cleared and its port fired exactly once;
* every page a killed worker had granted is no longer granted (mapping it fails);
* the bystander never saw an error, and its data stayed right.

``GRANT_BROKER_CRASH_ROUNDS`` sets the rounds (default 6, 4 workers each);
``GRANT_BROKER_SEED`` replays a run.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest

import grant_broker_client
from grant_broker_client import BrokerClientError, Session
from grant_broker_client.evtchn import PortFired
from grant_broker_client.gntalloc import SharedPages
from grant_broker_client.gntdev import CopySegment, Foreign

_GRANTED_LINE = re.compile(r"granted (\d+) (\d+)")

from .conftest import Daemon, Worker, knob

ROUNDS = int(knob("GRANT_BROKER_CRASH_ROUNDS", 6))
WORKERS = 4
SHARER, BYSTANDER = 1, 3
WORKER_DOMID = 10  # slot i acts as domain WORKER_DOMID + i
CLEAR_OFFSET = 100
ARMED = 0xEE
ACTIVITIES = ["map", "copy", "stream", "fds", "share", "dmabuf", "burst"]
MAX_KILL_DELAY = 0.5


@dataclass
class Slot:
    domid: int
    pages: SharedPages
    notify_port: int
    ping_port: int


class Bystander:
    """Domain 3, working throughout: maps the sharer's page, copies, pings."""

    def __init__(self, session: Session, sharer: Session, pages: SharedPages) -> None:
        self.session = session
        self.sharer = sharer
        self.pages = pages
        self.errors: list[BaseException] = []
        self.iterations = 0

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(7)
        try:
            async with await self.session.gntdev.map([(SHARER, self.pages.refs[0])]) as mapping:
                while not stop.is_set():
                    data = rng.randbytes(32)
                    mapping.view[0:32] = data
                    assert bytes(self.pages.view[0:32]) == data, "the bystander's write did not reach the sharer"
                    (result,) = await self.session.gntdev.grant_copy([CopySegment(Foreign(SHARER, self.pages.refs[0]), None, 32)])
                    result.raise_for_status()
                    assert result.data == data, "grant copy read something else"
                    info = await self.session.describe()
                    assert info.usage.mappings == 1
                    self.iterations += 1
                    await asyncio.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


async def _collect(subscription, seen: Counter[int]) -> None:  # type: ignore[no-untyped-def]
    async for event in subscription:
        if isinstance(event, PortFired):
            seen[event.port] += 1


async def _still_granted(sharer: Session, domid: int, ref: int) -> bool:
    try:
        mapping = await sharer.gntdev.map([(domid, ref)], writable=False)
    except BrokerClientError as exc:
        assert (exc.code, exc.errno) == (grpc.StatusCode.INVALID_ARGUMENT, errno.EINVAL), str(exc)
        return False
    await mapping.aclose()
    return True


@pytest.mark.timeout(60 + 15 * ROUNDS)  # the long runs outlast the suite's 120 s per test
async def test_killed_clients_leave_nothing_behind(daemon: Daemon, workers: list[Worker], seed: int) -> None:
    rng = random.Random(seed)
    context = f"(GRANT_BROKER_SEED={seed})"
    async with await grant_broker_client.connect(daemon.socket_path, domid=SHARER, client_name="sharer") as sharer, \
            await grant_broker_client.connect(daemon.socket_path, domid=BYSTANDER, client_name="bystander") as bystander_session:
        slots = []
        for i in range(WORKERS):
            domid = WORKER_DOMID + i
            pages = await sharer.gntalloc.share(domid, 1)
            pages.view[CLEAR_OFFSET] = ARMED
            slots.append(Slot(domid, pages, await sharer.evtchn.bind_unbound_port(domid), await sharer.evtchn.bind_unbound_port(domid)))
        bystander_pages = await sharer.gntalloc.share(BYSTANDER, 1)
        # Opened on first use and kept as long as what they belong to: the
        # sharer's gntdev instance, and the read-only descriptor of each page
        # (made for its first read-only span).  Made now, before any count.
        assert not await _still_granted(sharer, BYSTANDER, 4000)
        for slot in slots:
            async with await grant_broker_client.connect(daemon.socket_path, domid=slot.domid) as warmup:
                await (await warmup.gntdev.map([(SHARER, slot.pages.refs[0])], writable=False)).aclose()
        bystander = Bystander(bystander_session, sharer, bystander_pages)
        stop = asyncio.Event()
        bystanding = asyncio.ensure_future(bystander.run(stop))
        seen: Counter[int] = Counter()
        notifications = await sharer.evtchn.subscribe([slot.notify_port for slot in slots])
        collecting = asyncio.ensure_future(_collect(notifications, seen))
        survivors = {sharer.session_id, bystander_session.session_id}
        baseline_usage = None
        baseline_fds = None
        killed = 0
        try:
            for round_ in range(ROUNDS):
                # Deal every activity out to the round's workers.
                dealt: list[list[str]] = [[] for _ in range(WORKERS)]
                for k, name in enumerate(rng.sample(ACTIVITIES, len(ACTIVITIES))):
                    dealt[k % WORKERS].append(name)
                started = []
                for i, slot in enumerate(slots):
                    config = {
                        "socket": daemon.socket_path, "domid": slot.domid, "name": f"worker {round_}.{i}",
                        "sharer_domid": SHARER, "ref": slot.pages.refs[0], "notify_port": slot.notify_port,
                        "ping_port": slot.ping_port, "clear_offset": CLEAR_OFFSET, "activities": dealt[i],
                        "seed": rng.randrange(2**32),
                    }
                    worker = await Worker.start(f"worker {round_}.{i} {dealt[i]}", json.dumps(config))
                    workers.append(worker)
                    started.append(worker)
                for worker in started:
                    await worker.expect("running")
                if baseline_usage is None:
                    status = await daemon.status()
                    baseline_usage = {s.session_id: s.usage for s in status.sessions if s.session_id in survivors}

                async def kill_later(worker: Worker, delay: float) -> None:
                    await asyncio.sleep(delay)
                    worker.kill()

                await asyncio.gather(*(kill_later(w, rng.uniform(0, MAX_KILL_DELAY)) for w in started))
                granted: list[tuple[int, int]] = []
                for worker in started:
                    _, stderr = await worker.rest()
                    assert worker.process.returncode == -9, f"{worker.name} failed before it was killed {context}:\n{stderr}"
                    # A worker killed while printing may leave its last line cut short.
                    granted += [
                        (int(match[1]), int(match[2]))
                        for match in map(_GRANTED_LINE.fullmatch, worker.lines)
                        if match is not None
                    ]
                killed += len(started)

                # Sessions and usage back to the survivors'.
                status = await daemon.settle(
                    lambda s: {x.session_id for x in s.sessions} == survivors, f"round {round_}: only the survivors' sessions {context}"
                )
                assert {s.session_id: s.usage for s in status.sessions} == baseline_usage, context
                # Every notification delivered, once.
                for slot in slots:
                    for _ in range(500):
                        if seen[slot.notify_port] and slot.pages.view[CLEAR_OFFSET] == 0:
                            break
                        await asyncio.sleep(0.01)
                    assert slot.pages.view[CLEAR_OFFSET] == 0, f"round {round_}: domain {slot.domid}'s byte was not cleared {context}"
                    assert seen[slot.notify_port] == 1, f"round {round_}: port {slot.notify_port} fired {seen[slot.notify_port]} times {context}"
                    slot.pages.view[CLEAR_OFFSET] = ARMED
                seen.clear()
                # Every grant of the dead workers ended.
                for domid, ref in rng.sample(granted, min(len(granted), 40)):
                    assert not await _still_granted(sharer, domid, ref), f"round {round_}: ref {ref} of domain {domid} outlived its session {context}"
                # Descriptors: the first round creates the workers' domains (which stay).
                if baseline_fds is None:
                    await asyncio.sleep(0.2)
                    baseline_fds = daemon.fd_targets()
                else:
                    await daemon.settle_fds(baseline_fds)
                assert not bystander.errors, f"the bystander noticed: {bystander.errors!r} {context}"
        finally:
            stop.set()
            await bystanding
            await notifications.close()
            await collecting
        assert not bystander.errors, f"the bystander noticed: {bystander.errors!r} {context}"
        assert bystander.iterations > ROUNDS, bystander.iterations
        assert killed == ROUNDS * WORKERS
        await bystander_pages.aclose()
        for slot in slots:
            await slot.pages.aclose()
    assert daemon.alive()
    print(f"crash cleanup: {killed} workers killed in {ROUNDS} rounds; bystander ran {bystander.iterations} iterations, no error")
