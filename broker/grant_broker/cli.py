"""``grant-broker``: run the broker, and operate it.

Run ``grant-broker --help`` or ``grant-broker COMMAND --help``.
"""

from __future__ import annotations

import argparse
import errno
import json
import string
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

from grant_broker import __version__

if TYPE_CHECKING:
    from grant_broker_protocol.errors import BrokerError

# Exit statuses (the --help epilog lists them; scripts and probes act on them).
EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed
EXIT_USAGE = 2  # bad input: the command line, or arguments refused before or by the call (INVALID_ARGUMENT)
EXIT_UNREACHABLE = 3  # no broker answers on the socket (UNAVAILABLE)
EXIT_REFUSED = 4  # refused by the broker's policy (PERMISSION_DENIED, UNAUTHENTICATED) or a quota or budget (EDQUOT)
EXIT_NOT_SERVING = 5  # health: the broker answers but is draining or stopping
EXIT_SERVICE_UNKNOWN = 6  # health: the broker knows no such service
EXIT_HEALTH_UNKNOWN = 7  # health: any other answer

_EPILOG = """\
examples:
  grant-broker serve                         # emulated hypervisor unless /dev/xen exists
  grant-broker status --json
  grant-broker share --to-domain 2 --text hello        # as domain 1 (emulated); prints the ref
  grant-broker map --as-domain 2 --domain 1 --ref 8    # dump the page the other one shares
  grant-broker watch --as-domain 2 --remote-domain 1   # bind a port and print its events

--socket goes before or after the command (the last one given wins).  The socket defaults to
$GRANT_BROKER_SOCKET, else $XDG_RUNTIME_DIR/grant-broker/broker.sock (/run/grant-broker/broker.sock
as root).  Options are never abbreviated.

With --json (every command has it) the results are JSON objects on stdout, one per line, and an
error is one JSON object on stderr, its last line (serve logs on stderr before it):
  {"error": {"command", "operation", "errno", "errno_name", "grpc_code", "message", "detail",
             "gntst", "gntst_name"}}
grpc_code is the call's gRPC status, or for a failure before any call the status the broker
gives that errno.

exit status (every command):
  0  done (health: SERVING)
  1  failed (any error not below)
  2  bad input: the command line, or arguments refused by the command, the SDK or the broker
     (grpc_code INVALID_ARGUMENT)
  3  broker unreachable: no broker answers on the socket (grpc_code UNAVAILABLE)
  4  refused by policy: not allowed (PERMISSION_DENIED, UNAUTHENTICATED) or over a quota or
     budget (errno EDQUOT)
health only:
  5  NOT_SERVING: the broker answers but is draining or stopping
  6  SERVICE_UNKNOWN: the broker knows no such service (health --service)
  7  UNKNOWN: any other answer
"""

_SERVE_DESCRIPTION = """\
Run the broker in the foreground.  SIGTERM or SIGINT drains it (health NOT_SERVING, calls finish within
the grace period, sessions released) and a second one exits at once; SIGHUP reads the configuration
file again and applies the policy, the limits, the status view, the grace period, the log level and
the audit destination without dropping a session (a file with an unknown key or a bad value is
refused, naming the file, the key and why, and the running configuration stays).  The sockets, the
backend and the metrics address change only with a restart.  Under systemd (Type=notify) it reports
READY=1, RELOADING=1 and STOPPING=1 on $NOTIFY_SOCKET."""
_SOCKET_HELP = "the broker's gRPC Unix socket, before or after the command (default: see grant-broker --help)"
_LOG_FORMAT_HELP = (
    "the log on stderr, before or after the command: text (default; under journald without a timestamp of its own) "
    "or json (one object a line: timestamp, level, logger, message and the session's session_id, uid, pid, "
    "client_name, domain)"
)
_AUDIT_HELP = (
    "where the audit records go (one JSON object a line: sessions opened and closed, refusals by the policy and "
    "the budgets, grants mapped/shared and released, ports bound and unbound): stderr (with the log), "
    "syslog (/dev/log, facility authpriv, tag grant-broker-audit), FILE (appended to; ./off for a file named off) "
    "or off (default: a record per grant costs the map call about a quarter of its time; the deploy files turn it on)"
)
_JSON_HELP = (
    "machine-readable output: JSON objects on stdout, one per line; an error is one JSON object on stderr "
    "(see grant-broker --help)"
)
_USAGE_OPERATION = "parse the command line"
_CHECK_OPERATION = "check the arguments"


def _socket_default() -> str:
    from grant_broker_protocol.endpoints import default_socket_path

    return default_socket_path()


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660")
    return mode


