"""Floods for the ``bystander_under_flood`` figure (issue 14: one client must not starve the others).

``python -m bench.flood KIND SOCKET`` runs one flooding client in a process of
its own: it sets up, prints ``ready``, floods from the line ``go`` on its stdin
until the line ``stop`` (or the end of stdin), then prints one JSON line of
what it did.  :func:`bystander_under_flood` (used by ``bench.run``) measures a
bystander's median latency — a DescribeSession of its own session over gRPC —
unloaded, then under each flood in turn, in the same run.

Floods (:data:`FLOODS`):

* ``events`` — one session with 64 event subscriptions it never reads,
  notifying its own ports in a loop (issue 14 §4b);
* ``unauthenticated`` — calls of 15 MiB without a session token, 24 at a time
  (issue 14 §4).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

import grant_broker_client
from grant_broker_protocol.endpoints import SESSION_METADATA_KEY
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc, evtchn_pb2, evtchn_pb2_grpc

SUBSCRIPTIONS = 64
BODY_BYTES = 15 * 1024 * 1024
UNAUTHENTICATED_IN_FLIGHT = 24


async def _until_stopped(flood: Callable[[asyncio.Event], Awaitable[dict[str, Any]]]) -> None:
    """``ready``, wait for ``go``, run *flood* until ``stop``, print its summary."""
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    assert (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go"
    stop = asyncio.Event()

    async def watch() -> None:
        await loop.run_in_executor(None, sys.stdin.readline)
        stop.set()

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    summary = await flood(stop)
    summary["seconds"] = time.monotonic() - started
    await watcher
    print(json.dumps(summary), flush=True)


async def events_flood(socket_path: str) -> None:
    session = await grant_broker_client.connect(socket_path, domid=40, client_name="flood: events", fast_path=False)
    metadata = ((SESSION_METADATA_KEY, session._token),)
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    events = evtchn_pb2_grpc.EvtchnStub(channel)
    offered = (await events.BindUnboundPort(evtchn_pb2.BindUnboundPortRequest(remote_domain=40), metadata=metadata)).port
    request = evtchn_pb2.BindInterdomainRequest(remote_domain=40, remote_port=offered)
    bound = (await events.BindInterdomain(request, metadata=metadata)).port
    streams = [events.Subscribe(evtchn_pb2.SubscribeRequest(), metadata=metadata) for _ in range(SUBSCRIPTIONS)]
    for stream in streams:
        await stream.read()  # subscribed; never read again

    async def flood(stop: asyncio.Event) -> dict[str, Any]:
        notifies = 0
        while not stop.is_set():
            port = bound if notifies % 2 else offered
            await events.Notify(evtchn_pb2.NotifyRequest(port=port), metadata=metadata, timeout=60)
            notifies += 1
        return {"notifies": notifies}

    try:
        await _until_stopped(flood)
    finally:
        for stream in streams:
            stream.cancel()
        await channel.close()
        await session.close()


async def unauthenticated_flood(socket_path: str) -> None:
    body = _unknown_field(BODY_BYTES)
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_unary("/grant_broker.v1.Gntdev/Map")

    async def flood(stop: asyncio.Event) -> dict[str, Any]:
        codes: dict[str, int] = {}

        async def sender() -> None:
            while not stop.is_set():
                try:
                    await call(body, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(sender() for _ in range(UNAUTHENTICATED_IN_FLIGHT)))
        return {"calls": codes}

    try:
        await _until_stopped(flood)
    finally:
        await channel.close()


FLOODS: dict[str, Callable[[str], Awaitable[None]]] = {"events": events_flood, "unauthenticated": unauthenticated_flood}


def _unknown_field(size: int) -> bytes:
    """*size* bytes that every request type decodes (one unknown field, number 1000)."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    head = varint(1000 << 3 | 2)
    body = size - len(head) - len(varint(size))
    return head + varint(body) + b"\0" * body


# --------------------------------------------------------------------------- the measurement


async def bystander_under_flood(socket_path: str, seconds: float, samples: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """The bystander's median latency (µs) unloaded and under each flood of
    :data:`FLOODS` for *seconds*; ``ratio`` is loaded / unloaded median."""
    bystander = await grant_broker_client.connect(socket_path, domid=41, client_name="bystander", fast_path=False)
    metadata = ((SESSION_METADATA_KEY, bystander._token),)
    channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
    describe = broker_pb2_grpc.BrokerStub(channel).DescribeSession
    clock = time.perf_counter

    async def call() -> float:
        start = clock()
        await describe(broker_pb2.DescribeSessionRequest(), metadata=metadata, timeout=60)
        return clock() - start

    results: dict[str, Any] = {}
    try:
        for _ in range(20):
            await call()  # warm-up
        unloaded = [await call() for _ in range(samples)]
        unloaded_us = statistics.median(unloaded) * 1e6
        results["unloaded_median_us"] = unloaded_us
        for kind in FLOODS:
            progress(f"bystander under flood: {kind}, {seconds:g} s")
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.flood", kind, socket_path,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert flooder.stdin is not None and flooder.stdout is not None
            try:
                line = await asyncio.wait_for(flooder.stdout.readline(), 60)
                if line.strip() != b"ready":
                    raise RuntimeError(f"the {kind} flooder did not start: {line!r}")
                flooder.stdin.write(b"go\n")
                await flooder.stdin.drain()
                loaded: list[float] = []
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    loaded.append(await call())
                flooder.stdin.write(b"stop\n")
                await flooder.stdin.drain()
                summary = json.loads(await asyncio.wait_for(flooder.stdout.readline(), 120))
                await asyncio.wait_for(flooder.wait(), 60)
            finally:
                if flooder.returncode is None:
                    flooder.kill()
                    await flooder.wait()
            loaded.sort()
            median_us = statistics.median(loaded) * 1e6
            results[kind] = {
                "median_us": median_us,
                "p99_us": loaded[min(len(loaded) - 1, int(len(loaded) * 0.99))] * 1e6,
                "calls": len(loaded),
                "ratio": median_us / unloaded_us,
                "flood": summary,
            }
    finally:
        await channel.close()
        await bystander.close()
    return results


def main() -> None:
    import uvloop

    kind, socket_path = sys.argv[1], sys.argv[2]
    uvloop.run(FLOODS[kind](socket_path))


if __name__ == "__main__":
    main()
