"""What the reliability tests share: a broker daemon they can watch, knobs, seeds, child clients.

``daemon`` runs ``grant-broker serve`` (emulated backend) as a real process
whose log goes to a file (never a pipe nobody drains), whose descriptors and
memory the test reads from ``/proc/<pid>``, and whose sessions and usage it
reads through the Broker.Status RPC.  ``start_daemon`` does the same with
options (a low ``RLIMIT_NOFILE``, a grant quota, a fixed socket path to
restart on).

Knobs (environment variables; the defaults are the short CI run):

* ``GRANT_BROKER_SEED``: the seed of every random choice (default: random,
  printed at the start of each test and in every failure message).
* ``GRANT_BROKER_CRASH_ROUNDS``: rounds of client kills in test_crash_cleanup.
* ``GRANT_BROKER_SOAK_SECONDS``: length of test_soak.
* ``GRANT_BROKER_FUZZ_EXAMPLES``: hypothesis examples per fuzzed RPC.
* ``GRANT_BROKER_LOAD_CALLS`` / ``GRANT_BROKER_LOAD_SESSIONS``: test_load's sizes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grant_broker.daemon.server import BrokerServer, ServerConfig
from grant_broker_protocol.v1 import broker_pb2, broker_pb2_grpc

HERE = Path(__file__).parent
WORKER = HERE / "worker.py"


def knob(name: str, default: float) -> float:
    """A number from the environment, for the long runs; *default* in CI."""
    value = os.environ.get(name)
    return type(default)(value) if value else default


def seed_for(test_name: str) -> int:
    """The run's seed: ``GRANT_BROKER_SEED`` or a fresh one; printed so a failure replays."""
    value = os.environ.get("GRANT_BROKER_SEED")
    seed = int(value) if value else random.SystemRandom().randrange(2**32)
    print(f"\n{test_name}: GRANT_BROKER_SEED={seed}", flush=True)
    return seed


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    return seed_for(request.node.name)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="gb-rel-") as directory:
        yield Path(directory)


# --------------------------------------------------------------------------- the daemon

_WRAPPER = textwrap.dedent(
    """
    import ctypes, os, resource, signal, sys
    # Die with the test process (PR_SET_PDEATHSIG survives the exec): a test
    # killed by its timeout leaves no broker behind.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if sys.argv[1] != "-":
        soft, _, hard = sys.argv[1].partition(":")
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(soft), int(hard or soft)))
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
    """
)


@dataclass
class Daemon:
    """A ``grant-broker serve`` process."""

    socket_path: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: tuple[str, ...] = ()
    nofile: int | str | None = None
    restarts: int = field(default=0)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def quiet_fd_count(self, quiet: float = 0.5, timeout: float = 15.0) -> int:
        """The broker's descriptor count once it has not changed for *quiet* seconds: a
        baseline that does not count a connection of the harness's (start_daemon's
        health check, a status call) that the broker has yet to see closed."""
        deadline = time.monotonic() + timeout
        count, since = self.fd_count(), time.monotonic()
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, f"the broker's descriptor count never settled (now {count})"
            await asyncio.sleep(0.05)
            now = self.fd_count()
            if now != count:
                count, since = now, time.monotonic()
        return count

    def fd_targets(self) -> dict[int, str]:
        """The broker's descriptors: number -> what ``/proc/<pid>/fd`` says they are."""
        targets = {}
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                targets[int(name)] = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                pass
        return targets

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.alive():
            self.process.send_signal(sig)
        return self.process.wait(30)

    async def status(self, timeout: float = 10) -> broker_pb2.StatusResponse:
        from grant_broker_client.session import CHANNEL_OPTIONS

        async with grpc.aio.insecure_channel(f"unix:{self.socket_path}", options=CHANNEL_OPTIONS) as channel:
            return await broker_pb2_grpc.BrokerStub(channel).Status(
                broker_pb2.StatusRequest(), timeout=timeout, wait_for_ready=True
            )

    async def settle(self, predicate, what: str, timeout: float = 15.0):  # type: ignore[no-untyped-def]
        """Poll Status until ``predicate(status)`` holds; return that status."""
        deadline = time.monotonic() + timeout
        status = await self.status()
        while not predicate(status):
            if time.monotonic() > deadline:
                raise AssertionError(f"never happened within {timeout}s: {what}; last status: {status}")
            await asyncio.sleep(0.05)
            status = await self.status()
        return status

    async def settle_fds(self, expected: dict[int, str] | int, timeout: float = 15.0) -> int:
        """Wait until the broker holds as many descriptors as *expected* (a count,
        or the :meth:`fd_targets` of the baseline); fail saying which differ."""
        want = expected if isinstance(expected, int) else len(expected)
        deadline = time.monotonic() + timeout
        while (count := self.fd_count()) != want:
            if time.monotonic() > deadline:
                now = self.fd_targets()
                if isinstance(expected, dict):
                    extra = {fd: what for fd, what in now.items() if expected.get(fd) != what}
                    gone = {fd: what for fd, what in expected.items() if now.get(fd) != what}
                    detail = f"new: {extra}; gone: {gone}"
                else:
                    detail = str(sorted(now.values()))
                raise AssertionError(f"the broker holds {count} descriptors, {want} expected; {detail}")
            await asyncio.sleep(0.05)
        return count


