"""The operator CLI: its command line (parsed in this process), and its commands run as a person
would run them: separate processes against a real broker."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grant_broker.cli import build_parser, serve_configuration

from .conftest import BrokerProcess

# Every command, with the arguments it cannot do without.
COMMANDS: dict[str, list[str]] = {
    "serve": [],
    "status": [],
    "health": [],
    "share": ["--to-domain", "2"],
    "map": ["--domain", "1", "--ref", "8"],
    "watch": ["--remote-domain", "1"],
    "notify": ["--remote-domain", "1", "--remote-port", "5"],
}


def cli(broker: BrokerProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "--socket", broker.socket_path, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(broker: BrokerProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "grant_broker.cli", "--socket", broker.socket_path, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen[str]) -> str:
    """The process's next line of output (the suite's timeout bounds the wait)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"the command ended without output: {process.stderr.read() if process.stderr else ''}"
    return line


def finish(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
    process.wait(10)
    for stream in (process.stdout, process.stderr):
        if stream:
            stream.close()


def test_help_lists_every_command() -> None:
    result = subprocess.run([sys.executable, "-m", "grant_broker.cli", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def command_help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("command", COMMANDS)
def test_socket_before_the_command_is_the_socket(command: str) -> None:
    args = build_parser().parse_args(["--socket", "/run/before.sock", command, *COMMANDS[command]])
    assert args.socket == "/run/before.sock"


@pytest.mark.parametrize("command", COMMANDS)
def test_socket_after_the_command_is_the_socket(command: str) -> None:
    args = build_parser().parse_args([command, *COMMANDS[command], "--socket", "/run/after.sock"])
    assert args.socket == "/run/after.sock"


@pytest.mark.parametrize("command", COMMANDS)
def test_socket_after_the_command_wins_over_the_one_before(command: str) -> None:
    args = build_parser().parse_args(["--socket", "/run/before.sock", command, *COMMANDS[command], "--socket", "/run/after.sock"])
    assert args.socket == "/run/after.sock"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_the_socket_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--socket" in command_help(command, capsys)


# Abbreviations that argparse would take by default: the one --socket-mode
# used to swallow, one of an option before the command, one of a flag.
ABBREVIATIONS = {
    "--socket-m": ["serve", "--socket-m", "0600"],
    "--back": ["serve", "--back", "emulated"],
    "--log": ["--log=debug", "status"],
    "--byte": ["map", "--domain", "1", "--ref", "8", "--byte", "4"],
    "--js": ["status", "--js"],
}


@pytest.mark.parametrize(("abbreviation", "argv"), ABBREVIATIONS.items(), ids=ABBREVIATIONS.keys())
def test_an_abbreviated_option_is_refused(abbreviation: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


def test_socket_mode_is_read_as_octal() -> None:
    assert build_parser().parse_args(["serve", "--socket-mode", "0600"]).socket_mode == 0o600


def test_a_socket_mode_that_is_not_octal_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--socket-mode", "/run/broker.sock"])
    assert exited.value.code == 2
    assert "argument --socket-mode: '/run/broker.sock' is not an octal mode" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_json(command: str) -> None:
    assert build_parser().parse_args([command, *COMMANDS[command], "--json"]).json is True


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_says_where_json_errors_go(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(command_help(command, capsys).split())
    assert "--json" in text and "an error is one JSON object on stderr" in text


# ------------------------------------------------------------------ against a broker


def test_status_json_describes_backend_and_sessions(broker_process: BrokerProcess) -> None:
    result = cli(broker_process, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["capabilities"]["backend"] == "emulated"
    assert status["sessions"] == []


def test_share_then_map_shows_the_shared_text(broker_process: BrokerProcess) -> None:
    sharer = spawn(broker_process, "share", "--to-domain", "2", "--text", "hello from one", "--json")
    try:
        shared = json.loads(first_line(sharer))
        assert shared["domain"] == 1 and len(shared["refs"]) == 1
        result = cli(broker_process, "map", "--domain", "1", "--ref", str(shared["refs"][0]), "--json", "--bytes", "14")
        assert result.returncode == 0, result.stderr
        assert bytes.fromhex(json.loads(result.stdout)["hex"]) == b"hello from one"
        status = json.loads(cli(broker_process, "status", "--json").stdout)
        assert [s["usage"]["granted_pages"] for s in status["sessions"]] == [1]
    finally:
        finish(sharer)


def test_map_of_an_ungranted_ref_explains_and_fails(broker_process: BrokerProcess) -> None:
    result = cli(broker_process, "map", "--domain", "1", "--ref", "4000")
    assert result.returncode == 2  # bad input
    assert "EINVAL" in result.stderr and "ref 4000 of domain 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_watch_prints_each_notification(broker_process: BrokerProcess) -> None:
    watcher = spawn(broker_process, "watch", "--as-domain", "2", "--remote-domain", "1", "--count", "2", "--json")
    try:
        bound = json.loads(first_line(watcher))
        for _ in range(2):
            result = cli(broker_process, "notify", "--as-domain", "1", "--remote-domain", "2", "--remote-port", str(bound["port"]))
            assert result.returncode == 0, result.stderr
            # One notify per bind: the next bind needs the port unbound again, which
            # the closing notifier does; wait for the event before the next one.
            assert json.loads(first_line(watcher)) == {"event": "fired", "port": bound["port"]}
        assert watcher.wait(20) == 0
    finally:
        finish(watcher)


def test_commands_without_a_broker_say_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "--socket", os.path.join(str(tmp_path), "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3  # broker unreachable
    assert "no broker answers" in result.stderr


def test_serve_listens_on_the_socket_given_after_the_command(short_tmp: Path) -> None:
    path = str(short_tmp / "after.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "grant_broker.cli", "serve", "--socket", path, "--backend", "emulated", "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert f"listening on {path} " in first_line(server)
        status = subprocess.run([sys.executable, "-m", "grant_broker.cli", "status", "--socket", path, "--json"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["capabilities"]["backend"] == "emulated"
    finally:
        finish(server)


def test_serve_json_prints_one_object_once_listening(short_tmp: Path) -> None:
    path = str(short_tmp / "broker.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "grant_broker.cli", "serve", "--socket", path, "--backend", "emulated", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(first_line(server))
        assert (ready["event"], ready["socket"], ready["fd_channel"]) == ("listening", path, path + ".fds")
        assert ready["backend"] == "emulated" and "gntdev" in ready["capabilities"]
        assert os.path.exists(path)
    finally:
        finish(server)


def test_notify_json_prints_what_it_did(broker_process: BrokerProcess) -> None:
    watcher = spawn(broker_process, "watch", "--as-domain", "2", "--remote-domain", "1", "--count", "1", "--json")
    try:
        bound = json.loads(first_line(watcher))
        result = cli(broker_process, "notify", "--as-domain", "1", "--remote-domain", "2",
                     "--remote-port", str(bound["port"]), "--times", "1", "--json")
        assert result.returncode == 0, result.stderr
        notified = json.loads(result.stdout)
        assert isinstance(notified.pop("port"), int)
        assert notified == {"domain": 1, "remote_domain": 2, "remote_port": bound["port"], "times": 1}
    finally:
        finish(watcher)


def json_error(result: subprocess.CompletedProcess[str], *, after_logs: bool = False) -> dict[str, object]:
    """The JSON object a failed command printed on stderr, as its only line (its last, *after_logs*
    of serve), with nothing on stdout."""
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert after_logs or len(lines) == 1, result.stderr
    record = json.loads(lines[-1])
    assert list(record) == ["error"]
    error: dict[str, object] = record["error"]
    return error


def test_a_refusal_with_json_is_one_json_object_on_stderr(broker_process: BrokerProcess) -> None:
    result = cli(broker_process, "map", "--domain", "1", "--ref", "4000", "--json")
    assert result.returncode == 2  # bad input
    error = json_error(result)
    assert (error["command"], error["errno"], error["errno_name"], error["grpc_code"]) == (
        "map", errno.EINVAL, "EINVAL", "INVALID_ARGUMENT")
    assert isinstance(error["operation"], str) and error["operation"] in str(error["message"])
    assert "ref 4000 of domain 1" in str(error["detail"]) and "ref 4000 of domain 1" in str(error["message"])


# health answers UNREACHABLE as its result, on stdout (tests/deploy/test_health_command.py).
@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("serve", "health")])
def test_no_broker_with_json_is_one_json_object_on_stderr(command: str, short_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", command, *COMMANDS[command],
         "--socket", str(short_tmp / "none.sock"), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3  # broker unreachable
    error = json_error(result)
    assert error["command"] == command and error["grpc_code"] == "UNAVAILABLE"
    assert error["errno_name"] in ("ECONNREFUSED", "ENOENT") and "none.sock" in str(error["message"])


def test_a_usage_error_with_json_is_one_json_object_on_stderr() -> None:
    result = subprocess.run([sys.executable, "-m", "grant_broker.cli", "map", "--domain", "1", "--ref", "eight", "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    error = json_error(result)
    assert (error["command"], error["errno_name"], error["grpc_code"]) == ("map", "EINVAL", "INVALID_ARGUMENT")
    assert "--ref" in str(error["message"]) and "'eight'" in str(error["message"])


def test_a_serve_failure_with_json_is_one_json_object_on_stderr(short_tmp: Path) -> None:
    path = short_tmp / "broker.sock"
    path.write_text("not a socket")
    result = subprocess.run([sys.executable, "-m", "grant_broker.cli", "serve", "--socket", str(path), "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    error = json_error(result, after_logs=True)
    assert (error["command"], error["errno_name"], error["operation"]) == ("serve", "EEXIST", "listen")
    assert "is not a socket" in str(error["message"])


# ------------------------------------------------------------------ serve: budgets and the status view


def test_limit_sets_any_budget_and_status_view_defaults_to_own() -> None:
    args = build_parser().parse_args(
        ["serve", "--limit", "max_pool_pages_per_uid=1024", "--limit", "fd_transfer_expiry_seconds=2.5"]
    )
    assert args.limit == [("max_pool_pages_per_uid", 1024), ("fd_transfer_expiry_seconds", 2.5)]
    limits = serve_configuration(args).server.limits
    assert (limits.max_pool_pages_per_uid, limits.fd_transfer_expiry_seconds) == (1024, 2.5)
    assert serve_configuration(args).server.status_view == "own"
    all_view = build_parser().parse_args(["serve", "--status-view", "all"])
    assert serve_configuration(all_view).server.status_view == "all"


@pytest.mark.parametrize(
    ("setting", "says"),
    [("max_nothing=3", "NAME one of"), ("max_pool_pages_per_uid", "NAME one of"),
     ("max_pool_pages_per_uid=lots", "not an integer"), ("max_ports_per_uid=0", "not positive")],
)
def test_a_bad_limit_is_a_usage_error(setting: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--limit", setting])
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
