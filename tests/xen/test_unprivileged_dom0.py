"""In dom0 of a real Xen: the udev rule of deploy/systemd gives the real device nodes to the broker's
group, and with just that group a broker that is not root serves them (what the hardened unit runs:
``User=grant-broker``, no capability).

These tests change dom0's device nodes and /etc, so they run only in the throw-away dom0 that
``tests/xen/run-in-dom0`` boots (its root is an overlay that vanishes at power-off), never on a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import grant_broker_client
from grant_broker_protocol.v1 import broker_pb2

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(
        os.environ.get("XEN_RUN_IN_DOM0") != "1" or not os.path.exists("/dev/xen/gntdev"),
        reason="changes device nodes and /etc: only in the throw-away dom0 of tests/xen/run-in-dom0",
    ),
]

REPO = Path(__file__).resolve().parents[2]
RULE = REPO / "deploy" / "systemd" / "70-grant-broker.rules"
DEVICE_GROUP = "grant-broker"
DEVICES = ("/dev/xen/gntdev", "/dev/xen/gntalloc", "/dev/xen/evtchn")
NOBODY = 65534
START_TIMEOUT = 120  # Python starts slowly under TCG


@pytest.fixture(scope="module")
def device_gid() -> int:
    """The broker's group, made as the sysusers.d entry would, and the rule installed."""
    try:
        gid = grp.getgrnam(DEVICE_GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", DEVICE_GROUP], check=True)
        gid = grp.getgrnam(DEVICE_GROUP).gr_gid
    shutil.copy(RULE, "/etc/udev/rules.d/70-grant-broker.rules")
    return gid


@pytest.mark.parametrize("device", DEVICES)
def test_the_udev_rule_gives_the_real_device_to_the_brokers_group(device_gid: int, device: str) -> None:
    sysfs = f"/sys/class/misc/{device.removeprefix('/dev/').replace('/', '!')}"
    result = subprocess.run(["udevadm", "test", "--action=add", sysfs], capture_output=True, text=True, timeout=120)
    said = result.stdout + result.stderr
    assert f"Setting permissions {device}, uid=0, gid={device_gid}, mode=0660" in said, said[-3000:]


@contextlib.contextmanager
def _nodes_as_the_rule_sets_them(gid: int) -> Iterator[None]:
    """What udev does with the rule (no udevd runs in this dom0): the nodes root:GROUP 0660."""
    before = {device: os.stat(device) for device in DEVICES}
    for device in DEVICES:
        os.chown(device, 0, gid)
        os.chmod(device, 0o660)
    try:
        yield
    finally:
        for device, info in before.items():
            os.chown(device, info.st_uid, info.st_gid)
            os.chmod(device, stat.S_IMODE(info.st_mode))


@contextlib.contextmanager
def _reachable_by_others(*paths: str) -> Iterator[None]:
    """Let other users through the directories above *paths* (the interpreter may live under /root)."""
    changed: dict[str, int] = {}
    for path in paths:
        for directory in Path(path).resolve().parents:
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            if not mode & stat.S_IXOTH and str(directory) not in changed:
                changed[str(directory)] = mode
                os.chmod(directory, mode | stat.S_IXOTH)
    try:
        yield
    finally:
        for directory, mode in changed.items():
            os.chmod(directory, mode)


async def _share_and_map(socket_path: str) -> tuple[str, bytes]:
    async with await grant_broker_client.connect(socket_path, client_name="root client") as session:
        status = await session.call(session.broker.Status, broker_pb2.StatusRequest(), timeout=60)
        domid = (await session.describe()).domid
        async with await session.gntalloc.share(domid, 1) as pages:
            pages.view[:12] = b"not via root"
            async with await session.gntdev.map([(domid, pages.refs[0])]) as mapping:
                return status.capabilities.backend, bytes(mapping.view[:12])


def test_a_broker_that_is_not_root_serves_the_real_devices_with_the_rules_group(device_gid: int) -> None:
    with tempfile.TemporaryDirectory(prefix="gb-") as directory, _nodes_as_the_rule_sets_them(device_gid), \
            _reachable_by_others(sys.executable, str(REPO)):
        os.chown(directory, NOBODY, device_gid)
        socket_path = os.path.join(directory, "broker.sock")

        def as_the_unit_runs_it() -> None:  # User= and SupplementaryGroups=, no capability left
            os.setgroups([device_gid])
            os.setgid(device_gid)
            os.setuid(NOBODY)

        process = subprocess.Popen(
            [sys.executable, "-m", "grant_broker.cli", "--socket", socket_path, "serve", "--backend", "xen", "--grace", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_the_unit_runs_it, cwd=directory,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not os.path.exists(socket_path + ".fds"):
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the broker did not start"
                time.sleep(0.2)
            status_text = Path(f"/proc/{process.pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status_text, re.M)
            capabilities = re.search(r"^CapEff:\s+(\w+)", status_text, re.M)
            assert uids and (int(uids.group(1)), int(uids.group(2))) == (NOBODY, NOBODY)
            assert capabilities and int(capabilities.group(1), 16) == 0
            backend, seen = asyncio.run(_share_and_map(socket_path))
            assert (backend, seen) == ("xen", b"not via root")
        finally:
            if process.poll() is None:
                process.terminate()
            output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output
