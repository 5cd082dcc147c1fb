"""The broker's one configuration file (``serve --config PATH``, TOML) and how it meets the command line.

Every setting has one dotted key (``backend``, ``policy.allow_uids``,
``limits.max_grants_per_session``): the key in the file (the part before the
dot is the table) and the name the command-line options are mapped to.  What
the command line gives overrides the file; what neither gives takes the
default.  A file with an unknown key or a bad value is refused as a whole,
naming the file, the key and the reason — at start (the broker does not
start) and at reload (the running configuration stays).

The complete, commented example is ``deploy/grant-broker.toml``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grant_broker.core.policy import ACT_AS_MODES, AdminIdentity, DomainGrant, Limits, Policy
from grant_broker.daemon.logs import LOG_FORMATS
from grant_broker.daemon.server import ServerConfig, socket_group_id

LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("auto", "emulated", "xen")
STATUS_VIEWS = ("own", "all")


class ConfigError(ValueError):
    """A configuration the broker refuses: where (file and key) and why."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


# ----------------------------------------------------------------- the values


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return parse


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a number of seconds, zero or more, got {value!r}")
    return float(value)


def _mode(value: object) -> int:
    """A permission mode: an integer (TOML ``0o660``) or an octal string (``"0660"``)."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal mode such as \"0660\"") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise ValueError(f"{value!r} is not a mode such as 0o660 or \"0660\"")
    return value


def _ids(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value):
        raise ValueError(f"expected a list of numeric ids (zero or more), got {value!r}")
    return frozenset(value)


def _grants(value: object) -> tuple[DomainGrant, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings such as \"1000:3,4\" or \"gid:100:10-19\", got {value!r}")
    return tuple(DomainGrant.parse(item) for item in value)


def _metrics(value: object) -> str:
    from grant_broker.daemon.metrics import MetricsAddress

    MetricsAddress.parse(_string(value))
    return str(value)


def _limit(name: str) -> Callable[[object], int | float]:
    kind = type(getattr(Limits(), name))

    def parse(value: object) -> int | float:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"expected a positive {'number' if kind is float else 'integer'}, got {value!r}")
        return value  # type: ignore[no-any-return]  # checked just above to be of *kind*

    return parse


def _admin_listen(value: object) -> str:
    from grant_broker.daemon.admin import AdminAddress

    AdminAddress.parse(_string(value))
    return str(value)


def _admin_identities(value: object) -> tuple[AdminIdentity, ...]:
    """``["ops.example.org=all", "viewer=view"]`` (as ``serve --admin-identity``),
    or a table ``{"ops.example.org" = ["all"], viewer = ["view"]}``."""
    if isinstance(value, dict):
        items = []
        for identity, rights in value.items():
            if not isinstance(rights, list) or not all(isinstance(right, str) for right in rights):
                raise ValueError(f"{identity!r}: expected a list of rights, got {rights!r}")
            items.append(f"{identity}={','.join(rights)}")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise ValueError(f"expected a list of \"IDENTITY=RIGHT[,RIGHT...]\" or a table of IDENTITY = [RIGHTS], got {value!r}")
    return tuple(AdminIdentity.parse(item) for item in items)


# Each key: how its value is read from the file (and checked), raising ValueError with the reason.
SETTINGS: dict[str, Callable[[object], Any]] = {
    "socket": _string,
    "backend": _choice(*BACKENDS),
    "socket_mode": _mode,
    "socket_group": socket_group_id,
    "grace_seconds": _seconds,
    "status_view": _choice(*STATUS_VIEWS),
    "fast_path": _boolean,
    "metrics": _metrics,
    "admin_listen": _admin_listen,
    "admin_cert": _string,
    "admin_key": _string,
    "admin_client_ca": _string,
    "policy.admin_identities": _admin_identities,
    "log_level": _choice(*LOG_LEVELS),
    "log_format": _choice(*LOG_FORMATS),
    "audit": _string,
    "policy.allow_uids": _ids,
    "policy.allow_gids": _ids,
    "policy.admin_uids": _ids,
    "policy.act_as": _choice(*ACT_AS_MODES),
    "policy.act_as_domains": _grants,
    "policy.act_as_vmids": _grants,
    "policy.remote_domains": _grants,
    "policy.remote_vmids": _grants,
    **{f"limits.{limit.name}": _limit(limit.name) for limit in dataclasses.fields(Limits)},
}

# The defaults of ``grant-broker serve`` where they differ from the classes' own.
DEFAULTS: dict[str, Any] = {"policy.act_as": "owned", "log_level": "info", "log_format": "text", "audit": "off"}


def read_file(path: str) -> dict[str, Any]:
    """The settings in the TOML file *path*, each read and checked: ``{dotted key: value}``.

    Raises:
        ConfigError: the file cannot be read or parsed, a key is unknown, or a value is bad.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from None
    return parse_document(document, path)


