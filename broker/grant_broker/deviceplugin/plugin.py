"""The device plugin: kubelet's DevicePlugin service, registration, and its life across restarts.

kubelet's side of the protocol (``v1beta1``): kubelet serves ``Registration``
on ``<kubelet dir>/kubelet.sock``; a plugin serves ``DevicePlugin`` on a socket
of its own in the same directory, then calls ``Register`` with that socket's
name and its resource; kubelet dials back, asks ``GetDevicePluginOptions`` and
keeps a ``ListAndWatch`` stream open, and calls ``Allocate`` for each container
given some of the resource's devices before that container is created.  When
kubelet restarts it removes every socket in the directory but its checkpoint
and makes a new ``kubelet.sock``: a plugin notices (its socket is gone) and
starts over.

Here a *device* is a slot of the broker: any number of pods may share the one
broker, and the number of slots caps how many containers of the node may ask
for it.  Every slot is Healthy exactly while the broker's health says SERVING
(:mod:`.health`).  ``Allocate`` gives each container the broker's socket
directory, read-only (connecting to a Unix socket needs no write access to the
mount; the container cannot replace the sockets), and ``GRANT_BROKER_SOCKET``
naming the socket in it, the variable the SDK and the CLI read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from grant_broker.deviceplugin.health import BrokerHealth
from grant_broker.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from grant_broker_protocol.endpoints import SOCKET_ENVIRONMENT
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.unix_paths import claim_unix_path

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
"""The device-plugin API version this plugin speaks (RegisterRequest.version)."""

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_RESOURCE = "grant-broker.io/broker"
DEFAULT_ENDPOINT = "grant-broker.sock"
DEFAULT_SLOTS = 100

_OPTIONS = api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=False)

# An extended resource: a DNS subdomain as its prefix, then a name of letters,
# digits, '-', '_' and '.' that begins and ends with a letter or digit.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_RESOURCE_NAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

_OPERATION = "device plugin"


@dataclass(frozen=True)
class PluginConfig:
    """What ``grant-broker device-plugin`` is told on its command line."""

    broker_socket: str
    """The broker's gRPC socket, as this process sees it (its health is watched there)."""
    resource_name: str = DEFAULT_RESOURCE
    slots: int = DEFAULT_SLOTS
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    endpoint: str = DEFAULT_ENDPOINT
    """The name of this plugin's socket in ``kubelet_dir``."""
    host_socket_dir: str | None = None
    """The broker's socket directory on the host, which kubelet mounts into client containers
    (default: the directory of ``broker_socket``, right when this container mounts it at the host's path)."""
    container_socket_dir: str | None = None
    """Where client containers see that directory (default: the same path as on the host)."""
    poll_interval: float = 1.0
    """How often kubelet's directory is looked at, and how soon a missing broker or kubelet is tried again."""
    probe_interval: float = 10.0
    """How often the broker, while its health stream is open, is asked a health check (:mod:`.health`)."""
    probe_timeout: float = 5.0
    """How long a health check may go unanswered before the broker counts as hung."""
    register_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not _RESOURCE_NAME.match(self.resource_name) or len(self.resource_name) > 253:
            self._refuse(f"resource name {self.resource_name!r} is not DOMAIN/NAME (e.g. {DEFAULT_RESOURCE})")
        if self.slots < 1:
            self._refuse(f"slots must be at least 1, not {self.slots}")
        if not self.endpoint or "/" in self.endpoint or self.endpoint == KUBELET_SOCKET:
            self._refuse(f"endpoint {self.endpoint!r} must be a file name in the kubelet directory, other than {KUBELET_SOCKET}")
        for name, path in (("host socket directory", self.host_dir), ("container socket directory", self.container_dir)):
            if not os.path.isabs(path):
                self._refuse(f"the {name} {path!r} must be an absolute path")
        if self.poll_interval <= 0:
            self._refuse(f"the poll interval must be positive, not {self.poll_interval}")
        # Written so that NaN fails too; an infinite wait is no probe at all.
        for name, seconds in (("probe interval", self.probe_interval), ("probe timeout", self.probe_timeout)):
            if not (0 < seconds < math.inf):
                self._refuse(f"the {name} must be a positive number of seconds, not {seconds}")

    @staticmethod
    def _refuse(detail: str) -> None:
        """Bad settings are bad input (ValueError): the CLI exits with its usage status."""
        raise ValueError(detail)

    @property
    def host_dir(self) -> str:
        return self.host_socket_dir or os.path.dirname(os.path.abspath(self.broker_socket))

    @property
    def container_dir(self) -> str:
        return self.container_socket_dir or self.host_dir

    @property
    def container_socket(self) -> str:
        """``GRANT_BROKER_SOCKET`` in client containers."""
        return os.path.join(self.container_dir, os.path.basename(self.broker_socket))

    @property
    def endpoint_path(self) -> str:
        return os.path.join(self.kubelet_dir, self.endpoint)

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.kubelet_dir, KUBELET_SOCKET)

    def device_ids(self) -> list[str]:
        return [f"slot-{index}" for index in range(self.slots)]


