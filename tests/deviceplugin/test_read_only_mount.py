"""Allocate mounts the broker's socket directory read-only into client containers: enough to connect.

Connecting to a Unix socket takes write permission on the socket, which a
read-only mount does not take away (only files, directories and links refuse
writes there).  Checked here as a container would see it: a mount namespace
in which the socket directory is bind-mounted read-only elsewhere, and a
client that reaches the broker only through that mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.conftest import start_broker_process

_MOUNT_NAMESPACES = os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "--mount", "true"], capture_output=True
).returncode == 0

pytestmark = pytest.mark.skipif(not _MOUNT_NAMESPACES, reason="needs root and unshare --mount")


@pytest.fixture
def broker_dir(short_tmp: Path) -> Iterator[Path]:
    directory = short_tmp / "run"
    directory.mkdir(mode=0o755)
    broker = start_broker_process(str(directory / "broker.sock"))
    try:
        yield directory
    finally:
        broker.stop()
        if broker.process.stdout:
            broker.process.stdout.close()


def test_a_client_connects_through_a_read_only_mount_of_the_socket_directory(broker_dir: Path, short_tmp: Path) -> None:
    container_dir = short_tmp / "container-run"
    container_dir.mkdir()
    script = (
        'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" || exit 90\n'
        'touch "$2/probe" 2>/dev/null && exit 91\n'  # the mount must really be read-only
        'shift 2; exec "$@"\n'
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(broker_dir), str(container_dir),
         sys.executable, "-m", "grant_broker.cli", "--socket", str(container_dir / "broker.sock"), "status", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode not in (90, 91), f"the read-only mount was not made ({result.returncode}): {result.stderr}"
    assert result.returncode == 0, result.stderr
