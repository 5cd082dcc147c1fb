"""The route table against the protocol: every call routed once, with the types,
the descriptor passing and the streaming kind the schema and the generated
client stubs say."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

import grant_broker_protocol.v1
from grant_broker.core.operations.broker import BrokerStatus
from grant_broker.core.policy import Limits, Policy
from grant_broker.core.registry import BackendProvider, SessionRegistry
from grant_broker.core.reply import Reply
from grant_broker.core.routes import Route, build_routes
from grant_broker.core.session import Session


def _protocol_modules(suffix: str) -> list[Any]:
    """Every generated module of the protocol package whose name ends with *suffix*."""
    return [
        importlib.import_module(f"{grant_broker_protocol.v1.__name__}.{info.name}")
        for info in pkgutil.iter_modules(grant_broker_protocol.v1.__path__)
        if info.name.endswith(suffix)
    ]


NOT_ROUTED = {"Admin"}
"""Served by the remote admin listener only (core/admin.py), never from the route table."""


def _services() -> dict[str, ServiceDescriptor]:
    return {
        service.name: service
        for module in _protocol_modules("_pb2")
        for service in module.DESCRIPTOR.services_by_name.values()
        if service.name not in NOT_ROUTED
    }


FD_TRANSFER_FIELD = "fd_transfer"  # common.proto: names the frame an FdRef indexes
SERVICES = _services()
METHODS: dict[tuple[str, str], MethodDescriptor] = {
    (service.name, method.name): method for service in SERVICES.values() for method in service.methods
}


def _no_backend(domid: int | None, vmid: int | None) -> Any:
    raise AssertionError("the route table opens no session")


@pytest.fixture(scope="module")
def routes() -> tuple[Route, ...]:
    registry = SessionRegistry(BackendProvider(_no_backend, any_domain=True), Policy(), Limits())
    status = BrokerStatus(registry, capabilities=None)  # type: ignore[arg-type]
    return build_routes(status, streams_ended=lambda: False)


def by_method(routes: tuple[Route, ...]) -> dict[tuple[str, str], Route]:
    return {(route.service, route.method): route for route in routes}


def test_the_protocol_has_services_to_route() -> None:
    assert {"Broker", "Gntdev", "Gntalloc", "Evtchn", "MemBuf"} <= set(SERVICES)


def test_every_method_of_every_service_has_exactly_one_route(routes: tuple[Route, ...]) -> None:
    counts = Counter((route.service, route.method) for route in routes)
    assert {method: counts[method] for method in METHODS} == dict.fromkeys(METHODS, 1)


def test_every_route_is_a_method_of_the_protocol(routes: tuple[Route, ...]) -> None:
    assert {(route.service, route.method) for route in routes} <= set(METHODS)


@pytest.mark.parametrize("method", list(METHODS), ids=[f"{s}.{m}" for s, m in METHODS])
def test_the_route_serves_the_methods_request_and_response_types(
    routes: tuple[Route, ...], method: tuple[str, str]
) -> None:
    route, descriptor = by_method(routes)[method], METHODS[method]
    assert route.request_type.DESCRIPTOR.full_name == descriptor.input_type.full_name
    assert route.response_type.DESCRIPTOR.full_name == descriptor.output_type.full_name


def _operation_of(route: Route) -> Any:
    """The operation a route serves, through the wrappers the table puts
    around it (``functools.wraps``, or a closure over ``operation``)."""
    function: Any = route.operation
    while True:
        function = inspect.unwrap(function)
        cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
        inner = cells.get("operation")
        if inner is None or not callable(inner.cell_contents):
            return function
        function = inner.cell_contents


@pytest.mark.parametrize("method", list(METHODS), ids=[f"{s}.{m}" for s, m in METHODS])
def test_the_operation_is_declared_with_the_methods_types(routes: tuple[Route, ...], method: tuple[str, str]) -> None:
    # The operation's own annotations, not the route's: a route naming the
    # wrong operation for a method shows here.
    route, descriptor = by_method(routes)[method], METHODS[method]
    operation = _operation_of(route)
    hints = typing.get_type_hints(operation)
    parameters = list(inspect.signature(operation).parameters)
    session, request = parameters[:2]
    assert hints[session] in (Session, Session | None)
    assert hints[request].DESCRIPTOR.full_name == descriptor.input_type.full_name
    returned = hints["return"]
    if descriptor.server_streaming:
        assert typing.get_origin(returned) is AsyncIterator
    else:
        assert typing.get_origin(returned) is Reply
    (message,) = typing.get_args(returned)
    assert message.DESCRIPTOR.full_name == descriptor.output_type.full_name


@pytest.mark.parametrize("method", list(METHODS), ids=[f"{s}.{m}" for s, m in METHODS])
def test_unary_operations_are_coroutine_functions(routes: tuple[Route, ...], method: tuple[str, str]) -> None:
    route = by_method(routes)[method]
    if not route.streaming:
        assert inspect.iscoroutinefunction(route.operation)


def _fd_refs(message: Descriptor, seen: frozenset[str] = frozenset()) -> Iterator[str]:
    """Paths of the FdRef fields in *message*, at any depth."""
    for field in message.fields:
        if field.message_type is None or field.message_type.full_name in seen:
            continue
        if field.message_type.full_name == "grant_broker.v1.FdRef":
            yield field.name
        else:
            for inner in _fd_refs(field.message_type, seen | {message.full_name}):
                yield f"{field.name}.{inner}"


@pytest.mark.parametrize("method", list(METHODS), ids=[f"{s}.{m}" for s, m in METHODS])
def test_sends_fds_exactly_for_responses_with_an_fd_transfer_field(
    routes: tuple[Route, ...], method: tuple[str, str]
) -> None:
    route, descriptor = by_method(routes)[method], METHODS[method]
    assert route.sends_fds == (FD_TRANSFER_FIELD in descriptor.output_type.fields_by_name)


@pytest.mark.parametrize("method", list(METHODS), ids=[f"{s}.{m}" for s, m in METHODS])
def test_a_message_names_descriptors_exactly_when_it_has_an_fd_transfer_field(method: tuple[str, str]) -> None:
    # The schema's own rule (common.proto, FdRef): an FdRef is an index into
    # the frame that `fd_transfer` of the enclosing message names.
    descriptor = METHODS[method]
    for message in (descriptor.input_type, descriptor.output_type):
        assert (FD_TRANSFER_FIELD in message.fields_by_name) == any(_fd_refs(message)), message.full_name


def test_only_unary_responses_send_descriptors(routes: tuple[Route, ...]) -> None:
    # A stream has no transfer per message: the gRPC adapter delivers
    # descriptors for unary replies only.
    assert [route.full_name for route in routes if route.streaming and route.sends_fds] == []


def test_the_streaming_routes_are_the_server_streaming_methods(routes: tuple[Route, ...]) -> None:
    streaming = {method for method, descriptor in METHODS.items() if descriptor.server_streaming}
    assert {(route.service, route.method) for route in routes if route.streaming} == streaming
    assert streaming  # Evtchn.Subscribe at least


def test_no_method_streams_requests() -> None:
    # The route table and the gRPC adapter serve unary and server-streaming calls only.
    assert [name for name, descriptor in METHODS.items() if descriptor.client_streaming] == []


def test_only_status_may_be_called_without_a_session(routes: tuple[Route, ...]) -> None:
    assert [(route.service, route.method) for route in routes if route.session_optional] == [("Broker", "Status")]


class _RecordingChannel:
    """Stands in for a grpc channel: records the path and kind of each method a stub makes."""

    def __init__(self) -> None:
        self.methods: dict[str, str] = {}

    def __getattr__(self, kind: str) -> Any:
        def make(path: str, *args: Any, **kwargs: Any) -> None:
            self.methods[path] = kind

        return make


def test_full_names_and_kinds_are_those_of_the_generated_client_stubs(routes: tuple[Route, ...]) -> None:
    channel = _RecordingChannel()
    for module in _protocol_modules("_pb2_grpc"):
        for name in dir(module):
            if name.endswith("Stub") and name.removesuffix("Stub") not in NOT_ROUTED:
                getattr(module, name)(channel)
    assert {route.full_name: "unary_stream" if route.streaming else "unary_unary" for route in routes} == channel.methods