class DevicePluginService(api_pb2_grpc.DevicePluginServicer):
    """kubelet's DevicePlugin service over the broker's slots."""

    def __init__(self, config: PluginConfig, health: BrokerHealth) -> None:
        self._config = config
        self._health = health
        self._ids = config.device_ids()
        self._known = frozenset(self._ids)

    def devices(self) -> api_pb2.ListAndWatchResponse:
        """Every slot, all Healthy or all Unhealthy, as the broker's health is now."""
        health = HEALTHY if self._health.serving else UNHEALTHY
        return api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(ID=each, health=health) for each in self._ids])

    async def GetDevicePluginOptions(self, request: api_pb2.Empty, context: Any) -> api_pb2.DevicePluginOptions:
        return _OPTIONS

    async def ListAndWatch(self, request: api_pb2.Empty, context: Any) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        # The whole list now, then again at each change of the broker's health,
        # until kubelet hangs up or this server stops (both cancel the generator).
        while True:
            version = self._health.version
            yield self.devices()
            await self._health.wait_changed(version)

    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: Any
    ) -> api_pb2.PreferredAllocationResponse:
        # Slots are all alike: the ones that must be included, then the first available.
        responses = []
        for container in request.container_requests:
            chosen = list(dict.fromkeys(container.must_include_deviceIDs))
            chosen += [each for each in container.available_deviceIDs if each not in chosen]
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen[: max(container.allocation_size, 0)]))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(self, request: api_pb2.AllocateRequest, context: Any) -> api_pb2.AllocateResponse:
        responses = []
        for container in request.container_requests:
            unknown = sorted(set(container.devices_ids) - self._known)
            if unknown:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{', '.join(unknown)}: not devices of {self._config.resource_name} (slot-0..slot-{len(self._ids) - 1})",
                )
            responses.append(
                api_pb2.ContainerAllocateResponse(
                    envs={SOCKET_ENVIRONMENT: self._config.container_socket},
                    mounts=[
                        api_pb2.Mount(
                            container_path=self._config.container_dir, host_path=self._config.host_dir, read_only=True
                        )
                    ],
                )
            )
        return api_pb2.AllocateResponse(container_responses=responses)

    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: Any
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


_Identity = tuple[int, int]


