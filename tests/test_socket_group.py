"""``serve --socket-group``: the sockets belong to a group, and a non-root client in it connects.

The tests run as root; the clients run as uid/gid 65534 (nobody), with or
without the sockets' group as a supplemental group, in processes of their own.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from grant_broker.cli import EXIT_USAGE
from service.conftest import BrokerProcess, start_broker_process

CLIENT_GROUP = 4242  # a gid the clients get as a supplemental group; it needs no name
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing the clients' uid and groups takes root")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short (Unix socket paths), and searchable by the clients: root's, mode 0755.
    with tempfile.TemporaryDirectory(prefix="gbsg-") as directory:
        os.chmod(directory, 0o755)
        yield Path(directory)


Start = Callable[..., BrokerProcess]


@pytest.fixture
def start(socket_dir: Path) -> Iterator[Start]:
    started: list[BrokerProcess] = []

    def start(*extra: str) -> BrokerProcess:
        broker = start_broker_process(str(socket_dir / "broker.sock"), *extra)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()
        if broker.process.stdout:
            broker.process.stdout.close()


# The client: a session and a Status call through the SDK, as uid/gid 65534 with the
# supplemental groups given.  It starts as root and drops to them itself, after its
# imports: the interpreter and its standard library may live where nobody cannot
# read (a pyenv under /root), and the point is who connects, not who runs Python.
_CLIENT = """
import asyncio, os, sys
import grant_broker_client
from grant_broker_protocol.v1 import broker_pb2

async def status(path: str, fast_path: bool) -> None:
    async with await grant_broker_client.connect(path, fast_path=fast_path) as session:
        await session.call(session.broker.Status, broker_pb2.StatusRequest(), timeout=10)

path, fast_path, uid, groups = sys.argv[1], sys.argv[2] == "fast", int(sys.argv[3]), sys.argv[4:]
os.setgroups([int(group) for group in groups])
os.setgid(uid)
os.setuid(uid)
assert (os.getuid(), os.geteuid(), os.getgid()) == (uid, uid, uid)
asyncio.run(status(path, fast_path))
"""


def _session_as_nobody(socket: str, groups: list[int], transport: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLIENT, socket, transport, str(NOBODY), *map(str, groups)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_both_sockets_belong_to_the_socket_group(start: Start, socket_dir: Path) -> None:
    start("--socket-group", str(CLIENT_GROUP))
    for name in ("broker.sock", "broker.sock.fds"):
        info = os.stat(socket_dir / name)
        assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (CLIENT_GROUP, 0o660), name


def test_a_unix_metrics_socket_belongs_to_the_socket_group(start: Start, socket_dir: Path) -> None:
    start("--socket-group", str(CLIENT_GROUP), "--metrics", f"unix:{socket_dir / 'metrics.sock'}")
    assert os.stat(socket_dir / "metrics.sock").st_gid == CLIENT_GROUP


def test_the_socket_group_can_be_named(start: Start, socket_dir: Path) -> None:
    named = next(group for group in grp.getgrall() if group.gr_gid != 0)
    start("--socket-group", named.gr_name)
    assert os.stat(socket_dir / "broker.sock").st_gid == named.gr_gid


@pytest.mark.parametrize("transport", ["fast", "grpc"])
def test_a_non_root_client_in_the_socket_group_opens_a_session(start: Start, socket_dir: Path, transport: str) -> None:
    start("--socket-group", str(CLIENT_GROUP))
    result = _session_as_nobody(str(socket_dir / "broker.sock"), [CLIENT_GROUP], transport)
    assert result.returncode == 0, result.stderr


def test_a_non_root_client_outside_the_socket_group_cannot_connect(start: Start, socket_dir: Path) -> None:
    start("--socket-group", str(CLIENT_GROUP))
    result = _session_as_nobody(str(socket_dir / "broker.sock"), [], "fast")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr, result.stderr


def test_an_unknown_group_name_is_refused_as_bad_input(socket_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "--socket", str(socket_dir / "broker.sock"), "serve",
         "--backend", "emulated", "--socket-group", "no-such-group-here"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert "no group is named 'no-such-group-here'" in result.stderr
    assert not (socket_dir / "broker.sock").exists()


def test_the_configuration_file_sets_the_socket_group(start: Start, socket_dir: Path) -> None:
    config = socket_dir / "grant-broker.toml"
    config.write_text(f"socket_group = {CLIENT_GROUP}\n")
    start("--config", str(config))
    assert os.stat(socket_dir / "broker.sock").st_gid == CLIENT_GROUP


def test_the_command_line_overrides_the_files_socket_group(start: Start, socket_dir: Path) -> None:
    config = socket_dir / "grant-broker.toml"
    config.write_text(f"socket_group = {CLIENT_GROUP + 1}\n")
    start("--config", str(config), "--socket-group", str(CLIENT_GROUP))
    assert os.stat(socket_dir / "broker.sock").st_gid == CLIENT_GROUP


def test_an_unknown_group_in_the_configuration_file_is_refused_naming_the_key(socket_dir: Path) -> None:
    config = socket_dir / "grant-broker.toml"
    config.write_text('socket_group = "no-such-group-here"\n')
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "--socket", str(socket_dir / "broker.sock"), "serve",
         "--backend", "emulated", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert f"{config}: socket_group: no group is named 'no-such-group-here'" in result.stderr
