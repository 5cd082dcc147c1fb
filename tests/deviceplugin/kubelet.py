"""A kubelet stand-in: kubelet's side of the device-plugin API, as the tests need it.

It serves the real ``v1beta1.Registration`` service on ``<directory>/kubelet.sock``
and, like kubelet's device manager, answers a Register at once and then dials
the plugin's endpoint in the background: it asks ``GetDevicePluginOptions`` and
keeps a ``ListAndWatch`` stream open, queueing every device list it is sent.
``plugin()`` gives a stub on the registered endpoint for the calls kubelet makes
later (``Allocate``).  ``stop(restart=True)`` does what a kubelet restart does to
the directory: its socket and every plugin socket go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import grpc

from grant_broker.deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

KUBELET_SOCKET = "kubelet.sock"
TIMEOUT = 20.0


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(self, directory: Path, *, refuse: str | None = None) -> None:
        self.directory = directory
        self.refuse = refuse
        self.registrations: asyncio.Queue[api_pb2.RegisterRequest] = asyncio.Queue()
        self.options: asyncio.Queue[api_pb2.DevicePluginOptions] = asyncio.Queue()
        self.updates: asyncio.Queue[api_pb2.ListAndWatchResponse] = asyncio.Queue()
        self.endpoint: str | None = None
        self._server: grpc.aio.Server | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._followers: list[asyncio.Task[None]] = []

    @property
    def socket(self) -> Path:
        return self.directory / KUBELET_SOCKET

    async def start(self) -> "FakeKubelet":
        server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        self._server = server
        return self

    async def Register(self, request: api_pb2.RegisterRequest, context: Any) -> api_pb2.Empty:
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.UNKNOWN, self.refuse)
        if request.version != "v1beta1":
            await context.abort(grpc.StatusCode.UNKNOWN, f"unsupported API version {request.version!r}")
        self.endpoint = request.endpoint
        await self.registrations.put(request)
        self._followers.append(asyncio.get_running_loop().create_task(self._follow(request.endpoint)))
        return api_pb2.Empty()

    def plugin(self) -> Any:
        """A DevicePlugin stub on the endpoint registered last."""
        assert self.endpoint is not None, "nothing registered"
        channel = grpc.aio.insecure_channel(f"unix:{self.directory / self.endpoint}")
        self._channels.append(channel)
        return api_pb2_grpc.DevicePluginStub(channel)

    async def _follow(self, endpoint: str) -> None:
        stub = api_pb2_grpc.DevicePluginStub(self._channel(endpoint))
        await self.options.put(await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT))
        with contextlib.suppress(grpc.aio.AioRpcError):  # the plugin went away
            async for update in stub.ListAndWatch(api_pb2.Empty()):
                await self.updates.put(update)

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"unix:{self.directory / endpoint}")
        self._channels.append(channel)
        return channel

    async def next_registration(self) -> api_pb2.RegisterRequest:
        return await asyncio.wait_for(self.registrations.get(), TIMEOUT)

    async def next_update(self) -> api_pb2.ListAndWatchResponse:
        return await asyncio.wait_for(self.updates.get(), TIMEOUT)

    async def health_becomes(self, health: str) -> api_pb2.ListAndWatchResponse:
        """The first device list (from now on) whose devices all have *health*."""
        while True:
            update = await self.next_update()
            if {device.health for device in update.devices} == {health}:
                return update

    async def stop(self, *, restart: bool = False) -> None:
        """Stop serving; with *restart*, also clear the directory as a starting kubelet does."""
        for task in self._followers:
            task.cancel()
        for task in self._followers:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        for channel in self._channels:
            await channel.close()
        if self._server is not None:
            await self._server.stop(grace=None)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        if restart:
            for entry in self.directory.iterdir():
                if stat.S_ISSOCK(os.lstat(entry).st_mode):
                    entry.unlink()