def _identity(path: str) -> _Identity | None:
    """Which file *path* is now (device, inode), or None when there is none."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class DevicePlugin:
    """One plugin: serve, register, and start over whenever kubelet does.

    ``registrations`` counts the successful Register calls (1 plus one per
    kubelet restart seen).
    """

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.health = BrokerHealth(
            config.broker_socket, retry_interval=config.poll_interval,
            probe_interval=config.probe_interval, probe_timeout=config.probe_timeout,
        )
        self.service = DevicePluginService(config, self.health)
        self.registrations = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Run until *stop* is set.

        Raises:
            BrokerError: kubelet refused the registration (kubelet's device
                manager expects a refused plugin to exit), or the plugin's
                socket cannot be made.
        """
        health = asyncio.get_running_loop().create_task(self.health.run())
        try:
            while not stop.is_set():
                async with self._serving() as own:
                    kubelet = await self._register(stop)
                    if kubelet is None:
                        break
                    await self._until_kubelet_restarts(own, kubelet, stop)
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[_Identity]:
        """The DevicePlugin service on our socket in kubelet's directory; yields the socket's identity."""
        path = self.config.endpoint_path
        # A socket left by a plugin that died is removed; a live one — another
        # plugin serving this endpoint — is not taken over.
        await asyncio.to_thread(claim_unix_path, path, socket.SOCK_STREAM, _OPERATION, "another device plugin")
        server = grpc.aio.server()
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.service, server)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise BrokerError(errno.EADDRNOTAVAIL, _OPERATION, f"cannot listen on {path}: {exc}") from None
        await server.start()
        own = _identity(path)
        try:
            if own is None:
                raise BrokerError(errno.ENOENT, _OPERATION, f"{path} vanished as soon as it was made")
            yield own
        finally:
            await server.stop(grace=None)
            # Only our own socket: kubelet may have removed it and someone made another.
            if _identity(path) == own:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _register(self, stop: asyncio.Event) -> _Identity | None:
        """Register with kubelet, trying again while it is not there; kubelet.sock's identity then,
        or None when *stop* was set first."""
        config = self.config
        request = api_pb2.RegisterRequest(
            version=API_VERSION, endpoint=config.endpoint, resource_name=config.resource_name, options=_OPTIONS
        )
        waiting_logged = False
        while not stop.is_set():
            async with grpc.aio.insecure_channel(f"unix:{config.kubelet_socket}") as channel:
                try:
                    await api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=config.register_timeout)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        # Refused, not a passing fault: kubelet's device manager expects the plugin to exit.
                        raise BrokerError(
                            errno.EPERM, _OPERATION,
                            f"kubelet at {config.kubelet_socket} refused to register {config.resource_name}: "
                            f"{exc.details()} ({exc.code().name})",
                        ) from None
                    if not waiting_logged:
                        log.info("waiting for kubelet at %s (%s)", config.kubelet_socket, exc.code().name)
                        waiting_logged = True
                else:
                    kubelet = _identity(config.kubelet_socket)
                    if kubelet is not None:
                        self.registrations += 1
                        log.info(
                            "registered %s (%d slots, endpoint %s) with kubelet at %s; clients get %s=%s",
                            config.resource_name, config.slots, config.endpoint, config.kubelet_socket,
                            SOCKET_ENVIRONMENT, config.container_socket,
                        )
                        return kubelet
            await _wait(stop, config.poll_interval)
        return None

    async def _until_kubelet_restarts(self, own: _Identity, kubelet: _Identity, stop: asyncio.Event) -> None:
        """Return when *stop* is set, or when kubelet restarted: it removed our socket or made a new kubelet.sock."""
        config = self.config
        while not await _wait(stop, config.poll_interval):
            if _identity(config.endpoint_path) != own:
                log.warning("%s was removed (kubelet restarted): registering again", config.endpoint_path)
                return
            if _identity(config.kubelet_socket) != kubelet:
                log.warning("%s is a new socket (kubelet restarted): registering again", config.kubelet_socket)
                return


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep *seconds* or until *stop* is set; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def run_until_signal(config: PluginConfig, ready: Callable[[DevicePlugin], None] | None = None) -> None:
    """Run a plugin until SIGTERM/SIGINT; it then stops serving and removes its socket."""
    plugin = DevicePlugin(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if ready is not None:
            ready(plugin)
        await plugin.run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
