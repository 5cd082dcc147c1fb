"""The systemd unit's hardening as the other deploy files see it (users, groups, the udev rule), and its
system-call filter checked against the system calls the broker really makes (traced with strace while
clients use it).  Its rating by ``systemd-analyze security``: test_tools.py."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import grant_broker_client

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "grant-broker.service"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (make test installs it: see the Makefile)"
    return path


def _unit_directives(name: str) -> list[str]:
    values: list[str] = []
    for line in UNIT.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and key.strip() == name:
            values.append(value.strip())
    return values


def test_the_unit_runs_the_broker_without_root_or_capabilities() -> None:
    assert _unit_directives("User") == ["grant-broker"]
    assert _unit_directives("CapabilityBoundingSet") == [""]
    assert _unit_directives("AmbientCapabilities") == [""]


def test_the_users_and_groups_the_unit_names_are_made_by_its_sysusers_file() -> None:
    made = set()
    for line in (REPO / "deploy" / "systemd" / "grant-broker.sysusers").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("u", "g"):
            made.add(fields[1])
    named = set(_unit_directives("User")) | set(_unit_directives("Group"))
    named |= {group for line in _unit_directives("SupplementaryGroups") for group in line.split()}
    assert named <= made


def test_the_udev_rule_gives_every_device_the_unit_allows_to_the_units_group() -> None:
    rule = (REPO / "deploy" / "systemd" / "70-grant-broker.rules").read_text()
    [line] = [line for line in rule.splitlines() if line and not line.startswith("#")]
    devnames = re.search(r'ENV\{DEVNAME\}=="([^"]+)"', line)
    group = re.search(r'GROUP="([^"]+)"', line)
    assert devnames and group
    allowed = {value.split()[0] for value in _unit_directives("DeviceAllow")}
    assert set(devnames.group(1).split("|")) == allowed
    assert group.group(1) in _unit_directives("SupplementaryGroups")


# ----------------------------------------------------------- the system-call filter


def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd system-call group (``@name``), its nested groups expanded."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    listing = subprocess.run([_tool("systemd-analyze"), "syscall-filter", group], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        calls |= _expand(name, seen) if name.startswith("@") else {name}
    return calls


def _allowed_by_the_unit() -> set[str]:
    allowed: set[str] = set()
    for value in _unit_directives("SystemCallFilter"):
        denied = value.startswith("~")
        names = value.lstrip("~").split()
        calls = set().union(*(_expand(name) if name.startswith("@") else {name} for name in names))
        allowed = allowed - calls if denied else allowed | calls
    return allowed


async def _use_the_broker(socket_path: str) -> None:
    """What clients do: share, map, write and read, event channels, grant copy, status."""
    async with await grant_broker_client.connect(socket_path, domid=1) as sharer, \
            await grant_broker_client.connect(socket_path, domid=2) as mapper:
        async with await sharer.gntalloc.share(2, 2) as pages:
            pages.view[:5] = b"hello"
            async with await mapper.gntdev.map([(1, ref) for ref in pages.refs]) as mapping:
                assert bytes(mapping.view[:5]) == b"hello"
        port = await sharer.evtchn.bind_unbound_port(2)
        remote = await mapper.evtchn.bind_interdomain(1, port)
        async with mapper.evtchn.subscribe(ports=[remote]) as events:
            await sharer.evtchn.notify(port)
            async with asyncio.timeout(30):
                await anext(aiter(events))


def test_the_system_call_filter_allows_every_call_the_broker_makes() -> None:
    strace = _tool("strace")
    allowed = _allowed_by_the_unit()
    assert "ioctl" in allowed and "setrlimit" not in allowed  # the filter was read
    with tempfile.TemporaryDirectory(prefix="gb-") as directory:
        socket_path = os.path.join(directory, "broker.sock")
        trace = os.path.join(directory, "trace")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def as_the_unit_starts_it() -> None:  # LimitNOFILE= sets soft = hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        process = subprocess.Popen(
            [strace, "-f", "-qq", "-o", trace, sys.executable, "-m", "grant_broker.cli", "--socket", socket_path,
             "serve", "--backend", "emulated", "--grace", "1", "--audit", "stderr"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=as_the_unit_starts_it,
        )
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(socket_path + ".fds"):
                assert process.poll() is None and time.monotonic() < deadline, "the broker did not start under strace"
                time.sleep(0.1)
            asyncio.run(_use_the_broker(socket_path))
            # SIGTERM to the broker itself (strace would detach from it): its drain is traced too.
            [broker_pid] = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            os.kill(int(broker_pid), signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        made = set()
        for line in Path(trace).read_text().splitlines():
            found = re.match(r"\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]", line)
            if found and found.group(1) not in ("exited", "killed", "resumed"):
                made.add(found.group(1))
    assert len(made) > 30, f"too few system calls traced: {sorted(made)}"
    # execve is the tracer starting the interpreter (systemd execs before the filter applies).
    assert made - allowed - {"execve"} == set()
