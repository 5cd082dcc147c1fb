"""What the sessions hold, counted when someone asks (the metrics' scrape).

Nothing here is kept up to date on the hot path: each function reads the
state the operations keep anyway (``session.resources``, ``session.usage``,
the budgets), in time proportional to what is held.  It runs on the event
loop, between calls, so it sees every session in a consistent state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from grant_broker.core.budgets import POOL_PAGES
from grant_broker.core.operations.gntalloc import GntallocState
from grant_broker.core.operations.gntdev import GntdevState
from grant_broker.core.session import Session


@dataclass
class Grants:
    """Grants held, by uid and the remote domain: (uid, domid) -> count."""

    mapped: Counter[tuple[int, int]] = field(default_factory=Counter)
    """Grants of other domains the sessions map (gntdev mappings and dma-buf exports), by the granting domain."""
    shared: Counter[tuple[int, int]] = field(default_factory=Counter)
    """Pages the sessions grant (gntalloc and dma-buf imports), by the domain they are granted to."""


def grants(sessions: Iterable[Session]) -> Grants:
    """The grants *sessions* map and share, by uid and remote domain."""
    counted = Grants()
    mapped, shared = counted.mapped, counted.shared
    for session in sessions:
        uid = session.creds.uid
        gntdev = session.resources.get("gntdev")
        if isinstance(gntdev, GntdevState):
            for mapping in gntdev.mappings.values():
                refs = mapping.refs
                if refs.domid is not None:  # the usual case: one granting domain
                    mapped[uid, refs.domid] += len(refs)
                else:
                    mapped.update((uid, domid) for domid in refs.domids)
            for export in gntdev.exports.values():
                if export.domid is not None:
                    mapped[uid, export.domid] += export.count
            for imported in gntdev.imports.values():
                if imported.domid is not None:
                    shared[uid, imported.domid] += imported.count
        gntalloc = session.resources.get("gntalloc")
        if isinstance(gntalloc, GntallocState):
            for index, count in gntalloc.allocations.items():
                domid = gntalloc.domains.get(index)
                if domid is not None:
                    shared[uid, domid] += count
    return counted


def pool_pages_by_domain(sessions: Iterable[Session]) -> Counter[int]:
    """The gntalloc pages *sessions* hold, by the domain whose pool they come
    from (the session's own domain): what the broker knows of a domain's pool
    when the backend cannot tell its whole use."""
    pages: Counter[int] = Counter()
    for session in sessions:
        pages[session.domid] += session.held[POOL_PAGES]
    return pages
