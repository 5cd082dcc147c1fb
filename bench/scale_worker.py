"""A client process of the scale figure: many sessions, each holding mappings.

``python -m bench.scale_worker '{"socket": ..., "sessions": N, ...}'`` opens
N sessions (each its own fd channel and its own gRPC connection, as N client
processes would have), maps ``mappings`` grants in each (one grant per
mapping, mmapped here), says so on stdout as one JSON line, then obeys
commands read from stdin, one JSON object a line:

* ``{"cmd": "burst", "calls": K}``: K calls at once, spread over the sessions
  (MapMemory of a held mapping: one RPC plus a descriptor on the fd
  channel); answers how many failed and when each call started and ended
  (``time.monotonic_ns``, comparable across processes) so the parent can
  tell how many were in flight together;
* ``{"cmd": "close"}``: closes every session and exits.

Progress and errors go to stderr; stdout carries only the JSON answers.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import grpc
import uvloop

import grant_broker_client

_insecure_channel = grpc.aio.insecure_channel


def _own_connection(target: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
    # grpc shares one connection among the channels of a process that have
    # the same target and arguments (its global subchannel pool).  Each
    # session here stands for a client process of its own, so each gets its
    # own connection, as it would in production.
    return _insecure_channel(target, [*(options or ()), ("grpc.use_local_subchannel_pool", 1)], *args, **kwargs)


grpc.aio.insecure_channel = _own_connection


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _open_session(config: dict[str, Any], number: int) -> tuple[Any, list[Any]]:
    session = await grant_broker_client.connect(
        config["socket"], domid=config["domid"], client_name=f"bench-scale-{config['worker']}-{number}",
        **config.get("connect_options", {}),
    )
    mappings = []
    try:
        refs = config["refs"]
        for i in range(config["mappings"]):
            mappings.append(await session.gntdev.map([(config["granter"], refs[i % len(refs)])], writable=False))
    except BaseException:
        await _close(session, mappings)
        raise
    return session, mappings


async def _close(session: Any, mappings: list[Any]) -> None:
    # Close the session first: the broker then releases every mapping at once,
    # and the mappings' aclose only unmaps here (no call per mapping).
    await session.close()
    for mapping in mappings:
        await mapping.aclose()


async def _burst(held: list[tuple[Any, list[Any]]], calls: int) -> dict[str, Any]:
    intervals: list[tuple[int, int]] = []
    errors: list[str] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        session, mappings = held[i % len(held)]
        mapping = mappings[(i // len(held)) % len(mappings)]
        start = time.monotonic_ns()
        try:
            spans = await session.gntdev.map_memory(mapping.index, mapping.count, writable=False)
            for span in spans:
                span.close()
        except Exception as exc:  # noqa: BLE001 - counted and reported, that is the figure
            failed += 1
            if len(errors) < 5:
                errors.append(f"{type(exc).__name__}: {exc}")
        intervals.append((start, time.monotonic_ns()))

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    return {
        "event": "burst",
        "calls": calls,
        "failed": failed,
        "errors": errors,
        "seconds": time.perf_counter() - began,
        "intervals": intervals,
    }


async def main(config: dict[str, Any]) -> int:
    raise_fd_limit()
    count = config["sessions"]
    began = time.perf_counter()
    gate = asyncio.Semaphore(config.get("connect_concurrency", 16))
    failures: list[str] = []

    async def opened(number: int) -> tuple[Any, list[Any]] | None:
        async with gate:
            try:
                return await _open_session(config, number)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                failures.append(f"{type(exc).__name__}: {exc}")
                return None

    results = await asyncio.gather(*(opened(n) for n in range(count)))
    held = [r for r in results if r is not None]
    _say({
        "event": "ready",
        "sessions": len(held),
        "mappings": sum(len(m) for _, m in held),
        "failed": len(failures),
        "errors": failures[:5],
        "seconds": time.perf_counter() - began,
    })
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "burst":
                if not held:
                    _say({"event": "burst", "calls": 0, "failed": command["calls"], "errors": ["no session"], "seconds": 0, "intervals": []})
                    continue
                _say(await _burst(held, command["calls"]))
            elif command["cmd"] == "close":
                break
    finally:
        await asyncio.gather(*(_close(session, mappings) for session, mappings in held))
    _say({"event": "closed"})
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main(json.loads(sys.argv[1]))))