def _socket_group(text: str) -> int:
    """``serve --socket-group``: a group name or a numeric gid."""
    from grant_broker.daemon.server import socket_group_id

    try:
        return socket_group_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _metrics_address(text: str) -> str:
    """``serve --metrics``: ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``unix:PATH``."""
    from grant_broker.daemon.metrics import MetricsAddress

    try:
        MetricsAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _limit_setting(text: str) -> tuple[str, int | float]:
    """``NAME=VALUE`` for ``serve --limit``: a field of ``Limits`` and a positive number of its type."""
    import dataclasses

    from grant_broker.core.policy import Limits

    name, equals, value = text.partition("=")
    fields = {field.name: field for field in dataclasses.fields(Limits)}
    if not equals or name not in fields:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE with NAME one of: {', '.join(sorted(fields))}")
    kind = float if isinstance(getattr(Limits(), name), float) else int
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a{'' if kind is float else 'n integer'} number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not positive")
    return name, number


def _domain_grant(text: str) -> Any:
    """``[uid:|gid:]N:ID[,ID...]`` for ``serve --allow-domain`` and its siblings."""
    from grant_broker.core.policy import DomainGrant

    try:
        return DomainGrant.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """An argument parser that never takes an abbreviation for an option, and
    reports a bad command line as a JSON error when ``json_errors`` is set."""

    json_errors = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            command = self.prog.split()[1] if " " in self.prog else None
            _print_error_json(command, errno.EINVAL, _USAGE_OPERATION, message)
            self.exit(EXIT_USAGE)
        super().error(message)


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    """The command line; with *json_errors*, a bad one is reported as a JSON error."""
    parser = _Parser(
        prog="grant-broker",
        description="One per-host daemon that owns the Xen grant-table, event-channel and mem-buf devices "
        "and serves them to other processes over gRPC.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"grant-broker {__version__}")
    parser.add_argument("--socket", default=None, help=_SOCKET_HELP)
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info (serve: or the configuration file's log_level)")
    parser.add_argument("--log-format", default=None, choices=["text", "json"], help=_LOG_FORMAT_HELP)
    _add_admin_client_options(parser)
    # What every command takes.  --socket after the command overrides the one
    # before it, and is absent from the namespace when not given there.
    common = _Parser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, help=_SOCKET_HELP)
    common.add_argument("--json", action="store_true", help=_JSON_HELP)
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"], help=_LOG_FORMAT_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common], **kwargs)

    serve = command("serve", "run the broker", description=_SERVE_DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", default=None, metavar="PATH",
                       help="the configuration file (TOML; a complete commented example: deploy/grant-broker.toml); "
                            "options given here override it; SIGHUP reads it again")
    serve.add_argument("--backend", default=None, choices=["auto", "emulated", "xen"],
                       help="auto (default): the real Xen devices when /dev/xen/gntdev exists, else the emulated hypervisor")
    serve.add_argument("--socket-mode", type=_octal_mode, default=None, help="permissions of the sockets, octal (default 0660)")
    serve.add_argument("--socket-group", type=_socket_group, default=None, metavar="NAME|GID",
                       help="the group of the sockets (default: the broker's own): with --socket-mode 0660, clients "
                            "that have it as a supplemental group connect, non-root ones included")
    serve.add_argument("--grace", type=float, default=None, help="seconds in-flight calls get on shutdown (default 5)")
    serve.add_argument("--allow-uid", type=int, action="append", default=None, help="only these uids may open sessions (repeatable; default: whoever the socket mode lets in)")
    serve.add_argument("--allow-gid", type=int, action="append", default=None, help="... or these gids (repeatable)")
    grant_help = "(repeatable; [uid:|gid:]N:IDS, IDS like 3,4,10-19; root and the broker's own uid: any)"
    serve.add_argument("--allow-domain", type=_domain_grant, action="append", default=None, metavar="UID:DOMIDS",
                       help="the only domains a uid (gid:GID: its members) may act as where sessions choose their "
                            f"domain (emulated backend), reserved for it {grant_help}")
    serve.add_argument("--allow-vmid", type=_domain_grant, action="append", default=None, metavar="UID:VMIDS",
                       help=f"the same for mem-buf VMIDs {grant_help}")
    serve.add_argument("--act-as", choices=["owned", "granted", "any"], default=None,
                       help="what a uid granted no domain (VMID) may act as: owned (default) = one no grant names and no "
                            "other uid acted as before (the first uid to act as one owns it); granted = none; "
                            "any = any no grant names")
    serve.add_argument("--allow-remote", type=_domain_grant, action="append", default=None, metavar="UID:DOMIDS",
                       help="the only remote domains a uid may map grants of, grant to and bind event channels to "
                            f"(besides its own; a uid never named: any) {grant_help}")
    serve.add_argument("--allow-remote-vmid", type=_domain_grant, action="append", default=None, metavar="UID:VMIDS",
                       help=f"the only VMIDs a uid may name in mem-buf ACLs (besides its own; never named: any) {grant_help}")
    serve.add_argument("--max-grants-per-session", type=int, default=None, help="quota of mapped + shared grants per session")
    serve.add_argument("--max-subscriptions-per-session", type=int, default=None,
                       help="event-channel subscriptions (Subscribe streams) one session may hold (default 64)")
    serve.add_argument("--limit", type=_limit_setting, action="append", default=[], metavar="NAME=VALUE",
                       help="set any quota or per-session/per-uid budget, e.g. max_pool_pages_per_uid=1024 "
                            "(repeatable; the names and defaults: README, Security model)")
    serve.add_argument("--audit", default=None, metavar="off|stderr|syslog|FILE", help=_AUDIT_HELP)
    serve.add_argument("--metrics", type=_metrics_address, default=None, metavar="ADDRESS",
                       help="serve Prometheus/OpenMetrics metrics at http://ADDRESS/metrics: HOST:PORT, [IPV6]:PORT, "
                            ":PORT (every interface) or unix:PATH (default: off; the metrics: README, Metrics)")
    _add_admin_serve_options(serve)
    serve.add_argument("--status-view", choices=["own", "all"], default=None,
                       help="what Status shows: own (default) = administrators (root) see every session, "
                            "others only their own uid's; all = every session to anyone who can connect")

    command("status", "backend, capabilities, sessions and what they hold (with --admin: of a remote broker)")
    _add_admin_commands(command)

    health = command(
        "health", "one gRPC health check, for probes: exit 0 SERVING, 3 unreachable, 5 NOT_SERVING (see --help)",
        description="Ask the broker's gRPC health service once (grpc.health.v1 Health/Check) and print the state. "
        "Cheap enough for a probe every few seconds: no session, no event loop. Exit status: 0 SERVING, "
        "3 no broker answers, 5 NOT_SERVING (draining or stopping), 6 SERVICE_UNKNOWN, 7 any other answer.",
    )
    health.add_argument("--service", default="",
                        help="a service to ask about, e.g. grant_broker.v1.Gntdev (default: the broker as a whole)")
    health.add_argument("--timeout", type=float, default=2.0,
                        help="seconds to wait for the answer (default 2; keep it below the probe's timeoutSeconds)")

    plugin = command(
        "device-plugin", "offer the broker to Kubernetes pods as a resource (kubelet's device-plugin API)",
        description="Register a resource with kubelet and advertise --slots of it, healthy while the broker at "
                    "--socket is SERVING; a container given one gets the broker's socket directory mounted "
                    "read-only and GRANT_BROKER_SOCKET.  Registers again when kubelet restarts; runs until "
                    "SIGTERM/SIGINT.  See deploy/kubernetes/README.md.",
    )
    plugin.add_argument("--resource", default="grant-broker.io/broker", help="the resource name (default grant-broker.io/broker)")
    plugin.add_argument("--slots", type=int, default=100,
                        help="how many containers of the node may hold the resource at once (default 100)")
    plugin.add_argument("--kubelet-dir", default="/var/lib/kubelet/device-plugins",
                        help="kubelet's device-plugin directory, with its kubelet.sock (default /var/lib/kubelet/device-plugins)")
    plugin.add_argument("--endpoint", default="grant-broker.sock",
                        help="this plugin's socket, a name in --kubelet-dir (default grant-broker.sock)")
    plugin.add_argument("--host-socket-dir", default=None,
                        help="the broker's socket directory on the host, mounted into client containers "
                             "(default: the directory of --socket)")
    plugin.add_argument("--container-socket-dir", default=None,
                        help="where client containers see it (default: the same path as on the host)")
    plugin.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between looks at kubelet's directory and tries to reach kubelet or the broker (default 1)")
    plugin.add_argument("--probe-interval", type=float, default=10.0,
                        help="seconds between health checks of the broker while its health stream is open, which "
                             "tell a hung (stopped, stuck) broker (default 10)")
    plugin.add_argument("--probe-timeout", type=float, default=5.0,
                        help="seconds a health check may go unanswered before the broker counts as hung and the slots "
                             "unhealthy (default 5)")

    share = command("share", "share pages with a domain and print their refs (holds them until Ctrl-C)")
    share.add_argument("--to-domain", type=int, required=True, help="the domain that may map the pages")
    share.add_argument("--as-domain", type=int, default=None, help="act as this domain (emulated backend; default 1)")
    share.add_argument("--count", type=int, default=1, help="pages (default 1)")
    share.add_argument("--readonly", action="store_true", help="grant read-only")
    share.add_argument("--text", default="", help="write this text at the start of the first page")
    share.add_argument("--once", action="store_true", help="print and exit (releasing the pages) instead of holding")

    map_ = command("map", "map a domain's grant and dump it")
    map_.add_argument("--domain", type=int, required=True, help="the granting domain")
    map_.add_argument("--ref", type=int, required=True, action="append", help="grant ref (repeatable for several pages)")
    map_.add_argument("--as-domain", type=int, default=None, help="act as this domain (emulated backend; default 2)")
    map_.add_argument("--bytes", type=int, default=64, help="how many bytes to dump (default 64)")
    map_.add_argument("--write", default=None, help="write this text at offset 0 (needs a writable grant)")

    watch = command("watch", "bind an event channel and print its events until Ctrl-C")
    watch.add_argument("--as-domain", type=int, default=None, help="act as this domain (emulated backend)")
    watch.add_argument("--remote-domain", type=int, required=True)
    watch.add_argument("--remote-port", type=int, default=None, help="bind interdomain to this port (default: allocate an unbound port)")
    watch.add_argument("--count", type=int, default=0, help="exit after this many events (default: never)")

    notify = command("notify", "bind to a remote port and notify it")
    notify.add_argument("--as-domain", type=int, default=None, help="act as this domain (emulated backend)")
    notify.add_argument("--remote-domain", type=int, required=True)
    notify.add_argument("--remote-port", type=int, required=True)
    notify.add_argument("--times", type=int, default=1, help="notifications to send (default 1)")
    for each in (parser, common, *commands.choices.values()):
        assert isinstance(each, _Parser)
        each.json_errors = json_errors
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=None, sort_keys=True), flush=True)


