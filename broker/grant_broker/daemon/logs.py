"""Where the broker's two logs go, and in what form.

* The operational log (every logger but the audit one, through the root
  logger): ``text`` — ``TIME LEVEL LOGGER: MESSAGE``, or, under journald (its
  stream is the one ``$JOURNAL_STREAM`` names), ``<PRIORITY>LEVEL LOGGER:
  MESSAGE`` — the journal stamps the time itself and reads the priority
  prefix (``journalctl -p warning`` works); or ``json`` — one object a line,
  ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
  identity fields of the session the record concerns (``session_id``,
  ``uid``, ``pid``, ``client_name``, ``domain``; see
  :mod:`grant_broker.core.audit`) and ``exception`` (a traceback) when there
  is one.
* The audit log (:mod:`grant_broker.core.audit`, logger ``grant_broker.audit``):
  one JSON object a line, ``timestamp``, ``logger``, ``event``, the
  session's identity fields and the event's own, to ``stderr`` (with the
  operational log; ``select(.logger == "grant_broker.audit")``), ``syslog``
  (``/dev/log``, facility authpriv, tag ``grant-broker-audit``), a file
  (appended to, created mode 0640, reopened within a second when logrotate
  moves it), or
  nowhere (``off``: each audit call is then one level check).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from grant_broker.core.audit import AUDIT_LOGGER, IDENTITY_FIELDS, OFF, audit_log
from grant_broker_protocol.errors import BrokerError

log = logging.getLogger(__name__)

LOG_FORMATS = ("text", "json")
AUDIT_OFF = "off"
AUDIT_STDERR = "stderr"
AUDIT_SYSLOG = "syslog"
AUDIT_DEFAULT = AUDIT_STDERR
"""``serve --audit``'s default: on, with the operational log — which systemd
gives to the journal and a container runtime to its log."""
SYSLOG_SOCKET = "/dev/log"
AUDIT_FILE_MODE = 0o640
REOPEN_CHECK_SECONDS = 1.0
"""How often an audit file is checked for having been moved (logrotate)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s: %(message)s"

# syslog priorities of the levels (sd-daemon(3) prefixes).
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


_encode = json.JSONEncoder(default=str).encode  # made once (json.dumps with options makes one a call)
_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _timestamp(record: logging.LogRecord) -> str:
    """*record*'s time as ISO 8601 UTC, to the millisecond."""
    global _second
    second, text = _second
    if second != int(record.created):
        second = int(record.created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, text)
    return f"{text}.{int(record.msecs):03d}Z"


def under_journald(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether *stream* is connected to the journal: systemd sets ``$JOURNAL_STREAM``
    to ``DEVICE:INODE`` of the stream it gives a service (systemd.exec(5)), and a
    process whose stderr went elsewhere (a redirection) may still inherit it."""
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, io.UnsupportedOperation):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class JsonFormatter(logging.Formatter):
    """The operational log as one JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in IDENTITY_FIELDS:
            if name in fields:
                entry[name] = fields[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return _encode(entry)


class JournalFormatter(logging.Formatter):
    """Text for the journal: no time of its own, the level as a priority prefix."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.priority = _PRIORITIES.get(record.levelno, 6)
        return super().format(record)


class AuditFormatter(logging.Formatter):
    """An audit record (:mod:`grant_broker.core.audit`) as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        return _encode({
            "timestamp": _timestamp(record),
            "logger": record.name,
            "event": record.msg,
            **(fields.get("audit_identity") or {}),
            **(fields.get("audit") or {}),
        })


def configure_logging(level: str = "info", log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """The operational log on *stream* (stderr) at *level*, in *log_format*
    (:data:`LOG_FORMATS`).  As ``logging.basicConfig``: a process whose root
    logger has handlers already keeps them (the handler is made anyway, and returned)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    return handler


class _AuditFile(logging.handlers.WatchedFileHandler):
    """An audit file: appended to, created readable by the broker's group only
    (the records name other users' sessions), reopened when it is moved away
    (looked for at most every :data:`REOPEN_CHECK_SECONDS`, not at each record:
    a ``stat`` per record cost as much as a quarter of the record; what is
    written meanwhile goes to the moved file)."""

    _checked = 0.0

    def reopenIfNeeded(self) -> None:
        now = time.monotonic()
        if now - self._checked >= REOPEN_CHECK_SECONDS:
            self._checked = now
            super().reopenIfNeeded()

    def _open(self) -> Any:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, AUDIT_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115 - the handler closes it


def _audit_handler(target: str, stream: TextIO | None) -> logging.Handler:
    operation = "open the audit log"
    if target == AUDIT_STDERR:
        return logging.StreamHandler(sys.stderr if stream is None else stream)
    if target == AUDIT_SYSLOG:
        if not os.path.exists(SYSLOG_SOCKET):
            raise BrokerError(
                errno.ENOENT, operation, f"--audit syslog: there is no {SYSLOG_SOCKET} (no syslog daemon or journald)"
            )
        handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
        handler.ident = "grant-broker-audit: "
        return handler
    try:
        return _AuditFile(target, encoding="utf-8")
    except OSError as exc:
        raise BrokerError(exc.errno or errno.EIO, operation, f"cannot open {target}") from None


def configure_audit(target: str = AUDIT_DEFAULT, *, stream: TextIO | None = None) -> Callable[[], None]:
    """Send the audit records to *target*: ``off``, ``stderr`` (*stream*
    instead, for tests), ``syslog`` or a file path (``./off`` for a file of that
    name), each written (and flushed) as it is made — before the reply of the
    call it records.  Replaces what an earlier call set up; returns what undoes
    it (closing the destination).

    Raises:
        BrokerError: the destination cannot be opened (the errno says why).
    """
    _reset_audit()
    if target == AUDIT_OFF:
        return _reset_audit  # (its level is OFF: every audit call stops at its level check)
    handler = _audit_handler(target, stream)
    handler.setFormatter(AuditFormatter())
    setattr(handler, "_grant_broker_audit", True)
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)  # whatever the operational log's level
    log.info("audit records go to %s", target)
    return _reset_audit


def _reset_audit() -> None:
    for handler in list(audit_log.handlers):
        if getattr(handler, "_grant_broker_audit", False):
            audit_log.removeHandler(handler)
            handler.close()
    audit_log.setLevel(OFF)

