"""Budgets: what the broker holds on a client's behalf, bounded per session and per uid.

The kernel bounds almost nothing per client, and what it bounds it bounds per
domain or per process — here that is the broker, for everyone at once.  So
every resource the broker holds for a client is counted twice, against the
session's budget and against the budget of the session's uid (the sum over
all sessions of that uid), and refused with EDQUOT (RESOURCE_EXHAUSTED)
naming the budget and its limit when either would be passed.  One user can
then take at most its uid's share, whatever number of sessions it opens.

* :class:`Budget` — one kind of resource and the two :class:`~grant_broker.core.policy.Limits`
  fields that bound it.
* :class:`UserBudget` — what all sessions of one uid hold; one per uid with a
  live session, kept by the :class:`~grant_broker.core.registry.SessionRegistry`.
* A session charges and credits through :meth:`Session.charge` /
  :meth:`Session.credit` (``core/session.py``), which keep the session's own
  count and the uid's in step; whatever a session still holds when it is
  released is credited back then, so the uid's counts return to zero with its
  last session whatever path the resources took.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass

from grant_broker.core.policy import Limits
from grant_broker_protocol.errors import BrokerError


@dataclass(frozen=True, slots=True)
class Budget:
    """One kind of resource: what it is called in messages, and the names of its
    limits in :class:`~grant_broker.core.policy.Limits` (``None``: no limit at that level)."""

    what: str
    per_session: str | None
    per_uid: str

    def session_limit(self, limits: Limits) -> int | None:
        return None if self.per_session is None else int(getattr(limits, self.per_session))

    def uid_limit(self, limits: Limits) -> int:
        return int(getattr(limits, self.per_uid))


SESSIONS = Budget("sessions", None, "max_sessions_per_uid")
FDS_HELD = Budget(
    "descriptors held for it (pending transfers, dma-bufs, copy buffers)", "max_fds_held_per_session", "max_fds_held_per_uid"
)
POOL_PAGES = Budget("gntalloc pages", "max_pool_pages_per_session", "max_pool_pages_per_uid")
COPY_BUFFER_BYTES = Budget("bytes of copy buffers", "max_copy_buffer_bytes_per_session", "max_copy_buffer_bytes_per_uid")
PORTS = Budget("event channel ports", "max_ports_per_session", "max_ports_per_uid")
SUBSCRIPTIONS = Budget("subscriptions", "max_subscriptions_per_session", "max_subscriptions_per_uid")
CALLS = Budget("calls in flight", "max_calls_per_session", "max_calls_per_uid")

BUDGETS: tuple[Budget, ...] = (SESSIONS, FDS_HELD, POOL_PAGES, COPY_BUFFER_BYTES, PORTS, SUBSCRIPTIONS, CALLS)


def over_budget(operation: str, holder: str, budget: Budget, name: str, used: int, adding: int, limit: int) -> BrokerError:
    """The EDQUOT refusal: who holds how much of what, and the budget's name and limit."""
    return BrokerError(
        errno.EDQUOT,
        operation,
        f"{holder} {used} {budget.what} and asked for {adding} more; the limit is {limit} (budget {name})",
    )


class UserBudget:
    """What every session of one uid holds, against the uid's budgets."""

    def __init__(self, uid: int, limits: Limits) -> None:
        self.uid = uid
        self.limits = limits
        self.held: Counter[Budget] = Counter()

    def check(self, operation: str, budget: Budget, adding: int) -> None:
        """EDQUOT if *adding* more of *budget* would pass the uid's limit."""
        used = self.held[budget]
        limit = budget.uid_limit(self.limits)
        if used + adding > limit:
            raise over_budget(operation, f"the sessions of uid {self.uid} hold", budget, budget.per_uid, used, adding, limit)

    def charge(self, operation: str, budget: Budget, count: int) -> None:
        """Count *count* more of *budget*, or refuse (EDQUOT) and count nothing."""
        self.check(operation, budget, count)
        self.held[budget] += count

    def credit(self, budget: Budget, count: int) -> None:
        """Count *count* less of *budget* (never below zero)."""
        left = self.held[budget] - count
        if left > 0:
            self.held[budget] = left
        else:
            del self.held[budget]

    @property
    def empty(self) -> bool:
        """Nothing held: every charge has had its credit."""
        return not +self.held

    def usage(self) -> dict[str, int]:
        """What the uid holds, by the uid limit's name (for tests and logs)."""
        return {budget.per_uid: count for budget, count in self.held.items() if count}
