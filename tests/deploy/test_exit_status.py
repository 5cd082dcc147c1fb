"""The exit status of every command says what kind of failure it was: bad input,
no broker to reach, or a refusal by the broker's policy (the ``--help`` epilog
lists them); scripts and probes act on it without reading the message."""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from grant_broker.cli import EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, _exit_status, build_parser
from grant_broker_client.errors import BrokerClientError

from .conftest import grant_broker, start_broker, stop_broker


def test_the_codes_are_distinct() -> None:
    assert len({EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED}) == 4


def test_help_lists_each_exit_status_with_its_meaning() -> None:
    epilog = build_parser().epilog or ""
    listed = dict(re.findall(r"^  (\d)  (.*)$", epilog, flags=re.M))
    assert listed[str(EXIT_USAGE)].startswith("bad input")
    assert listed[str(EXIT_UNREACHABLE)].startswith("broker unreachable")
    assert listed[str(EXIT_REFUSED)].startswith("refused by policy")
    assert listed[str(EXIT_ERROR)].startswith("failed")


def test_a_bad_command_line_is_bad_input() -> None:
    result = grant_broker("map", "--domain", "1", "--ref", "eight")
    assert result.returncode == EXIT_USAGE
    assert "--ref" in result.stderr


@pytest.fixture
def broker_with_a_quota(short_tmp: Path) -> Iterator[Path]:
    path = short_tmp / "broker.sock"
    process = start_broker(path, "--limit", "max_grants_per_session=1")
    try:
        yield path
    finally:
        stop_broker(process)


def test_arguments_the_broker_refuses_are_bad_input(broker_with_a_quota: Path) -> None:
    result = grant_broker("--socket", str(broker_with_a_quota), "map", "--domain", "1", "--ref", "4000")
    assert result.returncode == EXIT_USAGE
    assert "INVALID_ARGUMENT" in result.stderr


def test_no_broker_on_the_socket_is_unreachable(short_tmp: Path) -> None:
    result = grant_broker("--socket", str(short_tmp / "none.sock"), "map", "--domain", "1", "--ref", "8")
    assert result.returncode == EXIT_UNREACHABLE
    assert "no broker" in result.stderr


def test_a_quota_the_broker_enforces_is_a_refusal_by_policy(broker_with_a_quota: Path) -> None:
    result = grant_broker("--socket", str(broker_with_a_quota), "share", "--to-domain", "2", "--count", "2", "--once")
    assert result.returncode == EXIT_REFUSED
    assert "EDQUOT" in result.stderr and "max_grants_per_session" in result.stderr


# A permission refusal needs a client whose uid the policy does not admit;
# the suite runs as root, whom the policy always admits, so the mapping itself
# is checked here on the errors the SDK raises.
@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        (errno.EPERM, grpc.StatusCode.PERMISSION_DENIED, EXIT_REFUSED),
        (errno.EACCES, grpc.StatusCode.PERMISSION_DENIED, EXIT_REFUSED),
        (errno.EPERM, grpc.StatusCode.UNAUTHENTICATED, EXIT_REFUSED),
        (errno.EDQUOT, grpc.StatusCode.RESOURCE_EXHAUSTED, EXIT_REFUSED),
        (errno.ENOMEM, grpc.StatusCode.RESOURCE_EXHAUSTED, EXIT_ERROR),
        (errno.ECONNREFUSED, grpc.StatusCode.UNAVAILABLE, EXIT_UNREACHABLE),
        (errno.EINVAL, grpc.StatusCode.INVALID_ARGUMENT, EXIT_USAGE),
        (errno.ENOENT, grpc.StatusCode.NOT_FOUND, EXIT_ERROR),
    ],
)
def test_each_kind_of_sdk_error_has_its_exit_status(code: int, status: grpc.StatusCode, expected: int) -> None:
    assert _exit_status("map", BrokerClientError(code, "call", "detail", code=status)) == expected


def test_serve_failing_to_start_is_a_failure_not_a_refusal(short_tmp: Path) -> None:
    # The socket directory writable by everyone: serve refuses it (EPERM), but no policy refused anything.
    short_tmp.chmod(0o777)
    result = grant_broker("--socket", str(short_tmp / "broker.sock"), "serve", "--backend", "emulated")
    assert result.returncode == EXIT_ERROR
    assert "writable" in result.stderr


def test_serve_with_a_bad_option_is_bad_input() -> None:
    result = grant_broker("serve", "--socket-mode", "rw")
    assert result.returncode == EXIT_USAGE