def _print_error_json(
    command: str | None, code: int, operation: str, message: str, *, detail: str = "", grpc_code: str | None = None,
    gntst: int | None = None, gntst_name: str | None = None,
) -> None:
    """One failure as the one JSON object on stderr (see the epilog)."""
    from grant_broker_protocol.errors import errno_name
    from grant_broker_protocol.status import status_code_for

    error = {
        "command": command,
        "operation": operation,
        "errno": code,
        "errno_name": errno_name(code),
        "grpc_code": grpc_code or status_code_for(code).name,
        "message": message,
        "detail": detail,
        "gntst": gntst,
        "gntst_name": gntst_name,
    }
    print(json.dumps({"error": error}, sort_keys=True), file=sys.stderr, flush=True)


def _report(args: argparse.Namespace, exc: Exception) -> None:
    """Say why the command failed: a line of text, or the JSON error with --json."""
    from grant_broker_protocol.errors import BrokerError

    if not args.json:
        print(f"grant-broker {args.command}: {exc}", file=sys.stderr)
    elif isinstance(exc, BrokerError):
        code = getattr(exc, "code", None)  # a BrokerClientError's gRPC status
        _print_error_json(
            args.command, exc.errno, exc.operation, str(exc), detail=exc.detail,
            grpc_code=getattr(code, "name", None), gntst=exc.gntst, gntst_name=exc.gntst_name,
        )
    else:  # a ValueError: arguments the command or the SDK refused before any call
        _print_error_json(args.command, errno.EINVAL, _CHECK_OPERATION, str(exc))


