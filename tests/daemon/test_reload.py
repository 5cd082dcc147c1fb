"""A running broker under its service manager: readiness, SIGHUP reload without dropping sessions, stopping.

Each test runs ``grant-broker serve --config FILE`` as a real process with
``$NOTIFY_SOCKET`` pointing at a datagram socket the test holds, as systemd
does for ``Type=notify``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import grant_broker_client
from grant_broker_client.errors import BrokerClientError

SHARER = 1
MAPPER = 2


@dataclass
class ManagedBroker:
    """``grant-broker serve`` with its configuration file and the manager's end of $NOTIFY_SOCKET."""

    process: subprocess.Popen[str]
    config: Path
    socket_path: str
    notifications: socket.socket

    def next_notification(self, timeout: float = 30) -> dict[str, str]:
        self.notifications.settimeout(timeout)
        message = self.notifications.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.splitlines())

    def reload_with(self, text: str) -> tuple[dict[str, str], dict[str, str]]:
        """Rewrite the file, SIGHUP, and return the RELOADING and READY notifications."""
        self.config.write_text(text)
        self.process.send_signal(signal.SIGHUP)
        return self.next_notification(), self.next_notification()

    def log(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=15)
        return out


def _config(socket_path: str, max_grants: int, extra: str = "") -> str:
    return f'socket = "{socket_path}"\nbackend = "emulated"\ngrace_seconds = 1\n{extra}\n[limits]\nmax_grants_per_session = {max_grants}\n'


@pytest.fixture
def managed() -> Iterator[ManagedBroker]:
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        root = Path(directory)
        socket_path = str(root / "broker.sock")
        config = root / "broker.toml"
        config.write_text(_config(socket_path, max_grants=4))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
            notifications.bind(str(root / "notify"))
            process = subprocess.Popen(
                [sys.executable, "-m", "grant_broker.cli", "serve", "--config", str(config)],
                env={**os.environ, "NOTIFY_SOCKET": str(root / "notify")},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            broker = ManagedBroker(process, config, socket_path, notifications)
            try:
                yield broker
            finally:
                if process.poll() is None:
                    process.kill()
                process.communicate(timeout=15)


def test_ready_is_notified_once_both_sockets_listen(managed: ManagedBroker) -> None:
    ready = managed.next_notification()
    assert ready["READY"] == "1"
    assert "serving on" in ready["STATUS"]
    for path in (managed.socket_path, managed.socket_path + ".fds"):
        kind = socket.SOCK_STREAM if path == managed.socket_path else socket.SOCK_SEQPACKET
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.connect(path)


async def test_sighup_applies_new_limits_to_a_session_that_stays_open(managed: ManagedBroker) -> None:
    managed.next_notification()
    async with await grant_broker_client.connect(managed.socket_path, domid=SHARER) as session:
        async with await session.gntalloc.share(MAPPER, 2):
            reloading, ready = managed.reload_with(_config(managed.socket_path, max_grants=2))
            assert reloading["RELOADING"] == "1" and ready["READY"] == "1"
            with pytest.raises(BrokerClientError) as refused:
                await session.gntalloc.share(MAPPER, 1)
            assert refused.value.errno == errno.EDQUOT and "limit is 2" in refused.value.detail
        # The session that lived through the reload is served as before, under the new limit.
        async with await session.gntalloc.share(MAPPER, 2) as pages:
            assert len(pages.refs) == 2


async def test_a_refused_reload_keeps_the_running_configuration(managed: ManagedBroker) -> None:
    managed.next_notification()
    reloading, ready = managed.reload_with(_config(managed.socket_path, max_grants=1, extra="max_sesions = 3"))
    assert reloading["RELOADING"] == "1" and ready["READY"] == "1"
    async with await grant_broker_client.connect(managed.socket_path, domid=SHARER) as session:
        async with await session.gntalloc.share(MAPPER, 4) as pages:  # the running limit, 4, still holds
            assert len(pages.refs) == 4
    log = managed.log()
    assert f"reload refused, the running configuration stays: {managed.config}: max_sesions: unknown key" in log


def test_a_setting_that_needs_a_restart_keeps_its_value_and_says_so(managed: ManagedBroker) -> None:
    managed.next_notification()
    managed.reload_with(_config(managed.socket_path, max_grants=4).replace('"emulated"', '"auto"'))
    channel = grpc.insecure_channel(f"unix:{managed.socket_path}")
    grpc.channel_ready_future(channel).result(timeout=10)  # still serving on the same socket
    channel.close()
    assert "reload: backend changed; it takes effect when the broker restarts" in managed.log()


def test_sighup_without_a_configuration_file_leaves_the_broker_serving() -> None:
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        socket_path = os.path.join(directory, "broker.sock")
        process = subprocess.Popen(
            [sys.executable, "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "emulated"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(socket_path + ".fds"):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert process.poll() is None
            process.terminate()
            out, _ = process.communicate(timeout=15)
            assert process.returncode == 0
            assert "no configuration file (serve --config) to read again" in out
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=15)


def test_sigterm_tells_the_manager_it_is_stopping(managed: ManagedBroker) -> None:
    managed.next_notification()
    managed.process.send_signal(signal.SIGTERM)
    assert managed.next_notification()["STOPPING"] == "1"
    assert managed.process.wait(15) == 0
