"""The broker's health as a probe asks it: one gRPC ``grpc.health.v1.Health/Check``.

``grant-broker health`` runs this every few seconds on every node (the probes
of the DaemonSet, scripts), so what it costs is paid all the time.  Importing
grpc alone costs about 0.1 CPU-second (it brings asyncio and its Cython core),
several times the check itself; so the usual answer is read without it: the
check is one unary call, which is a handful of HTTP/2 frames on the Unix
socket (the request and the answer are one field each of the health
protocol's messages).  Whenever that answer is not a plain one — the call
failed (the service is unknown, the broker refused it), the connection
ended early, a frame was unexpected — the same check is made again through
grpc itself, which reads the call's status precisely.  No session is opened
(a session would take a slot and a hello on the fd channel).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import time

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


# grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
_SERVING_STATUS = {0: Health.UNKNOWN, 1: Health.SERVING, 2: Health.NOT_SERVING, 3: Health.SERVICE_UNKNOWN}


def check_health(socket_path: str, service: str = "", timeout: float = 2.0) -> tuple[Health, str]:
    """One Health/Check of *service* ("" = the broker as a whole) on the broker
    at *socket_path*: the state and a line saying what was seen."""
    deadline = time.monotonic() + timeout
    try:
        status = _ask(socket_path, service, deadline)
    except TimeoutError:
        return Health.UNREACHABLE, f"no broker answers on {socket_path} within {timeout:g} s"
    except OSError as exc:
        return Health.UNREACHABLE, f"no broker answers on {socket_path} ({exc.strerror or exc})"
    if status is None:
        return _check_with_grpc(socket_path, service, max(deadline - time.monotonic(), 0.1))
    state = _SERVING_STATUS.get(status, Health.UNKNOWN)
    return state, f"{socket_path}{' service ' + service if service else ''}: {state.value}"


def _check_with_grpc(socket_path: str, service: str, timeout: float) -> tuple[Health, str]:
    """The same check through grpc: the call's status read exactly."""
    import grpc
    from grpc_health.v1 import health_pb2

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
    state = _SERVING_STATUS.get(reply.status, Health.UNKNOWN)
    return state, f"{socket_path}{' service ' + service if service else ''}: {state.value}"


# ------------------------------------------------------------------ the call as HTTP/2 frames (RFC 9113)

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM = _ACK = 0x1
_END_HEADERS, _PADDED = 0x4, 0x8
_STREAM = 1  # the one stream: the client's first


def _ask(socket_path: str, service: str, deadline: float) -> int | None:
    """The ServingStatus number the broker answers, or None when the answer is
    not a plain one (then grpc itself is asked).  OSError: nothing to connect to;
    TimeoutError: no answer by *deadline*."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        conn.connect(socket_path)
        request = b"\x0a" + _varint(len(service.encode())) + service.encode() if service else b""
        timeout_ms = max(int((deadline - time.monotonic()) * 1000), 1)
        headers = b"".join(_literal(name, value) for name, value in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", HEALTH_CHECK.encode()),
            (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"grpc-timeout", f"{min(timeout_ms, 99_999_999)}m".encode()),
        ))
        conn.sendall(
            _PREFACE + _frame(_SETTINGS, 0, 0)
            + _frame(_HEADERS, _END_HEADERS, _STREAM, headers)
            + _frame(_DATA, _END_STREAM, _STREAM, b"\x00" + struct.pack(">I", len(request)) + request)
        )
        body = b""
        while True:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            header = _read(conn, 9)
            if header is None:
                return None  # the broker closed the connection before the call ended
            length = int.from_bytes(header[:3], "big")
            kind, flags, stream = header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            payload = _read(conn, length) if length else b""
            if payload is None:
                return None
            if kind == _SETTINGS and not flags & _ACK:
                conn.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                conn.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY and int.from_bytes(payload[:4], "big") & 0x7FFFFFFF < _STREAM:
                return None  # going away without taking the call
            elif stream == _STREAM and kind == _RST_STREAM:
                return None
            elif stream == _STREAM and kind == _DATA:
                body += payload[1 : len(payload) - payload[0]] if flags & _PADDED else payload
            if stream == _STREAM and kind in (_DATA, _HEADERS) and flags & _END_STREAM:
                break
        with contextlib.suppress(OSError):  # a polite end (no error, nothing in flight), if the broker still listens
            conn.sendall(_frame(_GOAWAY, 0, 0, struct.pack(">II", _STREAM, 0)))
    # One length-prefixed message, uncompressed (no grpc-accept-encoding was offered).
    if len(body) < 5 or body[0] != 0 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
        return None  # no message: the call failed, and its status is in the trailers
    return _status_field(body[5:])


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field, never indexed and not Huffman-coded (RFC 7541 §6.2.2, §5.2)."""
    return b"\x00" + _hpack_length(len(name)) + name + _hpack_length(len(value)) + value


def _hpack_length(length: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 §5.1), the Huffman bit clear."""
    if length < 0x7F:
        return bytes((length,))
    encoded = [0x7F]
    length -= 0x7F
    while length >= 0x80:
        encoded.append(length & 0x7F | 0x80)
        length >>= 7
    encoded.append(length)
    return bytes(encoded)


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _status_field(message: bytes) -> int | None:
    """Field 1 (status, an enum) of a HealthCheckResponse; 0 (UNKNOWN) when absent,
    as proto3 leaves a default out; None if the message does not parse."""
    status, offset = 0, 0
    try:
        while offset < len(message):
            tag, offset = _read_varint(message, offset)
            field, wire_type = tag >> 3, tag & 0x7
            if wire_type == 0:
                value, offset = _read_varint(message, offset)
                if field == 1:
                    status = value
            elif wire_type == 2:
                size, offset = _read_varint(message, offset)
                offset += size
            elif wire_type in (1, 5):
                offset += 8 if wire_type == 1 else 4
            else:
                return None
    except IndexError:
        return None
    return status if offset == len(message) else None


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _read(conn: socket.socket, size: int) -> bytes | None:
    """Exactly *size* bytes, or None at the end of the stream."""
    chunks, missing = [], size
    while missing:
        chunk = conn.recv(missing)
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)
