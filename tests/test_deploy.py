"""The deployment files start the broker with options the CLI really has."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from grant_broker.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_systemd_unit_execstart_parses() -> None:
    unit = (DEPLOY / "systemd" / "grant-broker.service").read_text()
    (line,) = re.findall(r"^ExecStart=(.*)$", unit, flags=re.M)
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command == "serve"
    assert args.socket == "/run/grant-broker/broker.sock"


def test_container_entrypoint_and_cmd_parse() -> None:
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint[0] == "grant-broker"
    assert build_parser().parse_args(entrypoint[1:] + cmd).command == "serve"


def test_daemonset_args_and_probe_parse() -> None:
    manifest = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    args = json.loads(re.search(r"^\s+args: (\[.*\])$", manifest, flags=re.M).group(1))  # type: ignore[union-attr]
    assert build_parser().parse_args(args).command == "serve"
    probe = json.loads(re.search(r"command: (\[.*\])$", manifest, flags=re.M).group(1))  # type: ignore[union-attr]
    assert build_parser().parse_args(probe[1:]).command == "status"
