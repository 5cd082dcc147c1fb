"""A real broker's logs (``grant-broker serve``): the audit records of what a real
client did, where ``--audit`` sends them (or nowhere), the operational log as
JSON lines (``--log-format json``), and as text without a timestamp under journald."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import grant_broker_client

SERVE = [sys.executable, "-m", "grant_broker.cli"]


class Broker:
    """``grant-broker serve`` with its stderr in a file."""

    def __init__(
        self, directory: Path, *args: str, before: tuple[str, ...] = (), env: dict[str, str] | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        self.socket_path = str(directory / "broker.sock")
        self.stderr_path = stderr_path or directory / "stderr"
        with open(self.stderr_path, "a") as stderr:
            self.process = subprocess.Popen(
                [*SERVE, "--socket", self.socket_path, *before, "serve", "--backend", "emulated", "--grace", "1", *args],
                stdout=subprocess.DEVNULL, stderr=stderr, env=env,
            )
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.socket_path) and os.path.exists(self.socket_path + ".fds")):
            assert self.process.poll() is None, f"the broker exited: {self.stderr()}"
            assert time.monotonic() < deadline, "the broker did not start within 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(15) == 0, self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture
def brokers() -> Iterator[list[Broker]]:
    started: list[Broker] = []
    yield started
    for broker in started:
        if broker.process.poll() is None:
            broker.process.kill()
            broker.process.wait(10)


async def share_map_unmap(socket_path: str) -> tuple[list[int], int]:
    """A page of domain 1 mapped and unmapped by domain 2; its refs and the mapping's index."""
    async with await grant_broker_client.connect(socket_path, domid=1, client_name="audited sharer") as sharer, \
            await grant_broker_client.connect(socket_path, domid=2, client_name="audited mapper") as mapper:
        async with await sharer.gntalloc.share(2, 1) as pages:
            refs = list(pages.refs)
            async with await mapper.gntdev.map([(1, ref) for ref in refs], writable=False) as mapping:
                index = mapping.index
    return refs, index


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_serve_audit_file_records_a_real_clients_map_and_unmap(short_tmp: Path, brokers: list[Broker]) -> None:
    audit_path = short_tmp / "audit.jsonl"
    broker = Broker(short_tmp, "--audit", str(audit_path))  # (and the operational log as text)
    brokers.append(broker)
    refs, index = await share_map_unmap(broker.socket_path)
    broker.stop()
    records = json_lines(audit_path.read_text())
    assert all(record["logger"] == "grant_broker.audit" for record in records)
    mine = {"uid": os.getuid(), "pid": os.getpid()}
    by_event = {record["event"]: record for record in records if record["client_name"] == "audited mapper"}
    mapped, unmapped = by_event["grants_mapped"], by_event["grants_unmapped"]
    assert {key: mapped[key] for key in ("uid", "pid", "domain", "remote_domain", "refs", "index", "writable")} == {
        **mine, "domain": 2, "remote_domain": 1, "refs": refs, "index": index, "writable": False,
    }
    assert {key: unmapped[key] for key in ("uid", "pid", "domain", "remote_domain", "refs", "index")} == {
        **mine, "domain": 2, "remote_domain": 1, "refs": refs, "index": index,
    }
    assert mapped["session_id"] == unmapped["session_id"] == by_event["session_opened"]["session_id"]
    events = [(record["client_name"], record["event"]) for record in records]
    assert events[:6] == [
        ("audited sharer", "session_opened"),
        ("audited mapper", "session_opened"),
        ("audited sharer", "grants_shared"),
        ("audited mapper", "grants_mapped"),
        ("audited mapper", "grants_unmapped"),
        ("audited sharer", "grants_unshared"),
    ]
    # The two closes, in whichever order the broker saw the hang-ups.
    assert sorted(events[6:]) == [("audited mapper", "session_closed"), ("audited sharer", "session_closed")]
    assert "grant_broker.audit" not in broker.stderr()  # none of it on stderr
    assert f"audit records go to {audit_path}" in broker.stderr()


@pytest.mark.parametrize("audit", ["stderr", "off", None], ids=["stderr", "off", "default"])
async def test_audit_goes_to_stderr_when_asked_and_nowhere_by_default(
    short_tmp: Path, brokers: list[Broker], audit: str | None
) -> None:
    broker = Broker(short_tmp, "--log-format", "json", *(("--audit", audit) if audit else ()))
    brokers.append(broker)
    await share_map_unmap(broker.socket_path)
    broker.stop()
    lines = json_lines(broker.stderr())  # every line of stderr is JSON: the log's and the audit's
    audited = [line["event"] for line in lines if line["logger"] == "grant_broker.audit"]
    if audit != "stderr":
        assert audited == []
    else:
        assert audited.count("session_opened") == 2 and "grants_mapped" in audited and "grants_unmapped" in audited
    # The operational log, as JSON with the session's identity, says nothing per call at its default level.
    operational = [line for line in lines if line["logger"] != "grant_broker.audit"]
    opened = [line for line in operational if line["message"].startswith("session ") and " opened" in line["message"]]
    assert len(opened) == 2
    for line in opened:
        assert set(line) >= {"timestamp", "level", "logger", "message", "session_id", "uid", "pid", "client_name", "domain"}
        assert line["uid"] == os.getuid() and line["pid"] == os.getpid()
    assert {line["logger"] for line in operational} <= {
        "grant_broker.daemon.logs", "grant_broker.daemon.run", "grant_broker.core.registry", "grant_broker.core.session",
    }
    assert len(operational) <= 8, operational  # limit, audit, 2 opened, 2 released, shutdown


async def test_under_journald_the_text_log_has_no_timestamp(short_tmp: Path, brokers: list[Broker]) -> None:
    stderr_path = short_tmp / "journal"
    stderr_path.touch()
    info = os.stat(stderr_path)
    env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    broker = Broker(short_tmp, "--audit", "off", before=("--log-format", "text"), env=env, stderr_path=stderr_path)
    brokers.append(broker)
    await share_map_unmap(broker.socket_path)
    broker.stop()
    lines = broker.stderr().splitlines()
    assert lines and all(re.match(r"^<\d>[A-Z]+ grant_broker\.[a-z_.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>INFO grant_broker.core.registry: session ") for line in lines)
