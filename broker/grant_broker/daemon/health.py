"""The broker's health as a probe asks it: one gRPC ``grpc.health.v1.Health/Check``.

``grant-broker health`` runs this every few seconds on every node (the probes
of the DaemonSet, a systemd watchdog script), so this module imports grpc, the
health messages and nothing else of the broker: no event loop, no logging
set-up, no session (a session would take a slot and a hello on the fd channel).
"""

from __future__ import annotations

import enum

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Health(enum.Enum):
    """What one check found; the values are the names the probe prints."""

    SERVING = "SERVING"
    #: the broker answers but is draining or stopping (SIGTERM): take it out of rotation
    NOT_SERVING = "NOT_SERVING"
    #: the broker does not know the service that was asked about
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"
    #: the broker answered something else (UNKNOWN, or a gRPC error other than the ones above)
    UNKNOWN = "UNKNOWN"
    #: nothing answered on the socket within the timeout
    UNREACHABLE = "UNREACHABLE"


def check_health(socket_path: str, service: str = "", timeout: float = 2.0) -> tuple[Health, str]:
    """One Health/Check of *service* ("" = the broker as a whole) on the broker
    at *socket_path*: the state and a line saying what was seen."""
    import grpc
    from grpc_health.v1 import health_pb2

    # The states a broker answers, by their number in the health protocol.
    answered = {
        health_pb2.HealthCheckResponse.SERVING: Health.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING: Health.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: Health.SERVICE_UNKNOWN,
    }
    # No retries, no proxy, no waiting for the socket to appear: a probe wants
    # the answer of this moment, and a missing socket is an answer.
    options = [("grpc.enable_retries", 0), ("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"unix:{socket_path}", options=options) as channel:
        # The method itself: HealthStub's type stubs declare no methods.
        check = channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = exc.details() or code.name
            if code == grpc.StatusCode.NOT_FOUND:  # what the health servicer answers for a service it does not know
                return Health.SERVICE_UNKNOWN, f"the broker at {socket_path} knows no service {service!r}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return Health.UNREACHABLE, f"no broker answers on {socket_path} ({code.name}: {details})"
            return Health.UNKNOWN, f"the broker at {socket_path} answered {code.name}: {details}"
    state = answered.get(reply.status, Health.UNKNOWN)
    return state, f"{socket_path}{' service ' + service if service else ''}: {state.value}"
