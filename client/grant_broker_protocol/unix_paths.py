"""Taking a Unix socket path over from whoever had it before: the broker's own
sockets, the metrics', and the device plugin's endpoint (a process of its own
that imports nothing of the broker, hence here, in the shared package)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from grant_broker_protocol.errors import BrokerError

log = logging.getLogger(__name__)


def claim_unix_path(path: str, kind: socket.SocketKind, operation: str, live: str) -> None:
    """Make *path* free for a new Unix socket of *kind*: remove a stale
    socket (nothing accepts on it), refuse a live one and anything that is
    not a socket.

    Raises:
        BrokerError: EEXIST for a file that is not a socket, EADDRINUSE for a
            live socket (*live* names who might be serving there, e.g.
            "another broker"), or the errno of a probe that failed otherwise;
            each error names *operation*.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BrokerError(errno.EEXIST, operation, f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        raise BrokerError(exc.errno or errno.EIO, operation, f"cannot probe {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise BrokerError(errno.EADDRINUSE, operation, f"{live} is serving on {path}")
