"""What the end-to-end tests in dom0 share: bounds for a system under TCG, the
broker process they talk to, and client processes driven line by line.

The broker fixture itself is in ``conftest.py`` (one broker for the whole
in-dom0 run: a Python start costs seconds there).
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from grant_broker.backend.contract import PAGE_SIZE
from grant_broker_client.gntdev import Mapping

# Python under QEMU's software emulation is 15-25x slower, and its start-up
# over 9p (import grpc) takes seconds: steps get generous bounds.
BROKER_START_TIMEOUT = 180
STEP_TIMEOUT = 120
QUIET_PERIOD = 1.0
# Seconds for the toolstack, xl create and the guest's boot (all its attempts) under TCG.
GUEST_READY_TIMEOUT = float(os.environ.get("XEN_GUEST_READY_TIMEOUT", "400"))
REPLY_AT = 2048  # where gb-peer writes its reply on the control page


@dataclass
class Broker:
    socket_path: str
    process: subprocess.Popen[str]


@contextmanager
def running_broker() -> Iterator[Broker]:
    """``grant-broker serve --backend xen`` as its own process, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        socket_path = os.path.join(directory, "broker.sock")
        process = subprocess.Popen(
            [sys.executable, "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "xen", "--grace", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + BROKER_START_TIMEOUT
            while not (os.path.exists(socket_path) and os.path.exists(socket_path + ".fds")):
                if process.poll() is not None:
                    raise RuntimeError(f"the broker exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the broker did not start within {BROKER_START_TIMEOUT} s")
                time.sleep(0.1)
            yield Broker(socket_path, process)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            output = process.stdout.read() if process.stdout else ""
            if process.stdout:
                process.stdout.close()
            if process.returncode not in (0, -signal.SIGTERM):
                print(output)  # shown with the failure


class Child:
    """A client process; ``say``/``expect`` exchange lines with it."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, script: str, *args: str, pass_fds: tuple[int, ...] = ()) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", textwrap.dedent(script), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=pass_fds,
        )
        return cls(process)

    async def expect(self, prefix: str) -> str:
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), STEP_TIMEOUT)).decode().strip()
        if not line.startswith(prefix):
            raise AssertionError(f"child said {line!r}, expected {prefix!r}")
        return line[len(prefix) :].strip()

    async def say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def finish(self) -> int:
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        return await asyncio.wait_for(self.process.wait(), STEP_TIMEOUT)


@dataclass(frozen=True)
class GuestInfo:
    """What gb-peer published in xenstore: its domain and the ref of its control page."""

    domid: int
    control_ref: int


class GuestError(AssertionError):
    """gb-peer answered ``err ...`` (or nothing in time)."""


class Peer:
    """gb-peer in the guest, driven through its control page (mapped by a session)."""

    def __init__(self, domid: int, control: Mapping) -> None:
        self.domid = domid
        self._view = control.view

    async def ask(self, command: str) -> str:
        """Run *command* in the guest; its reply without the ``ok``; GuestError on ``err``."""
        view = self._view
        seq = (struct.unpack_from("=I", view, 0)[0] + 1) & 0xFFFF_FFFF
        text = command.encode() + b"\0"
        view[8 : 8 + len(text)] = text
        struct.pack_into("=I", view, 0, seq)  # after the command: the guest reads seq first
        deadline = time.monotonic() + STEP_TIMEOUT
        while struct.unpack_from("=I", view, 4)[0] != seq:
            if time.monotonic() > deadline:
                raise GuestError(f"the guest did not answer {command!r} within {STEP_TIMEOUT} s")
            await asyncio.sleep(0.01)
        reply = bytes(view[REPLY_AT:PAGE_SIZE]).split(b"\0", 1)[0].decode()
        if not reply.startswith("ok"):
            raise GuestError(f"the guest answered {command!r} with {reply!r}")
        return reply[3:]

    async def share(self, count: int) -> tuple[int, list[int]]:
        """*count* pages the guest grants to dom0: (region, refs)."""
        region, *refs = (await self.ask(f"share {count}")).split()
        return int(region), [int(ref) for ref in refs]
