"""What the broker tells systemd through ``$NOTIFY_SOCKET`` (sd_notify's datagram protocol)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from grant_broker.daemon.notify import ServiceNotifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for the service manager's notification socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = str(tmp_path / "notify")
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_ready_is_one_datagram_of_key_value_lines(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    with ServiceNotifier({"NOTIFY_SOCKET": path}) as notifier:
        notifier.ready("serving")
    assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=serving"]


def test_reloading_carries_the_monotonic_time_it_began(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    with ServiceNotifier({"NOTIFY_SOCKET": path}) as notifier:
        notifier.reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert fields["RELOADING"] == "1"
    assert 0 < int(fields["MONOTONIC_USEC"]) <= __import__("time").monotonic_ns() // 1000


def test_an_abstract_socket_address_is_understood() -> None:
    name = f"grant-broker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        with ServiceNotifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            notifier.stopping()
        assert sock.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_without_a_notify_socket_nothing_is_sent() -> None:
    notifier = ServiceNotifier({})
    assert not notifier.enabled
    notifier.ready("serving")  # must neither raise nor open anything
    assert notifier._socket is None


def test_a_manager_that_went_away_does_not_stop_the_broker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        notifier.ready("serving")
        notifier.ready("serving")
    assert [record.levelname for record in caplog.records] == ["WARNING"]
