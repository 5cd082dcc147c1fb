"""The two logs' forms and destinations (daemon/logs.py) and their options (cli.py).

The operational log as text (no timestamp of its own under journald) or JSON
lines with the session's identity fields; the audit log as JSON lines to
stderr, syslog or a file, or nowhere.  What the audit records say is tested in
``tests/core/test_audit.py``; a real broker's, in ``tests/service/test_audit_log.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from grant_broker.backend.contract import GrantRef
from grant_broker.cli import build_parser, serve_configuration
from grant_broker.core import audit
from grant_broker.daemon import logs
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import PeerCredentials

IDENTITY = {"session_id": 7, "uid": 1000, "pid": 4242, "client_name": "compositor", "domain": 2}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SESSION: Any = SimpleNamespace(log_fields=IDENTITY, creds=PeerCredentials(4242, 1000, 100), vmid=3)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of the broker's tree that only the test's handler hears."""
    logger = logging.getLogger("grant_broker.test_logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def undo_audit() -> Iterator[None]:
    yield
    logs.configure_audit(logs.AUDIT_OFF)()  # as before: routed nowhere, off
    assert audit.audit_log.level == audit.OFF
    assert not [handler for handler in audit.audit_log.handlers if getattr(handler, "_grant_broker_audit", False)]


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- the operational log


def test_json_is_one_object_a_line_with_the_sessions_identity(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(logs.configure_logging("info", "json", stream))
    logger.info("session %d opened", 7, extra=IDENTITY)
    logger.warning("no session here")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("it failed", extra=IDENTITY)
    opened, plain, failed = lines_of(stream.getvalue())
    assert TIMESTAMP.match(opened.pop("timestamp"))
    assert opened == {"level": "INFO", "logger": "grant_broker.test_logs", "message": "session 7 opened", **IDENTITY}
    assert set(plain) == {"timestamp", "level", "logger", "message"} and plain["level"] == "WARNING"
    assert failed["message"] == "it failed" and failed["session_id"] == 7
    assert "ValueError: boom" in failed["exception"]


def test_a_client_name_cannot_forge_a_line(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(logs.configure_logging("info", "json", stream))
    logger.info("opened", extra={**IDENTITY, "client_name": 'x"}\n{"level": "ERROR"'})
    (line,) = lines_of(stream.getvalue())
    assert line["client_name"] == 'x"}\n{"level": "ERROR"'


def test_text_has_a_timestamp_of_its_own(logger: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere"
    other.touch()
    info = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")  # inherited, but stderr went elsewhere
    with open(tmp_path / "stderr", "w") as stream:
        assert not logs.under_journald(stream)
        logger.addHandler(logs.configure_logging("info", "text", stream))
        logger.info("hello")
    text = (tmp_path / "stderr").read_text()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO grant_broker.test_logs: hello$", text.strip())


def test_text_under_journald_has_no_timestamp_and_says_its_priority(
    logger: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert logs.under_journald(stream)
        logger.addHandler(logs.configure_logging("info", "text", stream))
        logger.info("hello")
        logger.warning("careful")
        logger.error("broken")
    assert (tmp_path / "stderr").read_text().splitlines() == [
        "<6>INFO grant_broker.test_logs: hello",
        "<4>WARNING grant_broker.test_logs: careful",
        "<3>ERROR grant_broker.test_logs: broken",
    ]


@pytest.mark.parametrize("value", ["", "nonsense", "1:2:3", "12"])
def test_a_journal_stream_that_is_not_ours_is_not_journald(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not logs.under_journald(io.StringIO())


def test_json_under_journald_keeps_its_timestamp(logger: logging.Logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        logger.addHandler(logs.configure_logging("info", "json", stream))
        logger.info("hello")
    (line,) = lines_of((tmp_path / "stderr").read_text())
    assert TIMESTAMP.match(line["timestamp"])


# ---------------------------------------------------------------- the audit log


def test_audit_records_are_json_lines_in_a_file_only_the_group_reads(tmp_path: Path, undo_audit: None) -> None:
    path = tmp_path / "audit.jsonl"
    close = logs.configure_audit(str(path))
    audit.session_opened(SESSION)
    audit.grants_mapped(SESSION, "gntdev map", (GrantRef(1, 8), GrantRef(1, 9)), index=0, writable=False)
    close()
    opened, mapped = lines_of(path.read_text())
    assert TIMESTAMP.match(opened.pop("timestamp")) and TIMESTAMP.match(mapped.pop("timestamp"))
    assert opened == {"logger": "grant_broker.audit", "event": "session_opened", **IDENTITY, "gid": 100, "vmid": 3}
    assert mapped == {
        "logger": "grant_broker.audit", "event": "grants_mapped", **IDENTITY, "operation": "gntdev map",
        "remote_domain": 1, "refs": [8, 9], "index": 0, "writable": False,
    }
    assert stat.S_IMODE(os.stat(path).st_mode) & ~logs.AUDIT_FILE_MODE == 0


def test_the_audit_file_is_appended_to_and_reopened_when_moved(
    tmp_path: Path, undo_audit: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n')
    close = logs.configure_audit(str(path))
    audit.port_bound(SESSION, "evtchn bind virq", 5, virq=3)
    os.rename(path, tmp_path / "audit.jsonl.1")  # logrotate
    audit.port_bound(SESSION, "evtchn bind virq", 6, virq=4)  # within the second: still the moved file
    monkeypatch.setattr(logs, "REOPEN_CHECK_SECONDS", 0.0)
    audit.port_unbound(SESSION, "evtchn unbind", 5)
    close()
    moved = [line.get("port") for line in lines_of((tmp_path / "audit.jsonl.1").read_text())]
    assert moved == [None, 5, 6]
    assert [line["event"] for line in lines_of(path.read_text())] == ["port_unbound"]


def test_audit_to_stderr_is_json_lines_beside_the_log(undo_audit: None) -> None:
    stream = io.StringIO()
    logs.configure_audit("stderr", stream=stream)
    audit.grants_shared(SESSION, "gntalloc alloc gref", 1, [8], index=0, writable=True)
    (line,) = lines_of(stream.getvalue())
    assert line["event"] == "grants_shared" and line["logger"] == "grant_broker.audit" and line["refs"] == [8]


def test_audit_off_writes_nothing_and_makes_nothing(undo_audit: None, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    logs.configure_audit("stderr", stream=stream)
    logs.configure_audit("off")  # replaces it
    made: list[object] = []
    monkeypatch.setattr(audit, "_emit", lambda *args: made.append(args))
    audit.session_opened(SESSION)
    audit.grants_mapped(SESSION, "gntdev map", (GrantRef(1, 8),))
    assert not audit.audit_log.isEnabledFor(logging.CRITICAL)
    assert made == [] and stream.getvalue() == ""


def test_audit_records_go_whatever_the_operational_level(undo_audit: None) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # serve --log-level error
    try:
        stream = io.StringIO()
        logs.configure_audit("stderr", stream=stream)
        audit.session_opened(SESSION)
    finally:
        root.setLevel(level)
    assert lines_of(stream.getvalue())[0]["event"] == "session_opened"


def test_audit_to_syslog_is_tagged_authpriv(tmp_path: Path, undo_audit: None, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(path)
        monkeypatch.setattr(logs, "SYSLOG_SOCKET", path)
        close = logs.configure_audit("syslog")
        audit.port_bound(SESSION, "evtchn bind unbound port", 4, remote_domain=1)
        close()
        datagram = syslog.recv(65536).decode()
    prefix = f"<{10 * 8 + 6}>grant-broker-audit: "  # LOG_AUTHPRIV, LOG_INFO
    assert datagram.startswith(prefix)
    record = json.loads(datagram[len(prefix):].rstrip("\x00"))
    assert record["event"] == "port_bound" and record["port"] == 4 and record["uid"] == 1000


def test_audit_to_syslog_without_one_is_refused(tmp_path: Path, undo_audit: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", str(tmp_path / "no-log"))
    with pytest.raises(BrokerError) as refused:
        logs.configure_audit("syslog")
    assert "no-log" in refused.value.detail


def test_an_audit_file_that_cannot_be_opened_is_refused(tmp_path: Path, undo_audit: None) -> None:
    with pytest.raises(BrokerError) as refused:
        logs.configure_audit(str(tmp_path / "missing" / "audit.jsonl"))
    assert refused.value.operation == "open the audit log" and "missing" in refused.value.detail


# ---------------------------------------------------------------- the options


@pytest.mark.parametrize(
    "argv",
    [["--log-format", "json", "serve"], ["serve", "--log-format", "json"], ["--log-format", "json", "status"],
     ["status", "--log-format", "json"], ["--log-format", "text", "serve", "--log-format", "json"]],
)
def test_log_format_goes_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).log_format == "json"


def test_the_defaults_are_text_and_no_audit() -> None:
    def configured(*argv: str) -> Any:
        return serve_configuration(build_parser().parse_args(["serve", *argv]))

    assert (configured().log_format, configured().audit) == ("text", "off")
    assert configured("--audit", "off").audit == "off"
    assert configured("--audit", "/var/log/gb.jsonl").audit == "/var/log/gb.jsonl"