def _hexdump(data: bytes) -> str:
    printable = set(string.printable) - set("\t\n\r\x0b\x0c")
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{byte:02x}" for byte in chunk)
        text = "".join(chr(byte) if chr(byte) in printable else "." for byte in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  {text}")
    return "\n".join(lines)


# ------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from grant_broker.daemon.run import serve
    from grant_broker_protocol.endpoints import fd_channel_path

    configuration = serve_configuration(args)
    config = configuration.server

    def ready(server: Any) -> None:
        caps = server.capabilities
        endpoint = server.metrics.endpoint if server.metrics is not None else None  # (none: kept for --admin-listen only)
        metrics = str(endpoint.address) if endpoint is not None else None
        admin = str(server.admin_listener.address) if server.admin_listener is not None else None
        features = [name for name in ("gntdev", "gntalloc", "evtchn", "grant_copy", "dmabuf_export", "dmabuf_import", "set_max_grants") if getattr(caps, name)]
        if args.json:
            _print_json({
                "event": "listening", "version": __version__, "socket": config.socket_path,
                "fd_channel": fd_channel_path(config.socket_path), "backend": caps.backend, "capabilities": features,
                "membuf_abi": caps.membuf_abi.value if caps.membuf_abi else None, "any_domain": caps.any_domain,
                "notes": list(caps.notes), "metrics": metrics, "admin": admin,
            })
            return
        print(f"grant-broker {__version__} listening on {config.socket_path} (fd channel {fd_channel_path(config.socket_path)})",
              flush=True)
        print(f"backend: {caps.backend}; capabilities: {', '.join(features)}"
              f"{'; mem-buf ABI ' + caps.membuf_abi.value if caps.membuf_abi else '; no mem-buf'}"
              f"{'; sessions may choose their domain' if caps.any_domain else ''}", flush=True)
        for note in caps.notes:
            print(f"note: {note}", flush=True)
        if metrics is not None:
            print(f"metrics: {metrics} (GET /metrics)", flush=True)
        if admin is not None:
            print(f"admin: {admin} (TLS, client certificates required)", flush=True)

    from grant_broker.daemon.logs import configure_audit, configure_logging

    configure_logging(configuration.log_level, configuration.log_format)
    close_audit = configure_audit(configuration.audit)
    try:
        reload = (lambda: serve_configuration(args)) if args.config is not None else None
        uvloop.run(serve(config, ready, reload=reload, running=configuration))
    finally:
        close_audit()
    return EXIT_OK


# serve's options and the configuration file's keys they override (daemon/config.py).
_SERVE_OPTION_KEYS = {
    "socket": "socket", "backend": "backend", "socket_mode": "socket_mode", "socket_group": "socket_group",
    "grace": "grace_seconds",
    "status_view": "status_view", "metrics": "metrics", "audit": "audit", "log_level": "log_level",
    "log_format": "log_format", "act_as": "policy.act_as",
    "admin_listen": "admin_listen", "admin_cert": "admin_cert", "admin_key": "admin_key",
    "admin_client_ca": "admin_client_ca",
    "max_grants_per_session": "limits.max_grants_per_session",
    "max_subscriptions_per_session": "limits.max_subscriptions_per_session",
}
_SERVE_LIST_OPTION_KEYS = {
    "admin_identity": "policy.admin_identities",
    "allow_uid": "policy.allow_uids", "allow_gid": "policy.allow_gids",
    "allow_domain": "policy.act_as_domains", "allow_vmid": "policy.act_as_vmids",
    "allow_remote": "policy.remote_domains", "allow_remote_vmid": "policy.remote_vmids",
}


def serve_configuration(args: argparse.Namespace) -> Any:
    """What ``serve`` runs with: ``--config``'s file with the options given on top (daemon/config.py).

    Raises:
        ConfigError: the file or the settings are refused (file, key and reason).
    """
    from grant_broker.daemon.config import resolve

    overrides: dict[str, Any] = {}
    for option, key in _SERVE_OPTION_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = value
    for option, key in _SERVE_LIST_OPTION_KEYS.items():
        values = getattr(args, option, None)
        if values is not None:
            overrides[key] = frozenset(values) if key.endswith(("uids", "gids")) else tuple(values)
    overrides.update({f"limits.{name}": value for name, value in args.limit})
    return resolve(args.config, overrides, _socket_default)


async def cmd_status(args: argparse.Namespace) -> int:
    if args.admin is not None:
        return await cmd_admin(args)
    import grpc

    from grant_broker_protocol.v1 import broker_pb2
    from grant_broker_client import connect
    from grant_broker_client.errors import BrokerClientError
    from google.protobuf.json_format import MessageToDict

    # Asked within a session of its own: the broker shows a caller without
    # one no session at all, and an administrator's session (root) every one.
    path = args.socket or _socket_default()
    try:
        session = await connect(path, client_name="grant-broker status")
    except BrokerClientError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            raise BrokerClientError(errno.ECONNREFUSED, "status", f"no broker answers on {path}", code=exc.code) from None
        raise
    async with session:
        status = await session.call(session.broker.Status, broker_pb2.StatusRequest(), timeout=10)
    # Its own session is not something the operator asked about.
    kept = [s for s in status.sessions if s.session_id != session.session_id]
    del status.sessions[:]
    status.sessions.extend(kept)
    if args.json:
        _print_json(MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
        return EXIT_OK
    _print_status(status)
    return EXIT_OK


def _print_status(status: Any) -> None:
    """A StatusResponse for the operator (``status`` without --json, on the socket or --admin)."""
    caps = status.capabilities
    # open_fds is 0 for a caller who may see only its own sessions.
    fds = f", {status.open_fds} open fds" if status.open_fds else ""
    print(f"grant-broker {status.version}, up {status.uptime_seconds:.0f}s{fds}")
    print(f"backend {caps.backend}: gntdev={caps.gntdev} gntalloc={caps.gntalloc} evtchn={caps.evtchn} "
          f"grant_copy={caps.grant_copy} dmabuf_export={caps.dmabuf_export} dmabuf_import={caps.dmabuf_import} "
          f"set_max_grants={caps.set_max_grants} membuf={caps.membuf_abi or 'none'}")
    for direction, missing in (("export", caps.dmabuf_export_missing), ("import", caps.dmabuf_import_missing)):
        if missing:
            print(f"dma-buf {direction} unavailable: {missing}")
    print(f"{len(status.sessions)} session(s)")
    if status.sessions:
        print(f"{'id':>5} {'pid':>7} {'uid':>6} {'dom':>5}  {'maps':>5} {'grants':>6} {'shared':>6} {'ports':>5} {'dmabuf':>6}  client")
        for s in status.sessions:
            u = s.usage
            print(f"{s.session_id:>5} {s.pid:>7} {s.uid:>6} {s.domid:>5}  {u.mappings:>5} {u.mapped_grants:>6} "
                  f"{u.granted_pages:>6} {u.event_channels:>5} {u.dmabufs:>6}  {s.client_name}")


async def _session(args: argparse.Namespace, default_domid: int | None) -> Any:
    from grant_broker_client import connect

    domid = args.as_domain if args.as_domain is not None else default_domid
    return await connect(args.socket, client_name=f"grant-broker {args.command}", domid=domid)


async def cmd_share(args: argparse.Namespace) -> int:
    session = await _session(args, 1)
    async with session:
        pages = await session.gntalloc.share(args.to_domain, args.count, writable=not args.readonly)
        async with pages:
            if args.text:
                data = args.text.encode()
                pages.view[: len(data)] = data
            result = {"domain": session.domid, "to_domain": args.to_domain, "refs": list(pages.refs),
                      "writable": not args.readonly}
            if args.json:
                _print_json(result)
            else:
                print(f"domain {session.domid} shares {len(pages.refs)} page(s) with domain {args.to_domain}: "
                      f"refs {' '.join(map(str, pages.refs))}", flush=True)
            if not args.once:
                if not args.json:
                    print("holding the grants; Ctrl-C releases them", flush=True)
                import asyncio

                await asyncio.Event().wait()
    return EXIT_OK


async def cmd_map(args: argparse.Namespace) -> int:
    session = await _session(args, 2)
    async with session:
        refs = [(args.domain, ref) for ref in args.ref]
        mapping = await session.gntdev.map(refs, writable=args.write is not None)
        async with mapping:
            if args.write is not None:
                data = args.write.encode()
                mapping.view[: len(data)] = data
            dumped = bytes(mapping.view[: max(0, min(args.bytes, len(mapping.view)))])
        if args.json:
            _print_json({"domain": args.domain, "refs": args.ref, "hex": dumped.hex()})
        else:
            print(f"domain {session.domid} mapped refs {' '.join(map(str, args.ref))} of domain {args.domain}:")
            print(_hexdump(dumped))
    return EXIT_OK


async def cmd_watch(args: argparse.Namespace) -> int:
    from grant_broker_client.evtchn import EventsLost

    session = await _session(args, None)
    async with session:
        if args.remote_port is None:
            port = await session.evtchn.bind_unbound_port(args.remote_domain)
        else:
            port = await session.evtchn.bind_interdomain(args.remote_domain, args.remote_port)
        if args.json:
            _print_json({"event": "bound", "domain": session.domid, "port": port, "remote_domain": args.remote_domain})
        else:
            print(f"domain {session.domid} port {port} bound for domain {args.remote_domain}; waiting for events", flush=True)
        seen = 0
        async with await session.evtchn.subscribe([port]) as events:
            async for event in events:
                seen += 1
                if isinstance(event, EventsLost):
                    record = {"event": "lost", "count": event.count}
                    text = f"{event.count} event(s) lost (this watcher fell behind)"
                else:
                    record = {"event": "fired", "port": event.port}
                    text = f"port {event.port} fired"
                if args.json:
                    _print_json(record)
                else:
                    print(text, flush=True)
                if args.count and seen >= args.count:
                    break
    return EXIT_OK


async def cmd_notify(args: argparse.Namespace) -> int:
    session = await _session(args, None)
    async with session:
        port = await session.evtchn.bind_interdomain(args.remote_domain, args.remote_port)
        for _ in range(args.times):
            await session.evtchn.notify(port)
        if args.json:
            _print_json({"domain": session.domid, "port": port, "remote_domain": args.remote_domain,
                         "remote_port": args.remote_port, "times": args.times})
            return EXIT_OK
        print(f"domain {session.domid} notified port {args.remote_port} of domain {args.remote_domain} "
              f"{args.times} time(s) through local port {port}")
    return EXIT_OK


async def cmd_device_plugin(args: argparse.Namespace) -> int:
    from grant_broker.deviceplugin import PluginConfig, run_until_signal

    config = PluginConfig(
        broker_socket=args.socket or _socket_default(),
        resource_name=args.resource,
        slots=args.slots,
        kubelet_dir=args.kubelet_dir,
        endpoint=args.endpoint,
        host_socket_dir=args.host_socket_dir,
        container_socket_dir=args.container_socket_dir,
        poll_interval=args.poll_interval,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
    )

    def ready(plugin: Any) -> None:
        if args.json:
            _print_json({"event": "device-plugin", "resource": config.resource_name, "slots": config.slots,
                         "endpoint": config.endpoint_path, "broker": config.broker_socket,
                         "client_socket": config.container_socket})
        else:
            print(f"grant-broker device-plugin: {config.resource_name} x{config.slots} on {config.endpoint_path}, "
                  f"healthy while {config.broker_socket} serves; clients get {config.container_socket}", flush=True)

    await run_until_signal(config, ready)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """One Health/Check; the exit status says the state (see the epilog)."""
    from grant_broker.daemon.health import Health, check_health

    path = args.socket or _socket_default()
    state, seen = check_health(path, args.service, args.timeout)
    if args.json:
        _print_json({"socket": path, "service": args.service, "status": state.value, "detail": seen})
    else:
        print(state.value if state is Health.SERVING else f"{state.value}: {seen}", flush=True)
    return {
        Health.SERVING: EXIT_OK,
        Health.UNREACHABLE: EXIT_UNREACHABLE,
        Health.NOT_SERVING: EXIT_NOT_SERVING,
        Health.SERVICE_UNKNOWN: EXIT_SERVICE_UNKNOWN,
        Health.UNKNOWN: EXIT_HEALTH_UNKNOWN,
    }[state]


def _exit_status(command: str, exc: BrokerError) -> int:
    """The exit status of *command* when it failed with *exc* (see the epilog)."""
    from grant_broker_protocol.status import status_code_for

    code = getattr(exc, "code", None) or status_code_for(exc.errno)  # a BrokerClientError carries the call's status
    name = getattr(code, "name", "")
    if command == "serve":
        # The broker's own start (its configuration, its sockets): no broker to reach, no policy to refuse it.
        return EXIT_USAGE if name == "INVALID_ARGUMENT" else EXIT_ERROR
    if name == "UNAVAILABLE":
        return EXIT_UNREACHABLE
    if name in ("PERMISSION_DENIED", "UNAUTHENTICATED") or exc.errno == errno.EDQUOT:
        return EXIT_REFUSED
    if name == "INVALID_ARGUMENT":
        return EXIT_USAGE
    return EXIT_ERROR


# ------------------------------------------------------------------ the remote admin API (--admin HOST:PORT)


def _add_admin_client_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "remote administration", "reach a broker's admin listener (serve --admin-listen) over TLS instead of its socket"
    )
    group.add_argument("--admin", default=None, metavar="HOST:PORT", help="the broker's admin listener")
    group.add_argument("--cert", default=None, help="this administrator's client certificate (PEM)")
    group.add_argument("--key", default=None, help="its private key (PEM)")
    group.add_argument("--ca", default=None, help="the CA bundle that signed the broker's certificate (PEM)")
    group.add_argument("--admin-timeout", type=float, default=10.0, help="seconds a call may take (default 10)")
    group.add_argument("--admin-server-name", default=None, metavar="NAME",
                       help="the name the broker's certificate must carry (default: the host of --admin)")


def _add_admin_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--admin-listen", default=None, metavar="HOST:PORT",
                       help="serve the remote admin API (status, sessions, metrics, release, drain, limits) on this "
                            "TCP address, TLS only with client certificates (default: off; README, Remote administration)")
    serve.add_argument("--admin-cert", default=None, metavar="PEM", help="the admin listener's certificate (chain)")
    serve.add_argument("--admin-key", default=None, metavar="PEM", help="its private key")
    serve.add_argument("--admin-client-ca", default=None, metavar="PEM",
                       help="the CA bundle the administrators' client certificates must chain to")
    serve.add_argument("--admin-identity", type=_admin_identity, action="append", default=None,
                       metavar="IDENTITY=RIGHTS",
                       help="give a client certificate identity (its subject CN, whole subject, or a DNS/URI/e-mail/IP "
                            "subject alternative name) rights: view, release, drain, limits or all, comma-separated "
                            "(repeatable; identities not named are refused)")


