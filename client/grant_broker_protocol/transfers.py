"""Descriptors that arrived on the fd channel, waiting for the call that names them.

A call that passes descriptors names a *transfer id*; the descriptors travel
on the session's fd channel in transfer frames under that id, and the call
takes them from this table — whichever of the two arrives first.  The broker
keeps one table per session (descriptors clients send with requests) and the
SDK one per session (descriptors the broker sends with replies): the rules are
the same on both sides, so they live here once.

* A transfer is complete when its first frame has arrived (``count=None``:
  the broker's side, where a client's transfer is one frame) or when it has
  at least *count* descriptors (the SDK's side, where a reply of more than
  :data:`~grant_broker_protocol.fdchannel.MAX_FDS_PER_FRAME` descriptors comes
  in several frames under one id).
* Transfers no call has taken yet are bounded (*max_pending*): a peer that
  sends frames nobody claims cannot make the other side hold descriptors
  without end.  On the broker's side they also expire (*expire_after*: their
  descriptors are closed, and a call naming one later fails at once with
  EBADF), and their descriptors count against a budget (*budget*: one the
  budget refuses becomes a failed transfer, whose call gets the refusal).
* Everything still held is closed by :meth:`TransferTable.close`; waiting
  calls fail with the error given there.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd


class TransferRefused(Exception):
    """A frame broke the rules of the table (an id used twice, too many
    pending transfers): the peer broke the protocol."""


class DescriptorBudget(Protocol):
    """What the descriptors of pending transfers are counted against."""

    def charge(self, count: int) -> None:
        """Count *count* more descriptors, or raise :class:`BrokerError` to refuse them."""

    def credit(self, count: int) -> None:
        """Count *count* fewer descriptors."""


# How many expired transfer ids are remembered, so that a call naming one is
# told at once that it expired instead of waiting for it.
_EXPIRED_REMEMBERED = 256


class TransferTable:
    """Descriptors by transfer id, and the calls waiting for them.

    Args:
        max_pending: how many transfers may wait unclaimed (``None``: no bound).
        accumulate: frames of the same id add to the transfer (the SDK's side);
            otherwise an id used twice is refused (the broker's side).
        missing_errno: what :meth:`take` fails with when a transfer does not
            come in time: EBADF where the request named a transfer that its
            sender never sent (the broker's side), ETIMEDOUT where the reply's
            descriptors are late (the SDK's side).
        expire_after: seconds a transfer may wait unclaimed (``None``: until
            the table closes).  An expired transfer's descriptors are closed
            by a timer on the running loop, and by any later deliver or take.
        budget: what the descriptors of pending transfers are counted against,
            from their arrival until a call takes them (or they expire or the
            table closes).
    """

    def __init__(
        self,
        *,
        max_pending: int | None = None,
        accumulate: bool = False,
        missing_errno: int = errno.EBADF,
        expire_after: float | None = None,
        budget: DescriptorBudget | None = None,
    ) -> None:
        self._max_pending = max_pending
        self._accumulate = accumulate
        self._missing_errno = missing_errno
        self._expire_after = expire_after
        self._budget = budget
        self._arrived: dict[int, list[OwnedFd]] = {}
        self._failed: dict[int, BrokerError] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._closed: BrokerError | None = None
        # Pending transfer id -> when it expires (monotonic clock), in arrival
        # order, which is deadline order (one expire_after for all).
        self._deadlines: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._expired: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._arrived) + len(self._failed)

    def deliver(self, transfer_id: int, fds: list[OwnedFd]) -> None:
        """A transfer frame arrived with *fds*, which the table now owns.

        Raises:
            TransferRefused: id 0, an id used twice, or too many pending
                transfers (the descriptors are closed).
        """
        self.expire_due()
        try:
            self._check_new(transfer_id)
        except TransferRefused:
            _close_all(fds)
            raise
        if self._closed is not None:
            _close_all(fds)
            return
        if self._budget is not None and fds:
            try:
                self._budget.charge(len(fds))
            except BrokerError as refusal:
                # Over budget: the descriptors go now; the call that names
                # the transfer gets the refusal.
                _close_all(fds)
                self.fail(transfer_id, refusal)
                return
        self._arrived.setdefault(transfer_id, []).extend(fds)
        self._pending(transfer_id)
        self._wake(transfer_id)

    def fail(self, transfer_id: int, error: BrokerError) -> None:
        """A transfer frame arrived but its descriptors could not be received
        (this process is out of them): the call that names it fails with
        *error*; nothing else does."""
        self._check_new(transfer_id)
        self._failed[transfer_id] = error
        self._pending(transfer_id)
        self._wake(transfer_id)

    # ------------------------------------------------------------ expiry

    def _pending(self, transfer_id: int) -> None:
        """*transfer_id* waits for its call from now on: give it its deadline."""
        if self._expire_after is None or self._closed is not None or transfer_id in self._deadlines:
            return
        self._expired.pop(transfer_id, None)
        self._deadlines[transfer_id] = time.monotonic() + self._expire_after
        self._arm()

    def _arm(self) -> None:
        """A timer for the earliest deadline, when there is a loop to run it."""
        if self._timer is not None or not self._deadlines:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): deliver and take check instead
        delay = max(0.0, next(iter(self._deadlines.values())) - time.monotonic())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.expire_due()

    def expire_due(self) -> int:
        """Close the transfers whose deadline has passed; how many there were.

        A transfer a call is already waiting for is not expired: that call is
        about to take it."""
        if not self._deadlines:
            return 0
        now = time.monotonic()
        expired = 0
        for transfer_id, deadline in list(self._deadlines.items()):
            if deadline > now:
                break
            del self._deadlines[transfer_id]
            if transfer_id in self._waiters:
                continue
            expired += 1
            self._failed.pop(transfer_id, None)
            self._release(self._arrived.pop(transfer_id, []))
            self._expired[transfer_id] = None
            while len(self._expired) > _EXPIRED_REMEMBERED:
                self._expired.popitem(last=False)
        self._arm()
        return expired

    def _release(self, fds: list[OwnedFd]) -> None:
        """Close *fds* of a transfer nobody will take (expired, or the table closed)."""
        _close_all(fds)
        if self._budget is not None and fds:
            self._budget.credit(len(fds))

    def _taken(self, transfer_id: int) -> list[OwnedFd]:
        """The descriptors of *transfer_id*, now the caller's."""
        self._deadlines.pop(transfer_id, None)
        fds = self._arrived.pop(transfer_id)
        if self._budget is not None and fds:
            self._budget.credit(len(fds))
        return fds

    def _check_new(self, transfer_id: int) -> None:
        if transfer_id == 0:
            raise TransferRefused("transfer id 0 is reserved")
        if transfer_id in self._arrived or transfer_id in self._failed:
            if self._accumulate and transfer_id in self._arrived:
                return
            raise TransferRefused(f"transfer id {transfer_id} used twice")
        if self._max_pending is not None and len(self) >= self._max_pending:
            raise TransferRefused(f"more than {self._max_pending} descriptor frames sent without a call using them")

    def _wake(self, transfer_id: int) -> None:
        waiter = self._waiters.get(transfer_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _complete(self, transfer_id: int, count: int | None) -> bool:
        if transfer_id in self._failed:
            return True
        arrived = self._arrived.get(transfer_id)
        return arrived is not None and (count is None or len(arrived) >= count)

    async def take(self, operation: str, transfer_id: int, *, count: int | None = None, timeout: float) -> list[OwnedFd]:
        """Every descriptor of *transfer_id* (the caller owns them), once the
        transfer is complete (see the module docstring), waiting at most *timeout*.

        Raises:
            BrokerError: EBADF for id 0, a second waiter or a transfer that
                never came; the error of :meth:`fail`; ECANCELED (or the error
                given to :meth:`close`) when the table closed.
        """
        if transfer_id == 0:
            raise BrokerError(errno.EBADF, operation, "the request names no fd transfer (fd_transfer is 0)")
        self.expire_due()
        if transfer_id in self._expired and not self._complete(transfer_id, count):
            del self._expired[transfer_id]
            raise BrokerError(
                errno.EBADF,
                operation,
                f"the descriptors of transfer id {transfer_id} waited more than {self._expire_after} s "
                "for a call naming them and were closed",
            )
        if not self._complete(transfer_id, count):
            await self._wait(operation, transfer_id, count, timeout)
        failed = self._failed.pop(transfer_id, None)
        if failed is not None:
            self._deadlines.pop(transfer_id, None)
            if transfer_id in self._arrived:
                self._release(self._arrived.pop(transfer_id))
            raise BrokerError(failed.errno, operation, failed.detail)
        return self._taken(transfer_id)

    async def _wait(self, operation: str, transfer_id: int, count: int | None, timeout: float) -> None:
        if transfer_id in self._waiters:
            raise BrokerError(errno.EBADF, operation, f"another call is already waiting for transfer id {transfer_id}")
        if self._closed is not None:
            raise BrokerError(self._closed.errno, operation, self._closed.detail)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not self._complete(transfer_id, count):
                waiter = self._waiters[transfer_id] = loop.create_future()
                # A timer, not asyncio.timeout: the broker may run this before
                # its call has a task of its own (transport/eager.py).
                timer = loop.call_at(deadline, _time_out, waiter)
                try:
                    await waiter
                except TimeoutError:
                    raise BrokerError(
                        self._missing_errno,
                        operation,
                        f"no descriptors arrived on the fd channel under transfer id {transfer_id}",
                    ) from None
                except BrokerError as exc:  # close()
                    raise BrokerError(exc.errno, operation, exc.detail) from None
                finally:
                    timer.cancel()
        finally:
            self._waiters.pop(transfer_id, None)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, error: BrokerError) -> None:
        """Close every descriptor held; calls waiting now or later fail with *error*.  Idempotent."""
        if self._closed is None:
            self._closed = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        arrived, self._arrived = list(self._arrived.values()), {}
        for fds in arrived:
            self._release(fds)
        self._failed.clear()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error)


def select_fds(operation: str, transfer_id: int, fds: list[OwnedFd], indexes: Sequence[int]) -> list[OwnedFd]:
    """The descriptors of a transfer at *indexes*, in that order; the others are
    closed (a request names what it uses, and the rest must not linger).

    Raises:
        BrokerError: EBADF for an index out of range or named twice (every
            descriptor is closed then).
    """
    try:
        for index in indexes:
            if not 0 <= index < len(fds):
                raise BrokerError(errno.EBADF, operation, f"fd index {index} not in transfer {transfer_id} of {len(fds)} fds")
        if len(set(indexes)) != len(indexes):
            raise BrokerError(errno.EBADF, operation, "the same fd index is named twice")
    except BrokerError:
        _close_all(fds)
        raise
    wanted = set(indexes)
    for index, fd in enumerate(fds):
        if index not in wanted:
            fd.close()
    return [fds[index] for index in indexes]


def _close_all(fds: Sequence[OwnedFd]) -> None:
    for fd in fds:
        fd.close()


def _time_out(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
