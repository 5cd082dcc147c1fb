"""The broker's health as the device plugin sees it: the gRPC health service's Watch stream.

``BrokerHealth.run()`` keeps one ``grpc.health.v1.Health/Watch`` call open on
the broker's socket for the overall service (``""``).  The broker answers
SERVING once both of its sockets listen and NOT_SERVING as soon as it starts
draining (SIGTERM), so a drain shows here at once, not at the next poll.  When
the call fails or ends — the broker exited, crashed, or is not there yet — the
broker counts as not serving and the call is tried again every
``retry_interval`` seconds on a new channel (a channel's own reconnect backoff
grows to minutes; a broker that comes back must be seen within the interval).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)

_WATCH = "/grpc.health.v1.Health/Watch"


class BrokerHealth:
    """Whether the broker serves, and a way to wait for that to change."""

    def __init__(self, socket_path: str, *, retry_interval: float = 1.0) -> None:
        self.socket_path = socket_path
        self.retry_interval = retry_interval
        self._serving = False
        self._version = 0
        self._changed = asyncio.Event()

    @property
    def serving(self) -> bool:
        """The broker's last answer was SERVING and its Watch call is still open."""
        return self._serving

    @property
    def version(self) -> int:
        """Counts the changes of ``serving``; pass it to :meth:`wait_changed`."""
        return self._version

    async def wait_changed(self, version: int) -> None:
        """Return once ``serving`` changed after it was at *version*."""
        while self._version == version:
            changed = self._changed
            await changed.wait()

    def _set(self, serving: bool, why: str) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        self._version += 1
        # Wake every waiter, and give the next ones a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()
        if serving:
            log.info("broker at %s is SERVING: slots healthy", self.socket_path)
        else:
            log.warning("broker at %s is not serving (%s): slots unhealthy", self.socket_path, why)

    async def run(self) -> None:
        """Follow the broker's health until cancelled."""
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            why = "its health stream ended"
            async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
                # The method itself: HealthStub's type stubs declare no methods.
                watch = channel.unary_stream(
                    _WATCH,
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                try:
                    async for reply in watch(request):
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                        self._set(reply.status == health_pb2.HealthCheckResponse.SERVING, f"health {status}")
                except grpc.aio.AioRpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
            self._set(False, why)
            await asyncio.sleep(self.retry_interval)
