"""Emulated device instances that are real descriptors.

A Linux device instance is an open file: it can be dup'ed, inherited, passed
to another process, and the driver's ``release()`` runs when the *last* copy
is closed — including when the process holding it is killed.  The emulation
gets the same lifetime from the kernel itself: each instance is a socketpair.
The caller's end is the instance's ``fileno()``; the hypervisor keeps the
other end, on which the kernel reports hang-up (POLLHUP / EOF) exactly when
every copy of the caller's end is gone, wherever it went.

:class:`InstanceLink` packages that: it releases the instance

* at once from :meth:`InstanceLink.close` when no other copy exists,
* otherwise when the hypervisor's end hangs up — noticed by an asyncio reader
  on the running event loop (registered when the instance is created, or
  when it is closed, whichever first finds a loop running), or by
  :meth:`InstanceLink.check`, which the hypervisor calls on its operations
  when no loop is watching,
* or by force (:meth:`InstanceLink.release`) when the domain or the
  hypervisor goes away.

Releasing calls the instance's ``on_release`` callback once: that is where a
device does what Linux does when its file is released (unmap, fire unmap
notifications, end grants, unbind ports).
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from grant_broker_protocol.errors import BrokerError

if TYPE_CHECKING:
    from .hypervisor import EmulatedHypervisor

_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


class InstanceLink:
    """The descriptor pair behind one emulated device instance."""

    __slots__ = ("name", "_caller", "_peer", "_on_release", "_on_close", "_loop", "_released", "__weakref__")

    def __init__(
        self,
        on_release: Callable[[], None],
        *,
        name: str,
        on_close: Callable[["InstanceLink"], None] | None = None,
    ) -> None:
        """Create the pair; *on_release* runs once when the instance is released.

        *name* appears in messages (e.g. ``"gntdev instance of domain 1"``).
        *on_close* runs when :meth:`close` leaves the instance alive (a copy
        of its descriptor is open elsewhere): from then on it is a candidate
        for :func:`check_all`, and only then.
        """
        caller, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Raw descriptors: the link, not a socket object's finalizer, decides
        # when each end is closed.  socketpair() fds are close-on-exec.
        self._caller: int = caller.detach()
        self._peer: int = peer.detach()
        os.set_blocking(self._peer, False)
        self.name = name
        self._on_release: Callable[[], None] | None = on_release
        self._on_close = on_close
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released = False
        self._watch()

    # ------------------------------------------------------------------ state

    def fileno(self) -> int:
        """The caller's end: the descriptor that *is* the instance."""
        if self._caller < 0:
            raise ValueError(f"{self.name} is closed")
        return self._caller

    @property
    def closed(self) -> bool:
        """The caller's end of this object is closed (copies may live on)."""
        return self._caller < 0

    @property
    def released(self) -> bool:
        """The instance is gone (its release ran)."""
        return self._released

    @property
    def watched(self) -> bool:
        """An event loop watches for the hang-up."""
        return self._loop is not None and not self._loop.is_closed()

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the caller's end; release now unless a copy lives elsewhere.

        Idempotent.  When a copy survives (dup'ed, passed to another process),
        the release happens when the last copy goes.
        """
        fd, self._caller = self._caller, -1
        if fd >= 0:
            os.close(fd)
        if self._released:
            return
        if not self.check():
            self._watch()
            if self._on_close is not None:
                self._on_close(self)

    def check(self) -> bool:
        """Release the instance if every copy of the caller's end is gone;
        return whether it is released.  Never blocks."""
        if self._released:
            return True
        if self._caller >= 0:
            return False  # our own copy is still open: no hang-up possible
        poller = select.poll()
        poller.register(self._peer, select.POLLIN | select.POLLRDHUP)
        events = poller.poll(0)
        if events and events[0][1] & _HUNG_UP:
            self.release()
        elif events:
            self._drain()
        return self._released

    def release(self) -> None:
        """Release the instance now (the domain or the hypervisor is going away),
        closing both ends.  Idempotent."""
        if self._released:
            return
        self._released = True
        self._unwatch()
        for attr in ("_caller", "_peer"):
            fd = getattr(self, attr)
            setattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()

    # ------------------------------------------------------------------ event loop

    def _watch(self) -> None:
        """Watch the hypervisor's end on the running loop, if there is one."""
        if self._released:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop:
            return
        self._unwatch()
        loop.add_reader(self._peer, self._on_readable)
        self._loop = loop

    def _unwatch(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self._peer >= 0:
            try:
                loop.remove_reader(self._peer)
            except (RuntimeError, ValueError, OSError):
                pass  # the loop is shutting down: nothing left to unregister from

    def _on_readable(self) -> None:
        # Readable means EOF (every copy of the caller's end closed) or, should
        # someone write to an instance fd, data that is meaningless: drop it.
        if self._released:
            return
        try:
            data = os.read(self._peer, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.release()

    def _drain(self) -> None:
        try:
            while os.read(self._peer, 4096):
                pass
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "released" if self._released else ("closed here" if self._caller < 0 else f"fd {self._caller}")
        return f"<InstanceLink {self.name}: {state}>"


def check_all(links: Iterable[InstanceLink]) -> None:
    """Release every link in *links* whose caller's end is gone everywhere and
    that no event loop watches (one ``poll`` for all of them)."""
    pending = [link for link in links if not link.released and link.closed and not link.watched]
    if not pending:
        return
    poller = select.poll()
    by_fd = {}
    for link in pending:
        fd = link._peer  # noqa: SLF001 - same module
        if fd >= 0:
            by_fd[fd] = link
            poller.register(fd, select.POLLIN | select.POLLRDHUP)
    for fd, events in poller.poll(0):
        link = by_fd[fd]
        if events & _HUNG_UP:
            link.release()
        else:
            link._drain()  # noqa: SLF001


class LinkedInstance:
    """What the emulated gntdev and gntalloc instances share: each *is* a
    descriptor (an :class:`InstanceLink` from the hypervisor), released by
    ``_release`` when its last copy closes, and refuses work once released."""

    _device: str  # "gntdev", "gntalloc": names the instance in errors

    def _open_link(self, hypervisor: "EmulatedHypervisor", domid: int) -> None:
        self._hv = hypervisor
        self.domid = domid
        self._link = hypervisor.open_link(domid, self._release, name=f"{self._device} instance of domain {domid}")

    def _release(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        return self._link.fileno()

    @property
    def closed(self) -> bool:
        return self._link.closed or self._link.released

    def close(self) -> None:
        with self._hv.lock:
            self._link.close()

    def _enter(self, operation: str) -> None:
        """Common entry: reap instances whose descriptors are gone, refuse on a closed one."""
        self._hv.reap()
        if self.closed:
            if self._link.released and not self._hv.domain_exists(self.domid):
                # Released by destroy_domain: say so, as the evtchn emulation does.
                raise BrokerError(errno.ESRCH, operation, f"domain {self.domid} was destroyed")
            raise BrokerError(errno.EBADF, operation, f"the {self._device} instance of domain {self.domid} is closed")
