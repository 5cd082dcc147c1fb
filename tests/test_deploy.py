"""The deployment files start the broker with options the CLI really has."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from grant_broker.cli import build_parser

REPOSITORY = Path(__file__).resolve().parents[1]
DEPLOY = REPOSITORY / "deploy"
SYSTEMD_UNIT = DEPLOY / "systemd" / "grant-broker.service"
# Where deploy/systemd/README.md's install steps put the unit's documentation.
INSTALLED_DOCS = "/usr/share/doc/grant-broker/"


def test_systemd_unit_execstart_parses() -> None:
    unit = SYSTEMD_UNIT.read_text()
    (line,) = re.findall(r"^ExecStart=(.*)$", unit, flags=re.M)
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command == "serve"
    socket = args.socket
    if socket is None and args.config is not None:
        # The configuration file it names is deploy/'s, installed there.
        socket = tomllib.loads((DEPLOY / Path(args.config).name).read_text()).get("socket")
    assert socket == "/run/grant-broker/broker.sock"


def test_every_grant_broker_command_of_the_manifests_parses() -> None:
    """Each container of the project's image runs ENTRYPOINT + args (or its own command), and each
    exec probe runs a grant-broker command: every one is a command line the CLI takes."""
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    checked = []
    for manifest in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            spec = document["spec"].get("template", {}).get("spec", document["spec"])
            for container in spec.get("initContainers", []) + spec["containers"]:
                if not container["image"].startswith("grant-broker:"):
                    continue
                argv = container.get("command", entrypoint) + container.get("args", [] if "command" in container else cmd)
                assert argv[0] == "grant-broker", f"{manifest.name}: {container['name']} runs {argv}"
                build_parser().parse_args(argv[1:])
                checked.append(argv)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if (command := container.get(probe, {}).get("exec", {}).get("command")) is not None:
                        assert command[0] == "grant-broker", f"{manifest.name}: {container['name']} {probe}: {command}"
                        assert build_parser().parse_args(command[1:]).command == "health", f"{probe}: a cheap health check"
                        checked.append(command)
    assert checked


def test_container_entrypoint_and_cmd_parse() -> None:
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.*)$", containerfile, flags=re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint[0] == "grant-broker"
    assert build_parser().parse_args(entrypoint[1:] + cmd).command == "serve"


def test_daemonset_args_and_probe_parse() -> None:
    manifest = (DEPLOY / "kubernetes" / "daemonset.yaml").read_text()
    # The broker's container, then the device plugin's (the same image: its ENTRYPOINT's --socket first).
    args = [json.loads(found) for found in re.findall(r"^\s+args: (\[.*\])$", manifest, flags=re.M)]
    assert [build_parser().parse_args(["--socket", "/run/grant-broker/broker.sock", *each]).command for each in args] == \
        ["serve", "device-plugin"]
    probes = [json.loads(found) for found in re.findall(r"command: (\[.*\])$", manifest, flags=re.M)]
    assert probes
    assert {build_parser().parse_args(probe[1:]).command for probe in probes} == {"health"}


def test_systemd_unit_documentation_is_installed_from_the_repository() -> None:
    """Each Documentation= is a file under /usr/share/doc/grant-broker/ that exists in deploy/systemd/
    and that the install steps of deploy/systemd/README.md copy there."""
    unit = SYSTEMD_UNIT.read_text()
    uris = [uri for line in re.findall(r"^Documentation=(.*)$", unit, flags=re.M) for uri in line.split()]
    assert uris
    for uri in uris:
        assert uri.startswith(f"file://{INSTALLED_DOCS}"), f"{uri}: nothing installs it"
        installed = uri.removeprefix("file://")
        name = installed.removeprefix(INSTALLED_DOCS)
        assert (DEPLOY / "systemd" / name).is_file(), f"{uri}: deploy/systemd/{name} does not exist"
        readme = (DEPLOY / "systemd" / "README.md").read_text()
        assert re.search(rf"^install .*deploy/systemd/{re.escape(name)} {re.escape(installed)}$", readme, flags=re.M), \
            f"{uri}: deploy/systemd/README.md does not install deploy/systemd/{name} there"


def test_systemd_unit_names_repository_files_that_exist() -> None:
    unit = SYSTEMD_UNIT.read_text()
    named = re.findall(r"(?<![\w/])deploy/[\w./-]*\w", unit)
    assert named
    missing = [path for path in named if not (REPOSITORY / path).exists()]
    assert not missing, f"the unit names files the repository does not have: {missing}"


def test_systemd_readme_commands_parse() -> None:
    readme = (DEPLOY / "systemd" / "README.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", readme, flags=re.M | re.S)
    commands = [line.split("#")[0] for block in blocks for line in block.splitlines() if line.startswith("grant-broker ")]
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])