def parse_document(document: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The settings of a parsed TOML *document* (from *source*, for the errors)."""
    settings: dict[str, Any] = {}
    for key, value in _flatten(document, source):
        reader = SETTINGS.get(key)
        if reader is None:
            raise ConfigError(source, key, f"unknown key{_did_you_mean(key)}")
        try:
            settings[key] = reader(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    return settings


def _flatten(document: Mapping[str, Any], source: str) -> list[tuple[str, Any]]:
    tables = {key.partition(".")[0] for key in SETTINGS if "." in key}
    found: list[tuple[str, Any]] = []
    for key, value in document.items():
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(source, key, "expected a table ([" + key + "])")
            found.extend((f"{key}.{inner}", inner_value) for inner, inner_value in value.items())
        else:
            found.append((key, value))
    return found


def _did_you_mean(key: str) -> str:
    import difflib

    table, _, name = key.rpartition(".")
    names = {known.rpartition(".")[2]: known for known in SETTINGS}
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {names[close[0]]}?)" if close else ""


# ------------------------------------------------------------- the result


@dataclass(frozen=True)
class Configuration:
    """Everything ``serve`` runs with: the server's configuration and the logs'."""

    server: ServerConfig
    log_level: str = "info"
    log_format: str = "text"
    audit: str = "off"
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The dotted keys as resolved (file, then command line, then defaults)."""


def resolve(
    config_path: str | None,
    overrides: Mapping[str, Any],
    default_socket: Callable[[], str],
) -> Configuration:
    """The configuration from the file at *config_path* (None: none) with the
    command line's *overrides* (dotted keys, given values only) on top.

    Raises:
        ConfigError: the file is refused (see :func:`read_file`), or the
            settings do not make a valid configuration together.
    """
    settings: dict[str, Any] = dict(DEFAULTS)
    if config_path is not None:
        settings.update(read_file(config_path))
    settings.update(overrides)
    source = config_path or "the command line"
    try:
        policy = Policy(**_section(settings, "policy", _POLICY_FIELDS))
        limits = Limits(**_section(settings, "limits"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, None, str(exc)) from None
    server = ServerConfig(
        socket_path=settings.get("socket") or default_socket(),
        backend=settings.get("backend", "auto"),
        socket_mode=settings.get("socket_mode", 0o660),
        socket_group=settings.get("socket_group"),
        grace_seconds=settings.get("grace_seconds", 5.0),
        policy=policy,
        limits=limits,
        status_view=settings.get("status_view", "own"),
        fast_path=settings.get("fast_path", True),
        metrics=settings.get("metrics"),
        admin_listen=settings.get("admin_listen"),
        admin_cert=settings.get("admin_cert"),
        admin_key=settings.get("admin_key"),
        admin_client_ca=settings.get("admin_client_ca"),
    )
    return Configuration(
        server=server,
        log_level=settings["log_level"],
        log_format=settings["log_format"],
        audit=settings["audit"],
        settings=settings,
    )


# The keys of [policy] are spelled for the operator (as the options); Policy's fields for the code.
_POLICY_FIELDS = {"allow_uids": "allowed_uids", "allow_gids": "allowed_gids"}


def _section(settings: Mapping[str, Any], table: str, renamed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings of *table* as keyword arguments of its class."""
    renamed = renamed or {}
    found: dict[str, Any] = {}
    for key, value in settings.items():
        prefix, _, name = key.partition(".")
        if prefix == table and name:
            found[renamed.get(name, name)] = value
    return found
