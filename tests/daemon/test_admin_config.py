"""The admin listener's settings in the configuration file and on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from grant_broker.core.policy import AdminIdentity
from grant_broker.daemon.config import ConfigError, read_file, resolve


def _socket() -> str:
    return "/run/grant-broker/broker.sock"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_the_admin_listener_and_its_identities(tmp_path: Path) -> None:
    path = _write(tmp_path, """
admin_listen = "127.0.0.1:7443"
admin_cert = "/etc/gb/server.pem"
admin_key = "/etc/gb/server.key"
admin_client_ca = "/etc/gb/ca.pem"

[policy.admin_identities]
"ops.example.org" = ["all"]
viewer = ["view"]
""")
    server = resolve(path, {}, _socket).server
    assert (server.admin_listen, server.admin_cert, server.admin_key, server.admin_client_ca) == (
        "127.0.0.1:7443", "/etc/gb/server.pem", "/etc/gb/server.key", "/etc/gb/ca.pem",
    )
    assert server.policy.admin_rights(["viewer"]) == ("viewer", frozenset({"view"}))
    assert server.policy.admin_rights(["ops.example.org"]) == (
        "ops.example.org", frozenset({"view", "release", "drain", "limits"}),
    )


def test_identities_may_be_written_as_the_command_line_does(tmp_path: Path) -> None:
    path = _write(tmp_path, '[policy]\nadmin_identities = ["viewer=view,drain"]\n')
    assert read_file(path)["policy.admin_identities"] == (AdminIdentity("viewer", frozenset({"view", "drain"})),)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('admin_listen = "unix:/run/admin.sock"\n', "admin_listen"),
        ('[policy]\nadmin_identities = ["viewer=everything"]\n', "policy.admin_identities"),
    ],
)
def test_a_bad_admin_setting_is_refused_naming_its_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        read_file(_write(tmp_path, text))
    assert refused.value.key == key
