"""Running one broker until a signal ends it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Callable

from grant_broker.daemon.server import BrokerServer, ServerConfig

log = logging.getLogger(__name__)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return (soft, hard).

    Each session holds a few descriptors in the broker (its fd channel, its
    device instances, pending and exported descriptors): about 4.6 per
    session under mixed load (tests/reliability/test_load.py), so the usual
    soft limit of 1024 would end at ~200 sessions with EMFILE.  The broker
    never uses select(), so a high limit costs nothing (Go does the same at
    start).  The hard limit stays whatever the service manager set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


async def serve(config: ServerConfig, ready: Callable[[BrokerServer], None] | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT: the first drains gracefully, a second exits at once."""
    soft, _ = raise_nofile_limit()
    log.info("descriptor limit: %d", soft)
    server = BrokerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("%s: shutting down (grace %.1fs); send it again to exit at once", signal.Signals(signum).name, config.grace_seconds)
            stopping = loop.create_task(server.stop())
        else:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            stopping.cancel()
            loop.create_task(server.stop(grace=0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if ready is not None:
            ready(server)
        await server.wait_closed()
        if stopping is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop(grace=0)
