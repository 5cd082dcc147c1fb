"""The broker's health as the device plugin sees it: a Watch stream, and Checks that the broker answers.

``BrokerHealth.run()`` keeps one ``grpc.health.v1.Health/Watch`` call open on
the broker's socket for the overall service (``""``).  The broker answers
SERVING once both of its sockets listen and NOT_SERVING as soon as it starts
draining (SIGTERM), so a drain shows here at once, not at the next poll.  When
the call fails or ends — the broker exited, crashed, or is not there yet — the
broker counts as not serving and the call is tried again every
``retry_interval`` seconds on a new channel (a channel's own reconnect backoff
grows to minutes; a broker that comes back must be seen within the interval).

A broker that hangs — its event loop stuck, or the process stopped (SIGSTOP) —
is not seen by the Watch: the call neither ends nor answers, as silent as a
broker with nothing new to say.  HTTP/2 keepalive does not tell either: the
pings are answered by gRPC's C core on threads of its own, which go on while
the Python loop is stuck (seen with grpcio 1.85: a server whose loop slept 12 s
answered every 1 s ping).  So while the Watch is open, every
``probe_interval`` seconds the broker is asked a unary ``Health/Check`` on the
same channel, which only the broker's loop can answer, with a deadline of
``probe_timeout`` seconds.  A Check unanswered in time, or failed, makes the
broker not serving until it answers again (a later Check, or any message on
the Watch); what it serves is the Watch's word throughout.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)

_WATCH = "/grpc.health.v1.Health/Watch"
_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING

# Health/Check as a method of the channel.
_Check = grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


class BrokerHealth:
    """Whether the broker serves, and a way to wait for that to change.

    Args:
        socket_path: the broker's gRPC socket.
        retry_interval: seconds between tries to open the Watch when there is none.
        probe_interval: seconds between the Checks made while the Watch is open.
        probe_timeout: seconds a Check may take before the broker counts as hung.
    """

    def __init__(
        self, socket_path: str, *, retry_interval: float = 1.0, probe_interval: float = 10.0, probe_timeout: float = 5.0
    ) -> None:
        self.socket_path = socket_path
        self.retry_interval = retry_interval
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._serving = False
        self._version = 0
        self._changed = asyncio.Event()
        # The two halves of ``serving``: what the Watch said last, and whether
        # the broker answered its last Check (or has sent on the Watch since).
        self._watched = False
        self._answering = True

    @property
    def serving(self) -> bool:
        """The broker's Watch call is open, its last answer was SERVING, and it answered its last health check."""
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

    def _update(self, why: str) -> None:
        self._set(self._watched and self._answering, why)

    async def run(self) -> None:
        """Follow the broker's health until cancelled."""
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            why = "its health stream ended"
            async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
                # The methods themselves: HealthStub's type stubs declare no methods.
                watch = channel.unary_stream(
                    _WATCH,
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                check: _Check = channel.unary_unary(
                    _CHECK,
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                self._watched, self._answering = False, True
                probe = asyncio.get_running_loop().create_task(self._probe(check, request))
                try:
                    async for reply in watch(request):
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                        # A message on the Watch is an answer too: the broker's loop runs.
                        self._watched, self._answering = reply.status == _SERVING, True
                        self._update(f"health {status}")
                except grpc.aio.AioRpcError as exc:
                    why = f"{exc.code().name}: {exc.details()}"
                finally:
                    await _cancel(probe)
            self._watched = False
            self._update(why)
            await asyncio.sleep(self.retry_interval)

    async def _probe(self, check: _Check, request: health_pb2.HealthCheckRequest) -> None:
        """Ask the broker a Check every ``probe_interval`` seconds, as long as the Watch is open."""
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                reply = await check(request, timeout=self.probe_timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    why = f"no answer to a health check within {self.probe_timeout:g} s: the broker is hung"
                else:
                    why = f"its health check failed: {exc.code().name}: {exc.details()}"
                self._answering = False
                self._update(why)
                continue
            # Only that it answered counts here: the state is the Watch's, which
            # says a drain (NOT_SERVING) at once, where a Check answered just
            # before the drain could arrive after it.
            self._answering = True
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            self._update(f"health {status}")


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel *task* and wait until it ends, so that none outlives its Watch.

    Its CancelledError is swallowed unless this task is being cancelled itself
    (then it is that cancellation's, and must go on).
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
