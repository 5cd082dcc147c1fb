"""Every RPC fuzzed with hypothesis: the broker never crashes and always answers precisely.

Requests are generated from the message descriptors, so a field added to the
schema is fuzzed without touching this file: integers at and around every
boundary (0, 1, 0xFFFF, 0x7FEF/0x7FF0 for domains, 2**31, 2**32 - 1, 2**63,
2**64 - 1 — what a negative number becomes in an unsigned field), counts that
disagree with their lists, unknown flags and actions, repeated fields from
empty to 70 000 entries, bytes up to 3 MiB, and session tokens that are
missing, empty, random, 4 KiB long or of an ended session.  Calls that name a
descriptor transfer usually get one, with descriptors of the wrong kind
(pipes, sockets, directories, /dev/null, unsealed memfds...).

For each call, the broker (a daemon process) must:

* answer with a status other than UNKNOWN, INTERNAL, UNAVAILABLE or CANCELLED;
* put an ``ErrorDetail`` whose errno maps to that status in every error it
  raises itself (only grpc's own RESOURCE_EXHAUSTED for an oversized message
  comes without one);
* refuse every call with a bad token with PERMISSION_DENIED;
* stay alive, keep serving a bystander session, and log no unexpected error.

``GRANT_BROKER_FUZZ_EXAMPLES`` sets the examples per RPC (default 30).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grant_broker_protocol.status import status_code_for
from grant_broker_protocol.v1 import broker_pb2, common_pb2, evtchn_pb2, gntalloc_pb2, gntdev_pb2, membuf_pb2
from grant_broker_protocol.v1.common_pb2 import ErrorDetail

from .conftest import Daemon, knob, start_daemon, stop_daemon
from .rawclient import FD_KINDS, STUBS, RawSession, descriptors, grpc_channel

EXAMPLES = int(knob("GRANT_BROKER_FUZZ_EXAMPLES", 30))
SELF = 1  # the fuzzed sessions' domain; a bystander acts as domain 2

# Statuses that would mean a crash, a bug or a lost call.
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DATA_LOSS}

MODULES = {"Broker": broker_pb2, "Gntdev": gntdev_pb2, "Gntalloc": gntalloc_pb2, "Evtchn": evtchn_pb2, "MemBuf": membuf_pb2}
METHODS = [
    (service, method)
    for service, module in MODULES.items()
    for method in module.DESCRIPTOR.services_by_name[service].methods
]
FD_TRANSFER_FIELD = "fd_transfer"

# ----------------------------------------------------------------------------- strategies from descriptors


def _edges(bits: int) -> list[int]:
    top = 2**bits - 1
    candidates = {0, 1, 2, 3, 4, 7, 8, 16, 17, 32, 33, 4095, 4096, 0x7FEF, 0x7FF0, 0xFFFF, 0x10000,
                  2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1}
    return sorted(value for value in candidates if value <= top)


U32 = st.one_of(st.sampled_from(_edges(32)), st.integers(0, 2**32 - 1))
U64 = st.one_of(st.sampled_from(_edges(64)), st.integers(0, 2**64 - 1))
S32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, -3, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))
S64 = st.integers(-(2**63), 2**63 - 1)
SMALL_BYTES = st.binary(max_size=16)
# Big bytes only where they are not multiplied by a big repeated field: the
# request stays under ~4 MiB (the explicit tests below go beyond the limits).
BIG_BYTES = st.one_of(SMALL_BYTES, st.sampled_from([70_000, 3 << 20]).map(lambda n: b"\xa5" * n))
TEXT = st.text(max_size=16)
BIG_REPEATS = [17, 33, 1000, 5000, 70_000]

SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_UINT32: U32,
    FieldDescriptor.TYPE_FIXED32: U32,
    FieldDescriptor.TYPE_UINT64: U64,
    FieldDescriptor.TYPE_FIXED64: U64,
    FieldDescriptor.TYPE_INT32: S32,
    FieldDescriptor.TYPE_SINT32: S32,
    FieldDescriptor.TYPE_SFIXED32: S32,
    FieldDescriptor.TYPE_INT64: S64,
    FieldDescriptor.TYPE_SINT64: S64,
    FieldDescriptor.TYPE_SFIXED64: S64,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=False),
    FieldDescriptor.TYPE_FLOAT: st.floats(allow_nan=False, width=32),
}


def _single(field: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1, small)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 1000))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return SMALL_BYTES if small else BIG_BYTES
    return SCALARS[field.type]


def _field(field: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any]:
    if not field.is_repeated:
        return _single(field, depth, small)
    # Elements of a repeated field are small (no big bytes, no big lists
    # inside): a few of them, or one repeated far beyond any sane count.
    element = _single(field, depth, True)
    lists = st.lists(element, max_size=4 if depth < 2 else 1)
    if small:
        return lists
    return st.one_of(lists, st.tuples(element, st.sampled_from(BIG_REPEATS)).map(lambda pair: [pair[0]] * pair[1]))


_cache: dict[tuple[str, int, bool], st.SearchStrategy[Any]] = {}


def message_strategy(descriptor: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[Any]:
    key = (descriptor.full_name, depth, small)
    if key in _cache:
        return _cache[key]
    cls = _message_class(descriptor)
    if depth > 3:
        return st.just(cls())
    plain = {f.name: _field(f, depth, small) for f in descriptor.fields if f.containing_oneof is None}
    oneofs = [
        st.one_of(st.just({}), *(_field(f, depth, small).map(lambda v, name=f.name: {name: v}) for f in oneof.fields))
        for oneof in descriptor.oneofs
    ]

    def build(values: dict[str, Any], chosen: list[dict[str, Any]], present: dict[str, bool]) -> Any:
        fields = {name: value for name, value in values.items() if present[name]}
        for choice in chosen:
            fields.update(choice)
        return cls(**fields)

    strategy = st.builds(
        build,
        st.fixed_dictionaries(plain),
        st.tuples(*oneofs).map(list) if oneofs else st.just([]),
        # Most fields set (a field left out is its zero value, which the edges cover).
        st.fixed_dictionaries({name: st.sampled_from([True, True, True, False]) for name in plain}),
    )
    _cache[key] = strategy
    return strategy


def _message_class(descriptor: Descriptor) -> type:
    for candidate in (common_pb2, *MODULES.values()):
        cls = getattr(candidate, descriptor.name, None)
        if cls is not None and cls.DESCRIPTOR.full_name == descriptor.full_name:
            return cls
    raise LookupError(descriptor.full_name)


TOKENS = st.sampled_from(["valid"] * 12 + ["missing", "empty", "random", "long", "ended"])

# ----------------------------------------------------------------------------- the broker


@dataclass
class Target:
    daemon: Daemon
    channel: grpc.Channel
    bystander: RawSession
    ended_token: str
    calls: int = 0
    codes: dict[str, int] | None = None


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gb-fuzz-") as directory:
        # A short wait for descriptors that never come, so that calls naming
        # unknown transfers do not each take the default 5 s.
        daemon = start_daemon(str(Path(directory) / "broker.sock"), options={"limits": {"fd_frame_wait_seconds": 0.2}})
        channel = grpc_channel(daemon.socket_path)
        ended = RawSession.open(daemon.socket_path, SELF)
        ended_token = ended.token
        ended.close()
        bystander = RawSession.open(daemon.socket_path, 2)
        target = Target(daemon, channel, bystander, ended_token, codes={})
        try:
            yield target
            assert daemon.alive(), daemon.log()
            # The bystander was never disturbed, and nothing unexpected was logged.
            info = STUBS["Broker"](channel).DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=bystander.metadata, timeout=10)
            assert info.session_id == bystander.session_id
            log = daemon.log()
            for marker in ("Traceback", "unexpected error", "exception was never retrieved", "failed unexpectedly"):
                assert marker not in log, f"the broker logged {marker!r}:\n{log[-5000:]}"
            print(f"fuzzed {target.calls} calls: {dict(sorted(target.codes.items()))}")
        finally:
            bystander.close()
            channel.close()
            stop_daemon(daemon)


def _metadata(kind: str, session: RawSession, target: Target) -> tuple[tuple[str, str], ...]:
    return {
        "valid": session.metadata,
        "missing": (),
        "empty": (("x-grant-broker-session", ""),),
        "random": (("x-grant-broker-session", secrets.token_urlsafe(32)),),
        "long": (("x-grant-broker-session", "A" * 4096),),
        "ended": (("x-grant-broker-session", target.ended_token),),
    }[kind]


def _detail(error: grpc.RpcError) -> ErrorDetail | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for packed in status_pb2.Status.FromString(value).details:
                detail = ErrorDetail()
                if packed.Unpack(detail):
                    return detail
    return None


def _check(service: str, method: str, request: Any, token: str, call: Any, target: Target) -> None:
    try:
        result = call()
    except grpc.RpcError as error:
        code = error.code()
        where = f"{service}.{method} token={token} -> {code.name}: {error.details()!r}\nrequest: {str(request)[:600]}"
        assert code not in FORBIDDEN, where
        detail = _detail(error)
        if detail is None:
            # Only grpc's own refusal of an oversized message comes without one.
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and request.ByteSize() > 16 << 20, where
        else:
            assert status_code_for(detail.errno) == code, where
            assert detail.operation and detail.message, where
        if token != "valid":
            assert code == grpc.StatusCode.PERMISSION_DENIED or request.ByteSize() > 16 << 20, where
    else:
        code = grpc.StatusCode.OK
        assert token == "valid" or method == "Status", f"{service}.{method} accepted token {token}: {result}"
    target.calls += 1
    assert target.codes is not None
    target.codes[code.name] = target.codes.get(code.name, 0) + 1
    assert target.daemon.alive(), target.daemon.log()[-5000:]


@pytest.mark.timeout(60 + EXAMPLES)  # the long runs outlast the suite's 120 s per test
@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_every_rpc_answers_hostile_requests_precisely(target: Target, service: str, method: Any) -> None:
    request_class = _message_class(method.input_type)
    has_fds = FD_TRANSFER_FIELD in request_class.DESCRIPTOR.fields_by_name

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        request=message_strategy(method.input_type),
        token=TOKENS,
        send=st.booleans() if has_fds else st.just(False),
        kinds=st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=3),
    )
    def fuzz(request: Any, token: str, send: bool, kinds: list[str]) -> None:
        session = RawSession.open(target.daemon.socket_path, SELF)
        try:
            if send:
                # The named transfer arrives, carrying descriptors of any kind.
                request.fd_transfer = request.fd_transfer or 1
                with descriptors(kinds) as fds:
                    session.send_fds(request.fd_transfer, fds)
            stub = getattr(STUBS[service](target.channel), method.name)
            metadata = _metadata(token, session, target)
            if method.server_streaming:
                def call() -> Any:
                    stream = stub(request, metadata=metadata, timeout=10)
                    try:
                        return next(stream)
                    finally:
                        stream.cancel()
            else:
                def call() -> Any:
                    return stub(request, metadata=metadata, timeout=10)
            _check(service, method.name, request, token, call, target)
        finally:
            session.close()

    fuzz()


def test_an_oversized_message_is_refused_before_the_broker_reads_it(target: Target) -> None:
    session = RawSession.open(target.daemon.socket_path, SELF)
    try:
        segment = gntdev_pb2.GrantCopySegment(
            source=gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal(data=b"x" * 65535)),
            dest=gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=8, domid=2)), len=65535, flags=2,
        )
        request = gntdev_pb2.GrantCopyRequest(count=300, segments=[segment] * 300)  # ~19.7 MB
        with pytest.raises(grpc.RpcError) as raised:
            STUBS["Gntdev"](target.channel).GrantCopy(request, metadata=session.metadata, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert target.daemon.alive()
    finally:
        session.close()


@pytest.mark.parametrize(
    ("service", "method", "request_", "errno_name"),
    [
        # A list longer than any session may use is refused by its size, before it is decoded (EMSGSIZE) ...
        ("Gntdev", "MapGrantRef", gntdev_pb2.MapGrantRefRequest(count=10**6, refs=[common_pb2.GrantRef(domid=2, ref=8)] * 10**6), "EMSGSIZE"),
        # ... one that fits the size but not the quota by its count (EDQUOT).
        ("Gntdev", "MapGrantRef", gntdev_pb2.MapGrantRefRequest(count=70_000, refs=[common_pb2.GrantRef(domid=2, ref=8)] * 70_000), "EDQUOT"),
        ("Gntdev", "GrantCopy", gntdev_pb2.GrantCopyRequest(count=200_000, segments=[gntdev_pb2.GrantCopySegment(
            source=gntdev_pb2.GrantCopyPointer(foreign=gntdev_pb2.GrantCopyForeign(ref=8, domid=2)),
            dest=gntdev_pb2.GrantCopyPointer(virt=gntdev_pb2.GrantCopyLocal()), len=1, flags=1)] * 200_000), "E2BIG"),
        ("Gntdev", "DmabufExportFromRefs", gntdev_pb2.DmabufExportFromRefsRequest(count=10**6, domid=2, refs=[8] * 10**6), "EMSGSIZE"),
        ("Gntalloc", "AllocGref", gntalloc_pb2.AllocGrefRequest(domid=2, count=2**32 - 1), "EDQUOT"),
        ("Evtchn", "Subscribe", evtchn_pb2.SubscribeRequest(ports=list(range(10**6))), "EMSGSIZE"),
        ("Evtchn", "Subscribe", evtchn_pb2.SubscribeRequest(ports=list(range(10_000))), "E2BIG"),
        ("MemBuf", "Alloc", membuf_pb2.MemBufAllocRequest(size=2**63, nr_acl_entries=1, acl_list=[membuf_pb2.AclEntry(vmid=1, perms=3)]), "EINVAL"),
    ],
    ids=["map-1e6-refs", "map-7e4-refs", "copy-2e5-segments", "dmabuf-1e6-refs", "alloc-2^32-pages", "subscribe-1e6-ports",
         "subscribe-1e4-ports", "membuf-2^63-bytes"],
)
def test_requests_beyond_the_limits_are_refused_before_any_work(
    target: Target, service: str, method: str, request_: Any, errno_name: str
) -> None:
    session = RawSession.open(target.daemon.socket_path, SELF)
    try:
        stub = getattr(STUBS[service](target.channel), method)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            if service == "Evtchn":
                next(stub(request_, metadata=session.metadata, timeout=30))
            else:
                stub(request_, metadata=session.metadata, timeout=30)
        elapsed = time.monotonic() - started
        detail = _detail(raised.value)
        assert detail is not None and detail.errno_name == errno_name, raised.value.details()
        # Refused at once: the time is that of moving the bytes, not of handling each entry
        # (200 000 copy segments took 3.7 s of the broker's loop before the limit).
        assert elapsed < 1.5, f"{method} took {elapsed:.2f}s to be refused"
        info = STUBS["Broker"](target.channel).DescribeSession(broker_pb2.DescribeSessionRequest(), metadata=session.metadata, timeout=10)
        assert (info.usage.mappings, info.usage.mapped_grants, info.usage.granted_pages, info.usage.subscriptions) == (0, 0, 0, 0)
    finally:
        session.close()
