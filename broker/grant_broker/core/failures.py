"""What a client is told of a failure, whichever transport carries it."""

from __future__ import annotations

import errno
import logging

from grant_broker_protocol.errors import BrokerError

log = logging.getLogger(__name__)

# Errors any system call may give when the broker runs short of a resource:
# the caller is told RESOURCE_EXHAUSTED (with the errno), not INTERNAL,
# wherever in the broker the call ran into it.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})


def as_broker_error(exc: BaseException) -> BrokerError:
    """*exc* as the error a client gets: a BrokerError as it is; the broker
    running short of a resource as that errno; anything else — a bug — as
    EIO "internal error", logged with its traceback."""
    if isinstance(exc, BrokerError):
        return exc
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        log.warning("a call ran out of resources: %s", exc)
        return BrokerError(exc.errno, "broker", f"the broker is short of resources: {exc.strerror}")
    log.error("unexpected error in a call", exc_info=exc)
    return BrokerError(errno.EIO, "broker", f"internal error: {type(exc).__name__}: {exc}")
