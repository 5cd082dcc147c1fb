"""Fixtures of the device-plugin tests: a kubelet stand-in, a real broker process, the plugin process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.conftest import BrokerProcess, start_broker_process

from .kubelet import FakeKubelet

TIMEOUT = 20.0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="gbdp-") as directory:
        yield Path(directory)


@pytest.fixture
def kubelet_dir(short_tmp: Path) -> Path:
    directory = short_tmp / "device-plugins"
    directory.mkdir()
    return directory


@pytest.fixture
def broker_socket(short_tmp: Path) -> Path:
    """Where the broker listens (in a directory of its own, as /run/grant-broker)."""
    directory = short_tmp / "run"
    directory.mkdir(mode=0o755)
    return directory / "broker.sock"


@pytest.fixture
async def kubelet(kubelet_dir: Path) -> AsyncIterator[FakeKubelet]:
    stand_in = await FakeKubelet(kubelet_dir).start()
    yield stand_in
    await stand_in.stop()


class Brokers:
    """Starts and stops real broker processes on one socket; stops what is left at the end."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.current: BrokerProcess | None = None

    async def start(self) -> BrokerProcess:
        self.current = await asyncio.to_thread(start_broker_process, str(self.socket))
        return self.current

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.current is not None
        current, self.current = self.current, None
        try:
            return await asyncio.to_thread(current.stop, sig)
        finally:
            if current.process.stdout:
                current.process.stdout.close()


@pytest.fixture
async def brokers(broker_socket: Path) -> AsyncIterator[Brokers]:
    started = Brokers(broker_socket)
    yield started
    if started.current is not None:
        await started.stop(signal.SIGKILL)


@dataclass
class PluginProcess:
    process: asyncio.subprocess.Process

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), TIMEOUT)

    async def exited(self) -> int:
        """Its exit status, once it exits by itself."""
        return await asyncio.wait_for(self.process.wait(), TIMEOUT)

    async def output(self) -> str:
        assert self.process.stdout is not None
        return (await self.process.stdout.read()).decode()


class Plugins:
    def __init__(self, broker_socket: Path, kubelet_dir: Path) -> None:
        self.broker_socket = broker_socket
        self.kubelet_dir = kubelet_dir
        self.started: list[PluginProcess] = []

    async def start(self, *extra: str) -> PluginProcess:
        """``grant-broker device-plugin`` with 4 slots, looking around every 0.1 s."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "grant_broker.cli", "--socket", str(self.broker_socket), "device-plugin",
            "--kubelet-dir", str(self.kubelet_dir), "--slots", "4", "--poll-interval", "0.1", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        plugin = PluginProcess(process)
        self.started.append(plugin)
        return plugin


@pytest.fixture
async def plugins(broker_socket: Path, kubelet_dir: Path) -> AsyncIterator[Plugins]:
    started = Plugins(broker_socket, kubelet_dir)
    yield started
    for plugin in started.started:
        if plugin.running:
            plugin.process.kill()
        await plugin.process.wait()
