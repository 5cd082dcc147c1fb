"""The operator CLI, run as a person would: separate processes against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import BrokerProcess


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
    for command in ("serve", "status", "share", "map", "watch", "notify"):
        assert command in result.stdout


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
    assert result.returncode == 1
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


def test_commands_without_a_broker_say_so(tmp_path: pytest.TempPathFactory) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "grant_broker.cli", "--socket", os.path.join(str(tmp_path), "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no broker answers" in result.stderr
