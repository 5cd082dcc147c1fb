"""Client sessions: who is connected, what each holds, and its release.

A session is born when a client's fd channel says hello and its peer
credentials pass the policy (:mod:`grant_broker.core.registry`); it dies when
that connection closes, whatever the reason.  It owns its own device
instances — opened lazily — and every descriptor, mapping, grant and port it
created; :meth:`Session.release` gives all of them back, which fires the
unmap notifications of its mappings.

What it holds is counted against its budgets and its uid's
(:mod:`grant_broker.core.budgets`): operations call :meth:`Session.charge`
before they take something and :meth:`Session.credit` when they give it back;
:meth:`Session.release` credits whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from grant_broker.backend.contract import Backend, EvtchnHandle, GntallocInstance, GntdevInstance, MemBufDevice
from grant_broker.core import audit
from grant_broker.core.budgets import CALLS, FDS_HELD, Budget, UserBudget, over_budget
from grant_broker.core.events import EventHub
from grant_broker.core.policy import DomainOwners, Limits, Policy
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import FdChannel, PeerCredentials
from grant_broker_protocol.fds import OwnedFd
from grant_broker_protocol.transfers import TransferTable, select_fds

log = logging.getLogger(__name__)

_State = TypeVar("_State")

# The session whose call the current task is serving, and that task, once
# counted (Session.call_in_flight, Session.take_call).  A context variable,
# not the task alone: a fast-path call's first step runs in a reader
# callback — no task — in a context of its own (transport/eager.py).
_COUNTED_CALL: contextvars.ContextVar["tuple[Session, asyncio.Task[Any] | None] | None"] = contextvars.ContextVar(
    "grant_broker_counted_call", default=None
)


def _current_task() -> "asyncio.Task[Any] | None":
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


@dataclass
class Usage:
    """What a session holds, as counts (shown by Status and DescribeSession)."""

    mappings: int = 0
    mapped_grants: int = 0
    allocations: int = 0
    granted_pages: int = 0
    event_channels: int = 0
    dmabufs: int = 0
    membufs: int = 0
    subscriptions: int = 0


class Session:
    """One authenticated client connection and everything it holds."""

    policy: Policy = Policy()
    """The broker's policy, which the calls check the domains they name
    against (set by the registry that opened the session)."""
    owners: DomainOwners | None = None
    """Who owns which domain and VMID on this broker (the registry's; None for
    a session made without one: no owners are checked)."""

    def __init__(
        self,
        session_id: int,
        channel: FdChannel,
        creds: PeerCredentials,
        backend: Backend,
        client_name: str,
        limits: Limits,
        event_hub: EventHub,
        user: UserBudget | None = None,
    ) -> None:
        self.id = session_id
        self.token = secrets.token_urlsafe(32)
        self.channel = channel
        self.creds = creds
        self.backend = backend
        self.client_name = client_name
        self.limits = limits
        self.event_hub = event_hub  # the broker's, shared by every session's event reader
        self.created = time.monotonic()
        self.usage = Usage()
        # Who it is, for the records of both logs that concern it (core/audit.py).
        self.log_fields: dict[str, object] = audit.identity(self)
        self.closed = asyncio.Event()
        # Per-area state (gntdev ledger, event channels, ...), made by the
        # operations on first use; see service_state().
        self.resources: dict[str, Any] = {}
        # The budgets of the session's uid, shared with its other sessions
        # (the registry's); a session made on its own has its own.
        self.user = user if user is not None else UserBudget(creds.uid, limits)
        self.held: Counter[Budget] = Counter()
        self.incoming = TransferTable(
            max_pending=limits.max_pending_fd_frames,
            expire_after=limits.fd_transfer_expiry_seconds,
            budget=_PendingDescriptors(self),
        )
        self._gntdev: GntdevInstance | None = None
        self._gntalloc: GntallocInstance | None = None
        self._evtchn: EvtchnHandle | None = None
        self._membuf: MemBufDevice | None = None
        self._cleanups: list[Callable[[], object]] = []

    # ---------------------------------------------------------------- devices

    @property
    def domid(self) -> int:
        return self.backend.domid

    @property
    def vmid(self) -> int:
        return self.backend.vmid

    @property
    def gntdev(self) -> GntdevInstance:
        if self._gntdev is None:
            self.check_live("session")
            self._gntdev = self.backend.open_gntdev()
        return self._gntdev

    @property
    def gntalloc(self) -> GntallocInstance:
        if self._gntalloc is None:
            self.check_live("session")
            self._gntalloc = self.backend.open_gntalloc()
        return self._gntalloc

    @property
    def evtchn(self) -> EvtchnHandle:
        if self._evtchn is None:
            self.check_live("session")
            self._evtchn = self.backend.open_evtchn()
        return self._evtchn

    @property
    def membuf(self) -> MemBufDevice:
        if self._membuf is None:
            self.check_live("session")
            self._membuf = self.backend.open_membuf()
        return self._membuf

    def check_live(self, operation: str) -> None:
        """ECANCELED once the session has been released: after an await, an
        operation must not open devices (lazily) that nobody would close."""
        if self.closed.is_set():
            raise BrokerError(errno.ECANCELED, operation, f"session {self.id} has ended")

    def connected(self) -> bool:
        """Whether the client's fd channel is still there (asked of the kernel
        now: a token is good only while its fd channel is connected)."""
        return not self.closed.is_set() and not self.channel.hung_up()

    def service_state(self, key: str, factory: Callable[[], _State]) -> _State:
        """The state of one area of operations for this session under *key*,
        made by *factory* on first use; its ``close()``, if it has one, runs
        when the session is released."""
        state = self.resources.get(key)
        if state is None:
            state = self.resources[key] = factory()
            close = getattr(state, "close", None)
            if close is not None:
                self.on_release(close)
        return state

    def on_release(self, cleanup: Callable[[], object]) -> None:
        """Run *cleanup* when the session is released (last registered runs first)."""
        self._cleanups.append(cleanup)

    def check_quota(self, operation: str, what: str, used: int, adding: int, limit: int, name: str | None = None) -> None:
        """EDQUOT when *adding* to *used* of *what* would pass *limit* (the
        ``Limits`` field *name*, which the refusal names)."""
        if used + adding > limit:
            budget = f" (budget {name})" if name else ""
            raise audit.refused(self, BrokerError(
                errno.EDQUOT,
                operation,
                f"this session holds {used} {what} and asked for {adding} more; the limit is {limit}{budget}",
            ))

    # ---------------------------------------------------------------- budgets

    def charge(self, operation: str, budget: Budget, count: int = 1) -> None:
        """Count *count* more of *budget* against this session and its uid.

        Raises:
            BrokerError: EDQUOT naming the budget (session's or uid's) and its
                limit, counting nothing; ECANCELED once the session is released
                (nothing would credit it back).
        """
        self.check_live(operation)
        used = self.held[budget]
        limit = budget.session_limit(self.limits)
        if limit is not None and used + count > limit:
            assert budget.per_session is not None
            refusal = over_budget(operation, "this session holds", budget, budget.per_session, used, count, limit)
            raise audit.refused(self, refusal)
        try:
            self.user.charge(operation, budget, count)
        except BrokerError as exc:
            audit.refused(self, exc)
            raise
        self.held[budget] += count

    def credit(self, budget: Budget, count: int = 1) -> None:
        """Give back *count* of *budget*.  After the release (which credited
        everything) it does nothing, so a late path cannot credit twice."""
        count = min(count, self.held[budget])
        if count <= 0:
            return
        self.held[budget] -= count
        self.user.credit(budget, count)

    def call_in_flight(self, operation: str) -> "contextlib.AbstractContextManager[None]":
        """A call of this session is being served (bounded by the CALLS budget):
        a context manager, which takes a place on entering and gives it back
        on leaving.

        Counted once per call however many layers say so: a transport may
        take the place before it reads the request (the gRPC handler:
        :meth:`take_call`), and the route table takes it around every
        operation (:mod:`grant_broker.core.routes`); within the same task,
        the inner one is the outer one's (a task made meanwhile inherits the
        context, not the task: it is counted on its own).

        Raises (on entering):
            BrokerError: EDQUOT past the session's or its uid's budget of calls
                in flight; ECANCELED once the session is released.
        """
        here = (self, _current_task())
        if _COUNTED_CALL.get() == here:
            return _COUNTED
        return _InFlight(self, operation, here)

    def take_call(self, operation: str) -> "CallSlot":
        """A place among this session's calls in flight for the call the
        current task serves (a task serving no call of this session yet),
        taken now; meanwhile :meth:`call_in_flight` in this task is this
        place.  It is given back by :meth:`CallSlot.release` (in this task),
        or else when the task ends, whichever comes first: a call that dies
        before it is served (cancelled while its request is read) does not
        keep it.

        Raises:
            BrokerError: as :meth:`call_in_flight` does; EIO outside a task
                (nothing would give the place back).
        """
        task = _current_task()
        if task is None:
            raise BrokerError(errno.EIO, operation, "internal error: a call's place is taken in the task that serves it")
        self._charge_call(operation)
        slot = CallSlot(self, _COUNTED_CALL.set((self, task)))
        task.add_done_callback(slot.release)
        return slot

    # Every call takes a place (CALLS) and gives it back, so these two do what
    # charge(operation, CALLS) and credit(CALLS) do, in fewer steps: a Budget
    # hashes in Python, and those general paths hash it a dozen times a call.
    # Refusals go through charge(), for its messages and audit record.

    def _charge_call(self, operation: str) -> None:
        if self.closed.is_set():
            self.check_live(operation)  # raises
        held = self.held
        used = held.get(CALLS, 0)
        user = self.user
        user_held = user.held
        user_used = user_held.get(CALLS, 0)
        if used >= getattr(self.limits, _CALLS_PER_SESSION) or user_used >= getattr(user.limits, _CALLS_PER_UID):
            self.charge(operation, CALLS)  # refuses (EDQUOT), naming the budget
            return
        held[CALLS] = used + 1
        user_held[CALLS] = user_used + 1

    def _credit_call(self) -> None:
        held = self.held
        used = held.get(CALLS, 0)
        if used <= 0:  # released meanwhile: everything was credited then
            return
        held[CALLS] = used - 1
        # UserBudget.credit(CALLS, 1): a count that falls to zero leaves the uid's Counter.
        user_held = self.user.held
        left = user_held.get(CALLS, 0) - 1
        if left > 0:
            user_held[CALLS] = left
        else:
            user_held.pop(CALLS, None)

    def _credit_all(self) -> None:
        held, self.held = self.held, Counter()
        for budget, count in held.items():
            if count > 0:
                self.user.credit(budget, count)

    # ---------------------------------------------------------------- descriptors from the client

    async def take_fds(self, operation: str, transfer_id: int, indexes: Sequence[int]) -> list[OwnedFd]:
        """The client's descriptors of *transfer_id* at *indexes*, whichever way
        they came; the caller owns them.  Descriptors of the transfer that no
        index names are closed."""
        fds = await self.incoming.take(operation, transfer_id, timeout=self.limits.fd_frame_wait_seconds)
        return select_fds(operation, transfer_id, fds, indexes)

    # ---------------------------------------------------------------- life

    def release(self) -> None:
        """Give back everything the session holds.  Idempotent."""
        if self.closed.is_set():
            return
        self.closed.set()
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in reversed(cleanups):
            with _logged(f"session {self.id}: cleanup", self):
                cleanup()
        self.incoming.close(BrokerError(errno.ECANCELED, "session", f"session {self.id} ended"))
        for name in ("_gntdev", "_gntalloc", "_evtchn", "_membuf"):
            device = getattr(self, name)
            setattr(self, name, None)
            if device is not None:
                with _logged(f"session {self.id}: closing {name[1:]}", self):
                    device.close()
        with _logged(f"session {self.id}: closing backend", self):
            self.backend.close()
        self.channel.close()
        # Everything is given back now, whichever paths the resources took.
        self._credit_all()
        log.info("session %d (%r, pid %d) released", self.id, self.client_name, self.creds.pid, extra=self.log_fields)


_CALLS_PER_SESSION: str = CALLS.per_session or ""
_CALLS_PER_UID: str = CALLS.per_uid
assert _CALLS_PER_SESSION, "the CALLS budget has a per-session limit"


class CallSlot:
    """A place taken among a session's calls in flight (:meth:`Session.take_call`).

    :meth:`release` gives it back, once: later calls do nothing, so that
    whichever path ends the call first — its handler, or the end of the
    task that served it when the handler never ran — gives it back.
    """

    __slots__ = ("_session", "_token")

    def __init__(self, session: Session, token: "contextvars.Token[Any]") -> None:
        self._session: Session | None = session
        self._token = token

    def release(self, done: "asyncio.Task[Any] | None" = None) -> None:
        """Give the place back (once): in the task that took it, or as that
        task's done callback (*done*: the task; its context is gone with it)."""
        session = self._session
        if session is not None:
            self._session = None
            session._credit_call()
            if done is None:
                _COUNTED_CALL.reset(self._token)


# A call already counted by an outer layer of the same task: nothing to do.
_COUNTED: "contextlib.AbstractContextManager[None]" = contextlib.nullcontext()


class _InFlight:
    """:meth:`Session.call_in_flight` of the outer layer (a class: it runs on
    every call, and costs less than a generator-based context manager)."""

    __slots__ = ("_session", "_operation", "_here", "_token")

    def __init__(self, session: Session, operation: str, here: "tuple[Session, asyncio.Task[Any] | None]") -> None:
        self._session = session
        self._operation = operation
        self._here = here

    def __enter__(self) -> None:
        self._session._charge_call(self._operation)
        self._token = _COUNTED_CALL.set(self._here)

    def __exit__(self, *exc_info: object) -> None:
        self._session._credit_call()
        _COUNTED_CALL.reset(self._token)


class _PendingDescriptors:
    """The session's budget of descriptors held, as its transfer table counts them."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def charge(self, count: int) -> None:
        self._session.charge("fd transfer", FDS_HELD, count)

    def credit(self, count: int) -> None:
        self._session.credit(FDS_HELD, count)


@contextlib.contextmanager
def _logged(what: str, session: Session) -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - release must go on with the rest
        log.exception("%s failed", what, extra=session.log_fields)
