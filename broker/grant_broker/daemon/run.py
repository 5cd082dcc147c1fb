"""Running one broker until a signal ends it: SIGTERM/SIGINT drain and stop, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from grant_broker.daemon.notify import ServiceNotifier
from grant_broker.daemon.server import BrokerServer, ServerConfig

if TYPE_CHECKING:
    from grant_broker.daemon.config import Configuration

log = logging.getLogger(__name__)

Reload = Callable[[], "Configuration"]
"""Reads the configuration again (the file, with the command line on top); raises ConfigError to refuse it."""


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


async def serve(
    config: ServerConfig,
    ready: Callable[[BrokerServer], None] | None = None,
    *,
    reload: Reload | None = None,
    running: Configuration | None = None,
) -> None:
    """Run a broker until SIGTERM/SIGINT: the first drains gracefully, a second exits at once.

    SIGHUP calls *reload* and applies what it returns (:func:`apply_reload`)
    without dropping a session; a refused configuration leaves the running one
    (*running*, what *config* came from) in place.  Without *reload* there is
    no file to read again: SIGHUP only says so.  The service manager hears of
    each step through ``$NOTIFY_SOCKET`` when it gave one (systemd
    ``Type=notify``)."""
    soft, _ = raise_nofile_limit()
    log.info("descriptor limit: %d", soft)
    server = BrokerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    notifier = ServiceNotifier()
    stopping: asyncio.Task[None] | None = None
    reloading: asyncio.Task[None] | None = None
    current = running

    def on_stop_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            log.info("%s: shutting down (grace %.1fs); send it again to exit at once", signal.Signals(signum).name, server.config.grace_seconds)
            notifier.stopping()
            stopping = loop.create_task(server.stop())
        else:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            stopping.cancel()
            loop.create_task(server.stop(grace=0))

    async def reload_now() -> None:
        nonlocal current
        notifier.reloading()
        try:
            if reload is None:
                log.info("SIGHUP: no configuration file (serve --config) to read again; nothing changed")
            elif current is not None:
                current = await apply_reload(server, current, reload)
        except Exception:
            log.exception("reload failed; the running configuration stays")
        finally:
            notifier.ready(_serving_status(server))

    def on_reload_signal() -> None:
        nonlocal reloading
        if stopping is not None:
            log.info("SIGHUP while shutting down: ignored")
            return
        if reloading is not None and not reloading.done():
            log.info("SIGHUP while a reload is under way: ignored (send it again once it is done)")
            return
        reloading = loop.create_task(reload_now())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
    try:
        if ready is not None:
            ready(server)
        notifier.ready(_serving_status(server))
        await server.wait_closed()
        if stopping is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if reloading is not None and not reloading.done():
            reloading.cancel()
        await server.stop(grace=0)
        notifier.close()


def _serving_status(server: BrokerServer) -> str:
    registry = server.registry
    sessions = len(registry.sessions) if registry is not None else 0
    return f"serving on {server.config.socket_path}; {sessions} session(s)"


async def apply_reload(server: BrokerServer, running: Configuration, reload: Reload) -> Configuration:
    """Read the configuration again and apply it to *server*; return the configuration now in force.

    Refused (the file has an unknown key or a bad value, or the audit
    destination cannot be opened): logged with the file, key and reason, and
    *running* stays in force, whole.  Settings that need a restart (the
    sockets, the backend, the metrics address...) keep their running values,
    and the log says which."""
    from grant_broker.daemon.config import ConfigError
    from grant_broker.daemon.logs import configure_audit
    from grant_broker_protocol.errors import BrokerError

    try:
        new = await asyncio.to_thread(reload)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return running
    if new.audit != running.audit:
        try:
            configure_audit(new.audit)
        except BrokerError as exc:
            log.error("reload refused, the running configuration stays: audit %s: %s", new.audit, exc)
            configure_audit(running.audit)
            return running
    logging.getLogger().setLevel(new.log_level.upper())
    needs_restart = server.reconfigure(new.server)
    if server.admin_listener is not None:
        try:
            await server.admin_listener.reload_certificates()
        except BrokerError as exc:
            log.error("reload: the admin listener keeps its running certificates: %s", exc)
    for name in needs_restart:
        log.warning("reload: %s changed; it takes effect when the broker restarts", name)
    if new.log_format != running.log_format:
        log.warning("reload: log_format changed; it takes effect when the broker restarts")
    log.info("configuration reloaded: policy, limits, status view, grace period, log level and audit applied")
    return dataclasses.replace(new, server=server.config, log_format=running.log_format)