def _admin_identity(text: str) -> Any:
    from grant_broker.core.policy import AdminIdentity

    try:
        return AdminIdentity.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_admin_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    needs = " (needs --admin)"
    command("whoami", "the identity and rights a remote broker gives this certificate" + needs)
    describe = command("describe-session", "one session of a remote broker, by id" + needs)
    describe.add_argument("session_id", type=int)
    command("metrics", "a remote broker's metrics, in the Prometheus text format" + needs)
    release = command("release-session", "end a session as if its client had crashed (its unmap notifications fire)" + needs)
    release.add_argument("session_id", type=int)
    release.add_argument("--reason", default="", help="why, for the audit log")
    drain = command("drain", "NOT_SERVING, refuse new sessions, wait for the live ones to end" + needs)
    drain.add_argument("--deadline", type=float, default=60.0, help="seconds to wait for the sessions to end (default 60)")
    drain.add_argument("--release-at-deadline", action="store_true", help="then release the sessions still there")
    set_limit = command("set-limit", "change limits and budgets of a running broker, until its next reload or restart" + needs)
    set_limit.add_argument("settings", type=_limit_setting, nargs="+", metavar="NAME=VALUE")


async def cmd_admin(args: argparse.Namespace) -> int:
    """The commands served by a remote broker's admin listener."""
    from google.protobuf.json_format import MessageToDict

    from grant_broker_client.admin import connect_admin

    if args.admin is None:
        raise ValueError(f"{args.command} talks to a broker's admin listener: give --admin HOST:PORT --cert --key --ca")
    missing = [option for option in ("cert", "key", "ca") if getattr(args, option) is None]
    if missing:
        raise ValueError(f"--admin needs {', '.join('--' + option for option in missing)} (the admin listener is TLS only)")
    client = await connect_admin(args.admin, cert=args.cert, key=args.key, ca=args.ca, timeout=args.admin_timeout,
                                 server_name=args.admin_server_name)
    async with client:
        if args.command == "status":
            answer: Any = await client.status()
        elif args.command == "whoami":
            answer = await client.whoami()
        elif args.command == "describe-session":
            answer = await client.describe_session(args.session_id)
        elif args.command == "metrics":
            snapshot = await client.metrics()
            sys.stdout.write(snapshot.text.decode())
            return EXIT_OK
        elif args.command == "release-session":
            answer = await client.release_session(args.session_id, args.reason)
        elif args.command == "drain":
            answer = await client.drain(args.deadline, release_at_deadline=args.release_at_deadline)
        else:
            answer = await client.set_limits(dict(args.settings))
    result = MessageToDict(answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if args.json:
        _print_json(result)
    elif args.command == "status":
        print(f"{args.admin}: {'DRAINING (new sessions refused)' if answer.draining else 'serving'}")
        _print_status(answer.status)
    else:
        print(f"{args.admin} {args.command}:")
        print(json.dumps(result, indent=2, sort_keys=True))
    return EXIT_OK


_ASYNC_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    **{name: cmd_admin for name in ("whoami", "describe-session", "metrics", "release-session", "drain", "set-limit")},
    "status": cmd_status,
    "device-plugin": cmd_device_plugin,
    "share": cmd_share,
    "map": cmd_map,
    "watch": cmd_watch,
    "notify": cmd_notify,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "health":
        # A probe, every few seconds on every node: no logging set-up, no event loop.
        return cmd_health(args)
    from grant_broker_protocol.errors import BrokerError

    try:
        if args.command == "serve":
            return cmd_serve(args)  # its logs as its configuration file says
        from grant_broker.daemon.logs import configure_logging

        configure_logging(args.log_level or "info", args.log_format or "text")
        import uvloop

        return uvloop.run(_ASYNC_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokerError as exc:
        _report(args, exc)
        return _exit_status(args.command, exc)
    except ValueError as exc:
        _report(args, exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
