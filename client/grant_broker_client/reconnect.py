"""Surviving a broker restart: connect with backoff, and sessions that renew themselves.

A broker restart (a crash, ``systemctl restart``, an upgrade) ends every
session.  What the client sees:

* Every call of the old session fails with :class:`BrokerClientError` whose
  ``code`` is ``grpc.StatusCode.UNAVAILABLE`` — in flight or made later, also
  once the new broker is up (``Session.broker_lost`` is then true).  Event
  subscriptions end (a graceful stop ends them cleanly; a crash with
  UNAVAILABLE).
* Nothing the session held survives: its grants (gntalloc), mappings
  (gntdev), copy buffers, dma-buf exports/imports, event-channel ports and
  subscriptions are gone, and their unmap notifications have fired.  The
  new broker knows nothing of them; grant refs and port numbers may be
  handed out again to anyone.
* What the client process itself holds stays valid as memory: pages it
  mmapped (``Mapping.view``, ``SharedPages.view``) and descriptors it
  received (memfds on the emulated backend, dma-buf / mem-buf fds) remain
  readable and writable in the process until it unmaps/closes them — but
  they are no longer shared with anyone through the broker (tested on the
  emulated backend).  On real Xen the client's mmap holds a reference to the
  device file it came from, so the kernel keeps that mapping (and a gntalloc
  grant behind it) until the client unmaps — untested on hardware.
  Close the old objects (their ``aclose()`` does not call the dead session)
  and redo the work on a new session.

:func:`connect_with_retry` (also ``connect(..., retry=Retry())``) waits for a
broker that is not there yet; :class:`ReconnectingSession` hands out the
current session and opens a new one, with backoff, once the broker lost it::

    import grant_broker_client
    from grant_broker_client.reconnect import ReconnectingSession, Retry

    async def share_forever(path: str) -> None:
        async with ReconnectingSession(path, domid=1, retry=Retry(max_delay=2)) as broker:
            async def work(session: grant_broker_client.Session) -> None:
                async with await session.gntalloc.share(2, 1) as pages:   # redone after a restart
                    publish(pages.refs)
                    await serve_until_done(pages)
            await broker.run(work)   # re-runs work() on a new session after a broker restart
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar

import grpc

from grant_broker_client.errors import BrokerClientError
from grant_broker_client.session import DEFAULT_MAX_IN_FLIGHT, Session, connect

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with jitter for (re)connecting to the broker.

    Attempt *n* (from 0) waits ``min(max_delay, initial_delay * multiplier**n)``,
    scaled by a random factor in ``[1 - jitter, 1]`` so that many clients of a
    restarted broker do not reconnect in lockstep.  It gives up — raising the
    last UNAVAILABLE error — after *attempts* attempts or *timeout* seconds,
    whichever comes first (``None``: never).
    """

    initial_delay: float = 0.05
    max_delay: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    attempts: int | None = None
    timeout: float | None = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier**attempt)
        return base * (1 - self.jitter * (rng or random).random())


def _retriable(error: BrokerClientError) -> bool:
    # UNAVAILABLE: no socket, connection refused, the broker hung up during
    # the hello; EMFILE/ENFILE: the broker is out of descriptors for now.
    # Anything else (a policy refusal, a bad domain) will not change by waiting.
    return error.code == grpc.StatusCode.UNAVAILABLE or error.errno in (errno.EMFILE, errno.ENFILE)


async def connect_with_retry(
    socket_path: str | None = None,
    *,
    retry: Retry = Retry(),
    client_name: str = "",
    domid: int | None = None,
    vmid: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    fast_path: bool = True,
) -> Session:
    """:func:`grant_broker_client.connect`, retried with *retry*'s backoff while
    the broker is unavailable (not started yet, restarting).

    Raises:
        BrokerClientError: UNAVAILABLE once *retry* gives up; any other error
            of the hello at once (e.g. PERMISSION_DENIED by the broker's policy).
    """
    loop = asyncio.get_running_loop()
    deadline = None if retry.timeout is None else loop.time() + retry.timeout
    attempt = 0
    while True:
        try:
            return await connect(
                socket_path, client_name=client_name, domid=domid, vmid=vmid, max_in_flight=max_in_flight, fast_path=fast_path
            )
        except BrokerClientError as exc:
            if not _retriable(exc):
                raise
            attempt += 1
            pause = retry.delay(attempt - 1)
            out_of_attempts = retry.attempts is not None and attempt >= retry.attempts
            out_of_time = deadline is not None and loop.time() + pause > deadline
            if out_of_attempts or out_of_time:
                raise BrokerClientError(
                    exc.errno, exc.operation,
                    f"{exc.detail} (gave up after {attempt} attempt{'s' if attempt > 1 else ''})",
                    code=exc.code,
                ) from None
            log.debug("broker unavailable (%s); attempt %d again in %.2fs", exc, attempt + 1, pause)
            await asyncio.sleep(pause)


class ReconnectingSession:
    """A session that is replaced by a new one when the broker loses it.

    :meth:`session` returns the current session, or — when the broker lost it
    (:attr:`Session.broker_lost`) — closes it and opens a new one with
    :func:`connect_with_retry`.  :attr:`generation` counts the sessions
    opened.  :meth:`run` runs a piece of work and runs it again on a new
    session whenever it fails because the broker went away.  Nothing of an
    old session carries over (see the module docstring).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        retry: Retry = Retry(),
        client_name: str = "",
        domid: int | None = None,
        vmid: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._connect_args = dict(
            retry=retry, client_name=client_name, domid=domid, vmid=vmid, max_in_flight=max_in_flight
        )
        self._path = socket_path
        self._session: Session | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.generation = 0

    async def session(self) -> Session:
        """The live session: the current one, or a new one if the broker lost it."""
        if self._closed:
            raise BrokerClientError(errno.EPIPE, "reconnecting session", "closed", code=grpc.StatusCode.UNAVAILABLE)
        async with self._lock:
            current = self._session
            if current is not None and not current.broker_lost and not current.closed:
                return current
            if current is not None:
                self._session = None
                await current.close()
            self._session = await connect_with_retry(self._path, **self._connect_args)  # type: ignore[arg-type]
            self.generation += 1
            return self._session

    async def run(self, work: Callable[[Session], Awaitable[_T]], *, max_renewals: int | None = None) -> _T:
        """``await work(session)``; if it fails because the broker went away
        (UNAVAILABLE and the session lost), run it again on a new session —
        at most *max_renewals* times (``None``: no limit)."""
        renewals = 0
        while True:
            session = await self.session()
            try:
                return await work(session)
            except BrokerClientError as exc:
                lost = exc.code == grpc.StatusCode.UNAVAILABLE and (session.broker_lost or await _gone(session))
                if not lost or (max_renewals is not None and renewals >= max_renewals):
                    raise
                renewals += 1
                log.info("the broker lost session %d (%s); opening a new one", session.session_id, exc)

    async def aclose(self) -> None:
        """Close the current session.  Idempotent."""
        self._closed = True
        async with self._lock:
            if self._session is not None:
                session, self._session = self._session, None
                await session.close()

    async def __aenter__(self) -> Self:
        await self.session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def _gone(session: Session, wait: float = 1.0) -> bool:
    """Whether *session*'s fd channel hangs up within *wait* seconds: an
    UNAVAILABLE call may fail a moment before the SDK reads the hang-up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        if session.broker_lost:
            return True
        await asyncio.sleep(0.01)
    return session.broker_lost


__all__ = ["ReconnectingSession", "Retry", "connect_with_retry"]
