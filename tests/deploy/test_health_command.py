"""``grant-broker health``: one gRPC health check, its state as the exit status.

The probes of the DaemonSet (and any script) run it every few seconds: the
state it prints and the status it exits with are its whole interface.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from grant_broker.cli import (
    EXIT_HEALTH_UNKNOWN,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_SERVICE_UNKNOWN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

from .conftest import grant_broker


def health_of(socket: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return grant_broker("--socket", str(socket), "health", *extra)


class StandInHealth:
    """A gRPC health service alone on a Unix socket, in whatever state a test
    sets: the states a real broker shows only for an instant (NOT_SERVING
    while it drains) or never (UNKNOWN)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix:{path}")

    def set(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.servicer.set("", status)


@pytest.fixture
def stand_in(short_tmp: Path) -> Iterator[StandInHealth]:
    server = StandInHealth(short_tmp / "stand-in.sock")
    server.server.start()
    try:
        yield server
    finally:
        server.server.stop(None).wait(10)


def test_a_serving_broker_is_serving_and_exits_0(broker_socket: Path) -> None:
    result = health_of(broker_socket)
    assert (result.returncode, result.stdout.strip()) == (EXIT_OK, "SERVING"), result.stderr


def test_json_says_the_socket_the_service_and_the_state(broker_socket: Path) -> None:
    result = health_of(broker_socket, "--json")
    assert result.returncode == EXIT_OK, result.stderr
    record = json.loads(result.stdout)
    assert (record["socket"], record["service"], record["status"]) == (str(broker_socket), "", "SERVING")


def test_one_service_of_the_broker_can_be_asked_about(broker_socket: Path) -> None:
    result = health_of(broker_socket, "--service", "grant_broker.v1.Gntdev")
    assert (result.returncode, result.stdout.strip()) == (EXIT_OK, "SERVING"), result.stderr


def test_a_service_the_broker_does_not_have_is_service_unknown_and_exits_6(broker_socket: Path) -> None:
    result = health_of(broker_socket, "--service", "grant_broker.v1.NoSuchThing")
    assert result.returncode == EXIT_SERVICE_UNKNOWN
    assert result.stdout.startswith("SERVICE_UNKNOWN: ") and "grant_broker.v1.NoSuchThing" in result.stdout


def test_no_broker_on_the_socket_is_unreachable_and_exits_3(short_tmp: Path) -> None:
    result = health_of(short_tmp / "none.sock")
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stdout.startswith("UNREACHABLE: no broker answers on ") and "none.sock" in result.stdout


def test_a_stopped_broker_is_unreachable(short_tmp: Path) -> None:
    from .conftest import start_broker, stop_broker

    path = short_tmp / "broker.sock"
    process = start_broker(path)
    assert health_of(path).returncode == EXIT_OK
    stop_broker(process)
    assert health_of(path).returncode == EXIT_UNREACHABLE


def test_a_draining_broker_is_not_serving_and_exits_5(stand_in: StandInHealth) -> None:
    stand_in.set(health_pb2.HealthCheckResponse.NOT_SERVING)
    result = health_of(stand_in.path)
    assert result.returncode == EXIT_NOT_SERVING
    assert result.stdout.startswith("NOT_SERVING: ")


def test_any_other_answer_is_unknown_and_exits_7(stand_in: StandInHealth) -> None:
    stand_in.set(health_pb2.HealthCheckResponse.UNKNOWN)
    result = health_of(stand_in.path)
    assert result.returncode == EXIT_HEALTH_UNKNOWN
    assert result.stdout.startswith("UNKNOWN: ")


def test_a_bad_timeout_is_bad_input_and_exits_2(short_tmp: Path) -> None:
    result = health_of(short_tmp / "none.sock", "--timeout", "soon")
    assert result.returncode == EXIT_USAGE
    assert "--timeout" in result.stderr


# Whatever a probe process imports it pays for on every probe: grpc itself
# (with asyncio and its Cython core, about 0.1 CPU-second), the SDK, the event
# loop library, the broker's own messages and its core are not needed to read
# a plain answer of one health check.
NOT_ON_THE_PROBE_PATH = ("grpc", "google.protobuf", "asyncio", "grant_broker_client", "grant_broker_protocol",
                         "grant_broker.core", "uvloop", "grant_broker.daemon.logs", "grant_broker.daemon.server")


def test_a_plain_answer_is_read_without_grpc_or_the_broker(broker_socket: Path) -> None:
    program = (
        "import sys\n"
        "from grant_broker.cli import main\n"
        f"status = main(['--socket', {str(broker_socket)!r}, 'health'])\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({NOT_ON_THE_PROBE_PATH!r}))\n"
        "print(status, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr


# ------------------------------------------------------------------ the answer read without grpc


@pytest.mark.parametrize(
    "status",
    [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING,
     health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, health_pb2.HealthCheckResponse.UNKNOWN],
    ids=["SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNKNOWN"],
)
def test_the_frames_read_without_grpc_say_what_grpc_says(stand_in: StandInHealth, status: int) -> None:
    from grant_broker.daemon.health import _ask, _check_with_grpc, check_health

    stand_in.set(status)  # type: ignore[arg-type]
    assert _ask(str(stand_in.path), "", time.monotonic() + 10) == status  # the plain answer, read from the frames
    assert check_health(str(stand_in.path))[0] == _check_with_grpc(str(stand_in.path), "", 10)[0]


def test_a_long_service_name_is_asked_about_whole(broker_socket: Path) -> None:
    name = "grant_broker.v1." + "X" * 300  # its length takes two bytes of varint
    result = health_of(broker_socket, "--service", name)
    assert result.returncode == EXIT_SERVICE_UNKNOWN and name in result.stdout


@pytest.fixture
def silent_listener(short_tmp: Path) -> Iterator[socket.socket]:
    """A Unix socket that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_tmp / "silent.sock"))
    listener.listen(8)
    try:
        yield listener
    finally:
        listener.close()


def test_a_socket_that_never_answers_is_unreachable_once_the_timeout_passes(silent_listener: socket.socket) -> None:
    result = health_of(Path(silent_listener.getsockname()), "--timeout", "0.5")
    assert result.returncode == EXIT_UNREACHABLE and "within 0.5 s" in result.stdout


def test_a_socket_that_hangs_up_is_unreachable(short_tmp: Path) -> None:
    path = short_tmp / "hangs-up.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)

        def hang_up() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = listener.accept()
                    conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            result = health_of(path)
        finally:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept: close alone would not
            thread.join(10)
    assert result.returncode == EXIT_UNREACHABLE, result.stdout + result.stderr
