"""The container image builds here, with no image registry (deploy/container/build-image:
a debootstrap base, the project's wheels), and the broker in it serves the host
through the socket directory mounted from the host, as the DaemonSet runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import grant_broker_client
from grant_broker.cli import EXIT_OK, EXIT_UNREACHABLE

from .conftest import DEPLOY, grant_broker, tool

# The first test also builds the image: on a new machine its base too (debootstrap, a minute or two).
pytestmark = pytest.mark.timeout(1200)

IMAGE = "localhost/grant-broker:test"
# A sandboxed engine (CI's) may not raise a container's limits above its own
# (EPERM from setrlimit); the broker needs far fewer than an engine's defaults.
LIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=16384:16384"]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # runc: crun refuses the hybrid cgroup hierarchy of some hosts (CI's among them).
    return subprocess.run([tool("podman"), "--runtime", tool("runc"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    for name in ("buildah", "podman", "debootstrap", "runc"):
        tool(name)
    if os.geteuid() != 0:
        pytest.skip("building and running the image here needs root (debootstrap, podman's rootful store)")
    # The first build makes the base with debootstrap (a minute or two); later ones reuse it and pip's cache.
    result = subprocess.run([str(DEPLOY / "container" / "build-image"), IMAGE], capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    return IMAGE


class Container:
    def __init__(self, name: str, sockets: Path) -> None:
        self.name = name
        self.socket = sockets / "broker.sock"

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr


@pytest.fixture
def container(image: str, short_tmp: Path) -> Iterator[Container]:
    """The image's broker (emulated hypervisor) with the host's *short_tmp* as its /run/grant-broker."""
    short_tmp.chmod(0o755)
    running = Container(f"grant-broker-test-{uuid.uuid4().hex[:8]}", short_tmp)
    # As the DaemonSet runs it: a read-only root, no network, the socket directory from the host.
    started = podman("run", "--detach", "--name", running.name, "--read-only", "--network=none", *LIMITS,
                     "--volume", f"{short_tmp}:/run/grant-broker", image, "serve", "--backend", "emulated", "--grace", "1")
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        while grant_broker("--socket", str(running.socket), "health").returncode != EXIT_OK:
            assert time.monotonic() < deadline, f"the broker in the image did not become healthy:\n{running.logs()}"
            time.sleep(0.2)
        yield running
    finally:
        podman("stop", "--time", "10", running.name)
        podman("rm", "--force", running.name)


def test_the_broker_in_the_image_is_healthy_for_the_host(container: Container) -> None:
    result = grant_broker("--socket", str(container.socket), "health")
    assert (result.returncode, result.stdout.strip()) == (EXIT_OK, "SERVING"), result.stderr


def test_the_probe_command_runs_in_the_image(container: Container) -> None:
    """What the DaemonSet's probes run, inside the container."""
    result = podman("exec", container.name, "grant-broker", "--socket", "/run/grant-broker/broker.sock", "health")
    assert (result.returncode, result.stdout.strip()) == (EXIT_OK, "SERVING"), result.stderr


async def test_the_hosts_sdk_maps_a_grant_through_the_broker_in_the_image(container: Container) -> None:
    path = str(container.socket)
    async with await grant_broker_client.connect(path, domid=1) as guest, \
               await grant_broker_client.connect(path, domid=2) as host:
        pages = await guest.gntalloc.share(host.domid, count=1)
        async with pages:
            pages.view[:21] = b"from the host, mapped"
            mapping = await host.gntdev.map([(guest.domid, pages.refs[0])])
            async with mapping:
                assert bytes(mapping.view[:21]) == b"from the host, mapped"


def test_stopping_the_container_drains_the_broker_and_removes_its_sockets(container: Container) -> None:
    stopped = podman("stop", "--time", "10", container.name)
    assert stopped.returncode == 0, stopped.stderr
    assert podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip() == "0", container.logs()
    assert not container.socket.exists() and not Path(f"{container.socket}.fds").exists()
    assert grant_broker("--socket", str(container.socket), "health").returncode == EXIT_UNREACHABLE
