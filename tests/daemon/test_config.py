"""The configuration file (``serve --config``): what it accepts, what it refuses and how, and how the command line meets it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from grant_broker.cli import main
from grant_broker.core.policy import DomainGrant, Limits
from grant_broker.daemon.config import SETTINGS, ConfigError, read_file, resolve

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "grant-broker.toml"


def _socket() -> str:
    return "/run/grant-broker/broker.sock"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return str(path)


def _keys_in(document: dict[str, object], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in document.items():
        if isinstance(value, dict):
            keys |= _keys_in(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _commented_keys(text: str) -> set[str]:
    """The keys the example shows commented out (``# key = value``), with their tables."""
    table = ""
    keys: set[str] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            table = stripped[1:-1] + "."
        elif stripped.startswith("# ") and " = " in stripped:
            name = stripped[2:].partition(" = ")[0]
            if name.replace("_", "").isalnum():
                keys.add(table + name)
    return keys


def test_the_example_file_is_accepted() -> None:
    settings = read_file(str(EXAMPLE))
    assert settings, "the example sets nothing"
    resolve(str(EXAMPLE), {}, _socket)


def test_the_example_file_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    shown = _keys_in(tomllib.loads(text)) | _commented_keys(text)
    assert set(SETTINGS) - shown == set()


def test_an_unknown_key_is_refused_with_the_file_the_key_and_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, "[limits]\nmax_grant_per_session = 4\n")
    with pytest.raises(ConfigError) as refused:
        read_file(path)
    assert refused.value.source == path
    assert refused.value.key == "limits.max_grant_per_session"
    assert "unknown key" in refused.value.reason and "limits.max_grants_per_session" in refused.value.reason


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('backend = "kvm"\n', "backend", "not one of auto, emulated, xen"),
        ('socket_mode = "rw"\n', "socket_mode", "octal mode"),
        ("grace_seconds = -1\n", "grace_seconds", "zero or more"),
        ('fast_path = "yes"\n', "fast_path", "true or false"),
        ('metrics = "nowhere"\n', "metrics", "nowhere"),
        ("[limits]\nmax_sessions = 0\n", "limits.max_sessions", "positive integer"),
        ("[limits]\nmax_sessions = 1.5\n", "limits.max_sessions", "positive integer"),
        ("[policy]\nallow_uids = [-1]\n", "policy.allow_uids", "numeric ids"),
        ('[policy]\nact_as = "everyone"\n', "policy.act_as", "not one of owned, granted, any"),
        ('[policy]\nremote_domains = ["1000"]\n', "policy.remote_domains", "expected [uid:|gid:]N:ID"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key_and_why(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as refused:
        read_file(_write(tmp_path, text))
    assert refused.value.key == key
    assert reason in refused.value.reason


def test_a_table_given_as_a_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        read_file(_write(tmp_path, "limits = 3\n"))
    assert refused.value.key == "limits" and "table" in refused.value.reason


def test_a_file_that_is_not_toml_is_refused_with_the_file_and_where(tmp_path: Path) -> None:
    path = _write(tmp_path, "backend = \n")
    with pytest.raises(ConfigError) as refused:
        read_file(path)
    assert str(refused.value).startswith(f"{path}: not valid TOML") and "line 1" in str(refused.value)


def test_a_missing_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        read_file(str(tmp_path / "absent.toml"))
    assert "No such file" in str(refused.value)


def test_the_file_sets_what_the_command_line_does_not(tmp_path: Path) -> None:
    path = _write(tmp_path, 'backend = "emulated"\ngrace_seconds = 2\n[limits]\nmax_grants_per_session = 7\n'
                            '[policy]\nallow_uids = [1000]\nact_as_domains = ["1000:3,4"]\n')
    configuration = resolve(path, {}, _socket)
    server = configuration.server
    assert (server.backend, server.grace_seconds, server.limits.max_grants_per_session) == ("emulated", 2.0, 7)
    assert server.policy.allowed_uids == frozenset({1000})
    assert server.policy.act_as_domains == (DomainGrant(frozenset({3, 4}), uid=1000),)


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'backend = "xen"\n[limits]\nmax_grants_per_session = 7\n')
    server = resolve(path, {"backend": "emulated", "limits.max_grants_per_session": 9}, _socket).server
    assert (server.backend, server.limits.max_grants_per_session) == ("emulated", 9)


def test_what_neither_sets_takes_serves_defaults() -> None:
    configuration = resolve(None, {}, _socket)
    assert configuration.server.socket_path == _socket()
    assert configuration.server.limits == Limits()
    assert configuration.server.policy.act_as == "owned"
    assert (configuration.log_level, configuration.log_format, configuration.audit) == ("info", "text", "off")


def test_serve_does_not_start_with_a_refused_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "[policy]\nallow_uid = [1000]\n")
    assert main(["--socket", str(tmp_path / "b.sock"), "serve", "--config", path]) == 2
    error = capsys.readouterr().err
    assert f"{path}: policy.allow_uid: unknown key (did you mean policy.allow_uids?)" in error
    assert not (tmp_path / "b.sock").exists()
