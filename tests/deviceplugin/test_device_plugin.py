"""``grant-broker device-plugin`` against a kubelet stand-in and a real broker process.

The plugin runs as its own process, as in the DaemonSet; the stand-in
(kubelet.py) serves kubelet's real Registration service on a Unix socket and
calls the plugin's real DevicePlugin service over gRPC.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from grant_broker.cli import EXIT_REFUSED, EXIT_USAGE
from grant_broker.deviceplugin.v1beta1 import api_pb2

from .conftest import Brokers, Plugins
from .kubelet import FakeKubelet

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


async def test_registers_its_resource_with_kubelet(kubelet: FakeKubelet, plugins: Plugins, kubelet_dir: Path) -> None:
    await plugins.start()
    registration = await kubelet.next_registration()
    assert registration.version == "v1beta1"
    assert registration.resource_name == "grant-broker.io/broker"
    assert registration.endpoint == "grant-broker.sock"
    assert stat.S_ISSOCK(os.lstat(kubelet_dir / "grant-broker.sock").st_mode)


async def test_registers_the_resource_and_endpoint_it_is_given(kubelet: FakeKubelet, plugins: Plugins) -> None:
    await plugins.start("--resource", "example.org/xen-broker", "--endpoint", "xen-broker.sock")
    registration = await kubelet.next_registration()
    assert (registration.resource_name, registration.endpoint) == ("example.org/xen-broker", "xen-broker.sock")


async def test_options_ask_for_neither_pre_start_nor_preferred_allocation(kubelet: FakeKubelet, plugins: Plugins) -> None:
    await plugins.start()
    registration = await kubelet.next_registration()
    options = await asyncio.wait_for(kubelet.options.get(), 20)
    assert (options.pre_start_required, options.get_preferred_allocation_available) == (False, False)
    assert registration.options == options


async def test_advertises_the_configured_number_of_slots(kubelet: FakeKubelet, plugins: Plugins) -> None:
    await plugins.start("--slots", "7")
    update = await kubelet.next_update()
    ids = [device.ID for device in update.devices]
    assert len(ids) == len(set(ids)) == 7
    assert all(0 < len(each) <= 63 for each in ids)


async def test_slots_are_unhealthy_while_no_broker_serves(kubelet: FakeKubelet, plugins: Plugins) -> None:
    await plugins.start()
    update = await kubelet.next_update()
    assert {device.health for device in update.devices} == {UNHEALTHY}


async def test_slots_turn_healthy_when_the_broker_serves(kubelet: FakeKubelet, plugins: Plugins, brokers: Brokers) -> None:
    await plugins.start()
    await kubelet.health_becomes(UNHEALTHY)
    await brokers.start()
    update = await kubelet.health_becomes(HEALTHY)
    assert len(update.devices) == 4


async def test_slots_turn_unhealthy_when_the_broker_is_sent_sigterm(
    kubelet: FakeKubelet, plugins: Plugins, brokers: Brokers
) -> None:
    await brokers.start()
    await plugins.start()
    await kubelet.health_becomes(HEALTHY)
    await brokers.stop(signal.SIGTERM)
    update = await kubelet.health_becomes(UNHEALTHY)
    assert len(update.devices) == 4


async def test_slots_turn_unhealthy_while_the_broker_is_stopped_and_healthy_when_it_continues(
    kubelet: FakeKubelet, plugins: Plugins, brokers: Brokers
) -> None:
    # A stopped broker (SIGSTOP) keeps its health stream open and never answers
    # again: only the plugin's health checks, unanswered, can tell.
    broker = await brokers.start()
    await plugins.start("--probe-interval", "0.5", "--probe-timeout", "0.5")
    await kubelet.health_becomes(HEALTHY)
    try:
        broker.process.send_signal(signal.SIGSTOP)
        update = await asyncio.wait_for(kubelet.health_becomes(UNHEALTHY), 10)
        assert len(update.devices) == 4
    finally:
        broker.process.send_signal(signal.SIGCONT)  # or the teardown's SIGTERM would never be handled
    update = await asyncio.wait_for(kubelet.health_becomes(HEALTHY), 10)
    assert len(update.devices) == 4


async def test_survives_a_broker_restart(kubelet: FakeKubelet, plugins: Plugins, brokers: Brokers) -> None:
    await brokers.start()
    plugin = await plugins.start()
    await kubelet.health_becomes(HEALTHY)
    await brokers.stop(signal.SIGKILL)
    await kubelet.health_becomes(UNHEALTHY)
    await brokers.start()
    await kubelet.health_becomes(HEALTHY)
    assert plugin.running
    assert kubelet.registrations.qsize() == 1  # the same registration and stream throughout


async def test_allocate_answers_each_container_with_the_socket_directory_and_variable(
    kubelet: FakeKubelet, plugins: Plugins, broker_socket: Path
) -> None:
    await plugins.start("--container-socket-dir", "/run/grant-broker")
    await kubelet.next_registration()
    ids = [device.ID for device in (await kubelet.next_update()).devices]
    request = api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=[each]) for each in ids[:3]]
    )
    response = await kubelet.plugin().Allocate(request, timeout=20)
    assert len(response.container_responses) == 3
    for container in response.container_responses:
        assert dict(container.envs) == {"GRANT_BROKER_SOCKET": "/run/grant-broker/broker.sock"}
        (mount,) = container.mounts
        assert (mount.host_path, mount.container_path, mount.read_only) == (str(broker_socket.parent), "/run/grant-broker", True)
        assert not container.devices


async def test_allocate_refuses_devices_it_does_not_have(kubelet: FakeKubelet, plugins: Plugins) -> None:
    await plugins.start()
    await kubelet.next_registration()
    request = api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=["gpu-0"])])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kubelet.plugin().Allocate(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpu-0" in (refused.value.details() or "")


async def test_an_allocated_container_reaches_the_broker_through_its_variable(
    kubelet: FakeKubelet, plugins: Plugins, brokers: Brokers
) -> None:
    # Here the container's paths are the host's (the default), so the variable works as it is.
    await brokers.start()
    await plugins.start()
    await kubelet.next_registration()
    ids = [device.ID for device in (await kubelet.health_becomes(HEALTHY)).devices]
    request = api_pb2.AllocateRequest(container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids[:1])])
    (container,) = (await kubelet.plugin().Allocate(request, timeout=20)).container_responses
    env = {key: value for key, value in os.environ.items() if key != "GRANT_BROKER_SOCKET"} | dict(container.envs)
    status = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "grant_broker.cli", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr


async def test_registers_again_after_kubelet_restarts(kubelet: FakeKubelet, plugins: Plugins, kubelet_dir: Path) -> None:
    plugin = await plugins.start()
    await kubelet.next_registration()
    await kubelet.next_update()
    await kubelet.stop(restart=True)
    restarted = await FakeKubelet(kubelet_dir).start()
    try:
        registration = await restarted.next_registration()
        assert registration.endpoint == "grant-broker.sock"
        update = await restarted.next_update()
        assert len(update.devices) == 4
        assert plugin.running
    finally:
        await restarted.stop()


async def test_waits_for_kubelet_to_come_up(kubelet_dir: Path, plugins: Plugins) -> None:
    plugin = await plugins.start()
    await asyncio.sleep(0.5)  # several tries find no kubelet.sock
    late = await FakeKubelet(kubelet_dir).start()
    try:
        await late.next_registration()
        assert plugin.running
    finally:
        await late.stop()


async def test_exits_when_kubelet_refuses_the_registration(kubelet_dir: Path, plugins: Plugins) -> None:
    refusing = await FakeKubelet(kubelet_dir, refuse="resource name already registered").start()
    try:
        plugin = await plugins.start()
        assert await plugin.exited() == EXIT_REFUSED
        assert "resource name already registered" in await plugin.output()
    finally:
        await refusing.stop()


async def test_sigterm_stops_it_and_removes_its_socket(kubelet: FakeKubelet, plugins: Plugins, kubelet_dir: Path) -> None:
    plugin = await plugins.start()
    await kubelet.next_registration()
    assert await plugin.stop(signal.SIGTERM) == 0
    assert not (kubelet_dir / "grant-broker.sock").exists()


def test_bad_settings_are_refused_as_bad_input(kubelet_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "device-plugin", "--kubelet-dir", str(kubelet_dir), "--slots", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert "slots must be at least 1" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "refusal"),
    [
        ("--probe-interval", "0", "the probe interval must be a positive number of seconds"),
        ("--probe-interval", "nan", "the probe interval must be a positive number of seconds"),
        ("--probe-timeout", "-1", "the probe timeout must be a positive number of seconds"),
        ("--probe-timeout", "inf", "the probe timeout must be a positive number of seconds"),
    ],
)
def test_probe_settings_that_are_not_positive_seconds_are_refused_as_bad_input(
    kubelet_dir: Path, option: str, value: str, refusal: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "device-plugin", "--kubelet-dir", str(kubelet_dir), option, value],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert refusal in result.stderr


async def test_a_socket_left_by_a_dead_plugin_is_replaced(kubelet: FakeKubelet, plugins: Plugins, kubelet_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(kubelet_dir / "grant-broker.sock"))
    stale.close()  # the file stays, nobody accepts on it
    plugin = await plugins.start()
    registration = await kubelet.next_registration()
    assert registration.endpoint == "grant-broker.sock" and plugin.running


async def test_a_second_plugin_does_not_take_over_a_live_endpoint(
    kubelet: FakeKubelet, plugins: Plugins, kubelet_dir: Path
) -> None:
    first = await plugins.start()
    await kubelet.next_registration()
    endpoint = kubelet_dir / "grant-broker.sock"
    identity = endpoint.stat().st_ino
    second = await plugins.start()
    assert await second.exited() != 0
    assert "another device plugin is serving" in await second.output()
    assert first.running and endpoint.stat().st_ino == identity  # the first one's socket, untouched
