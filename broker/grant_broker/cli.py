"""``grant-broker``: run the broker, and operate it.

Run ``grant-broker --help`` or ``grant-broker COMMAND --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import string
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from grant_broker import __version__
from grant_broker_protocol.errors import BrokerError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

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
gives that errno.  Exit status: 0 done, 1 refused or failed, 2 bad command line.
"""

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
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info")
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help=_LOG_FORMAT_HELP)
    # What every command takes.  --socket after the command overrides the one
    # before it, and is absent from the namespace when not given there.
    common = _Parser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, help=_SOCKET_HELP)
    common.add_argument("--json", action="store_true", help=_JSON_HELP)
    common.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"], help=_LOG_FORMAT_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common], **kwargs)

    serve = command("serve", "run the broker", description="Run the broker in the foreground until SIGTERM/SIGINT.")
    serve.add_argument("--backend", default="auto", choices=["auto", "emulated", "xen"],
                       help="auto (default): the real Xen devices when /dev/xen/gntdev exists, else the emulated hypervisor")
    serve.add_argument("--socket-mode", type=_octal_mode, default=0o660, help="permissions of the sockets, octal (default 0660)")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on shutdown (default 5)")
    serve.add_argument("--allow-uid", type=int, action="append", default=[], help="only these uids may open sessions (repeatable; default: whoever the socket mode lets in)")
    serve.add_argument("--allow-gid", type=int, action="append", default=[], help="... or these gids (repeatable)")
    grant_help = "(repeatable; [uid:|gid:]N:IDS, IDS like 3,4,10-19; root and the broker's own uid: any)"
    serve.add_argument("--allow-domain", type=_domain_grant, action="append", default=[], metavar="UID:DOMIDS",
                       help="the only domains a uid (gid:GID: its members) may act as where sessions choose their "
                            f"domain (emulated backend), reserved for it {grant_help}")
    serve.add_argument("--allow-vmid", type=_domain_grant, action="append", default=[], metavar="UID:VMIDS",
                       help=f"the same for mem-buf VMIDs {grant_help}")
    serve.add_argument("--act-as", choices=["owned", "granted", "any"], default="owned",
                       help="what a uid granted no domain (VMID) may act as: owned (default) = one no grant names and no "
                            "other uid acted as before (the first uid to act as one owns it); granted = none; "
                            "any = any no grant names")
    serve.add_argument("--allow-remote", type=_domain_grant, action="append", default=[], metavar="UID:DOMIDS",
                       help="the only remote domains a uid may map grants of, grant to and bind event channels to "
                            f"(besides its own; a uid never named: any) {grant_help}")
    serve.add_argument("--allow-remote-vmid", type=_domain_grant, action="append", default=[], metavar="UID:VMIDS",
                       help=f"the only VMIDs a uid may name in mem-buf ACLs (besides its own; never named: any) {grant_help}")
    serve.add_argument("--max-grants-per-session", type=int, default=None, help="quota of mapped + shared grants per session")
    serve.add_argument("--max-subscriptions-per-session", type=int, default=None,
                       help="event-channel subscriptions (Subscribe streams) one session may hold (default 64)")
    serve.add_argument("--limit", type=_limit_setting, action="append", default=[], metavar="NAME=VALUE",
                       help="set any quota or per-session/per-uid budget, e.g. max_pool_pages_per_uid=1024 "
                            "(repeatable; the names and defaults: README, Security model)")
    serve.add_argument("--audit", default="off", metavar="off|stderr|syslog|FILE", help=_AUDIT_HELP)
    serve.add_argument("--metrics", type=_metrics_address, default=None, metavar="ADDRESS",
                       help="serve Prometheus/OpenMetrics metrics at http://ADDRESS/metrics: HOST:PORT, [IPV6]:PORT, "
                            ":PORT (every interface) or unix:PATH (default: off; the metrics: README, Metrics)")
    serve.add_argument("--status-view", choices=["own", "all"], default="own",
                       help="what Status shows: own (default) = administrators (root) see every session, "
                            "others only their own uid's; all = every session to anyone who can connect")

    command("status", "backend, capabilities, sessions and what they hold")

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
    from grant_broker.daemon.server import ServerConfig
    from grant_broker.core.policy import Limits, Policy
    from grant_broker_protocol.endpoints import fd_channel_path

    quotas = {
        "max_grants_per_session": args.max_grants_per_session,
        "max_subscriptions_per_session": args.max_subscriptions_per_session,
    }
    settings = {name: value for name, value in quotas.items() if value is not None}
    settings.update(dict(args.limit))
    limits = Limits(**settings)
    config = ServerConfig(
        socket_path=args.socket or _socket_default(),
        backend=args.backend,
        socket_mode=args.socket_mode,
        grace_seconds=args.grace,
        policy=Policy(
            allowed_uids=frozenset(args.allow_uid),
            allowed_gids=frozenset(args.allow_gid),
            act_as_domains=tuple(args.allow_domain),
            act_as_vmids=tuple(args.allow_vmid),
            remote_domains=tuple(args.allow_remote),
            remote_vmids=tuple(args.allow_remote_vmid),
            act_as=args.act_as,
        ),
        limits=limits,
        status_view=args.status_view,
        metrics=args.metrics,
    )

    def ready(server: Any) -> None:
        caps = server.capabilities
        metrics = str(server.metrics.endpoint.address) if server.metrics is not None else None
        features = [name for name in ("gntdev", "gntalloc", "evtchn", "grant_copy", "dmabuf", "set_max_grants") if getattr(caps, name)]
        if args.json:
            _print_json({
                "event": "listening", "version": __version__, "socket": config.socket_path,
                "fd_channel": fd_channel_path(config.socket_path), "backend": caps.backend, "capabilities": features,
                "membuf_abi": caps.membuf_abi.value if caps.membuf_abi else None, "any_domain": caps.any_domain,
                "notes": list(caps.notes), "metrics": metrics,
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

    from grant_broker.daemon.logs import configure_audit

    close_audit = configure_audit(args.audit)
    try:
        uvloop.run(serve(config, ready))
    finally:
        close_audit()
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
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
    caps = status.capabilities
    # open_fds is 0 for a caller who may see only its own sessions.
    fds = f", {status.open_fds} open fds" if status.open_fds else ""
    print(f"grant-broker {status.version}, up {status.uptime_seconds:.0f}s{fds}")
    print(f"backend {caps.backend}: gntdev={caps.gntdev} gntalloc={caps.gntalloc} evtchn={caps.evtchn} "
          f"grant_copy={caps.grant_copy} dmabuf={caps.dmabuf} set_max_grants={caps.set_max_grants} "
          f"membuf={caps.membuf_abi or 'none'}")
    print(f"{len(status.sessions)} session(s)")
    if status.sessions:
        print(f"{'id':>5} {'pid':>7} {'uid':>6} {'dom':>5}  {'maps':>5} {'grants':>6} {'shared':>6} {'ports':>5} {'dmabuf':>6}  client")
        for s in status.sessions:
            u = s.usage
            print(f"{s.session_id:>5} {s.pid:>7} {s.uid:>6} {s.domid:>5}  {u.mappings:>5} {u.mapped_grants:>6} "
                  f"{u.granted_pages:>6} {u.event_channels:>5} {u.dmabufs:>6}  {s.client_name}")
    return EXIT_OK


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


_ASYNC_COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "status": cmd_status,
    "share": cmd_share,
    "map": cmd_map,
    "watch": cmd_watch,
    "notify": cmd_notify,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    from grant_broker.daemon.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "serve":
            return cmd_serve(args)
        import uvloop

        return uvloop.run(_ASYNC_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokerError as exc:
        _report(args, exc)
        return EXIT_ERROR
    except ValueError as exc:
        _report(args, exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
