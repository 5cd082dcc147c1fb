"""Brokers for the service tests: in this process, or as a real daemon process.

``broker`` runs a BrokerServer on the emulated backend in the test's own event
loop, listening on a real Unix socket in a temporary directory: clients talk
to it through real sockets, and the test can look at the broker's state (its
``registry``) and this process's descriptor count.  ``broker_process`` runs
``grant-broker serve`` as a separate process, for behaviour that crosses
process boundaries (signals, crashes, fd passing between processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import grant_broker_client.session

from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker.core.policy import Limits


@pytest.fixture(params=["fast-path", "grpc"], autouse=True)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every service test runs twice: with the SDK's calls as frames on the
    session's fd channel (the fast path, its default), and over gRPC — the
    same results and the same errors either way."""
    defaults = grant_broker_client.session.connect.__kwdefaults__
    assert defaults is not None and "fast_path" in defaults
    monkeypatch.setitem(defaults, "fast_path", request.param == "fast-path")
    return str(request.param)


@dataclass
class InProcessBroker:
    socket_path: str
    server: BrokerServer

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        assert self.server.registry is not None
        return self.server.registry


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        yield Path(directory)


@pytest.fixture
def broker_limits() -> Limits:
    """Override in a test module to run the broker with other limits."""
    return Limits()


@pytest.fixture
async def broker(short_tmp: Path, broker_limits: Limits) -> AsyncIterator[InProcessBroker]:
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0, limits=broker_limits)
    async with BrokerServer(config) as server:
        yield InProcessBroker(config.socket_path, server)


@dataclass
class BrokerProcess:
    socket_path: str
    process: subprocess.Popen[str]
    # The broker's $NOTIFY_SOCKET, held until it is stopped: it says STOPPING=1
    # there, and would log that nobody listens if it were gone.
    notify_socket: socket.socket | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        try:
            if self.process.poll() is None:
                self.process.send_signal(sig)
            return self.process.wait(timeout)
        finally:
            self.close_notify_socket()

    def close_notify_socket(self) -> None:
        if self.notify_socket is not None:
            self.notify_socket.close()
            self.notify_socket = None


def start_broker_process(socket_path: str, *extra: str) -> BrokerProcess:
    """Start ``grant-broker serve`` and wait until it serves: until it says
    ``READY=1`` on a notify socket of its own, as it tells systemd (its sockets
    exist before then, and whatever else it serves — metrics, admin — may not yet)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        notify.bind(f"\0grant-broker-test-notify-{os.getpid()}-{time.monotonic_ns()}")
        notify.settimeout(0.05)
        address = "@" + notify.getsockname()[1:].decode()
        process = subprocess.Popen(
            [sys.executable, "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "emulated", "--grace", "1", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NOTIFY_SOCKET": address},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if "READY=1" in notify.recv(4096).decode().splitlines():
                    break
            except TimeoutError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"broker exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}")
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError("broker did not say READY=1 within 30 s")
    except BaseException:
        notify.close()
        raise
    return BrokerProcess(socket_path, process, notify)


@pytest.fixture
def broker_process(short_tmp: Path) -> Iterator[BrokerProcess]:
    broker = start_broker_process(str(short_tmp / "broker.sock"))
    try:
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.process.kill()
        broker.process.wait(10)
        if broker.process.stdout:
            broker.process.stdout.close()
        broker.close_notify_socket()