def start_daemon(
    socket_path: str,
    *args: str,
    nofile: int | str | None = None,
    log_path: Path | None = None,
    wait: float = 30,
    options: dict | None = None,  # type: ignore[type-arg]
) -> Daemon:
    """Start ``grant-broker serve`` on the emulated backend and wait until it answers health checks.

    *args* are CLI options; *options* (``{"limits": {...}, "policy": {...},
    "socket_mode": "0666", "status_view": "own"}``) runs it through launch.py
    instead, for limits the CLI does not offer.  Status shows every session
    to anyone (``--status-view all``) unless told otherwise.  *nofile* sets its ``RLIMIT_NOFILE`` (``N`` or ``"soft:hard"``)."""
    log_path = log_path or Path(socket_path).with_suffix(".log")
    if options is not None:
        assert not args
        command = [str(HERE / "launch.py"), socket_path, json.dumps(options)]
    else:
        # The harness watches every session from outside (Daemon.status, without a
        # session): --status-view all, unless *args* say otherwise (the last one wins).
        command = [
            "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "emulated", "--grace", "1",
            "--status-view", "all", *args,
        ]
    command = ["-c", _WRAPPER, "-" if nofile is None else str(nofile), *command]
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(socket_path, process, log_path, args, nofile)
    deadline = time.monotonic() + wait
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode}:\n{daemon.log()}")
        if os.path.exists(socket_path) and os.path.exists(socket_path + ".fds") and _serving(socket_path):
            return daemon
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"broker did not start within {wait}s:\n{daemon.log()}")
        time.sleep(0.02)


def _serving(socket_path: str) -> bool:
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def stop_daemon(daemon: Daemon) -> None:
    if daemon.alive():
        daemon.process.kill()
    daemon.process.wait(10)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Daemon]:
    broker = start_daemon(str(short_tmp / "broker.sock"))
    try:
        yield broker
    finally:
        stop_daemon(broker)


# --------------------------------------------------------------------------- child clients


class Worker:
    """A client process running ``worker.py``; reads its stdout lines."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []

    @classmethod
    async def start(cls, name: str, *args: str, **kwargs) -> "Worker":  # type: ignore[no-untyped-def]
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(WORKER), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, **kwargs,
        )
        return cls(process, name)

    async def expect(self, prefix: str, timeout: float = 60) -> str:
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
            if not raw:
                stderr = await self.process.stderr.read() if self.process.stderr else b""
                await self.process.wait()
                raise AssertionError(
                    f"{self.name} ended (status {self.process.returncode}) before saying {prefix!r}:\n{stderr.decode()}"
                )
            line = raw.decode().strip()
            self.lines.append(line)
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def rest(self) -> tuple[list[str], str]:
        """Everything it said after the last :meth:`expect`, once it has exited."""
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = await asyncio.wait_for(asyncio.gather(self.process.stdout.read(), self.process.stderr.read()), 60)
        await self.process.wait()
        more = [line.strip() for line in out.decode().splitlines()]
        self.lines.extend(more)
        return more, err.decode()


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()
    for worker in started:
        try:
            await worker.rest()
        except Exception:  # noqa: BLE001 - cleanup
            pass


# --------------------------------------------------------------------------- a broker in this process


@pytest.fixture
async def in_process(short_tmp: Path) -> AsyncIterator[tuple[str, BrokerServer]]:
    """A BrokerServer (emulated) in the test's own loop, for looking inside it."""
    config = ServerConfig(socket_path=str(short_tmp / "broker.sock"), backend="emulated", grace_seconds=0)
    async with BrokerServer(config) as server:
        yield config.socket_path, server
