"""Event channels of the emulated hypervisor.

Two layers of the real stack are emulated here, and each rule below names the
code it follows:

* **Xen** (``xen/common/event_channel.c``): per-domain port numbers, port 0
  reserved (``evtchn_init``), the lowest free port reused first
  (``get_free_port``), the states unbound / interdomain / virq, what closing
  one end does to the other (``__evtchn_close``: the remote end goes back to
  *unbound for the closer's domain*), the pending bit that survives masking,
  and the notification set on the new local port by ``evtchn_bind_interdomain``
  "so nothing sent to the unbound port is lost".
* **Linux** (``drivers/xen/evtchn.c``, the ``/dev/xen/evtchn`` driver): one
  *handle* per open file, which owns the ports bound through it
  (``find_evtchn``: anything else is ``ENOTCONN``); a fired port is written to
  the file's ring as a native ``uint32`` and masked (``evtchn_interrupt``:
  ``enabled = false``) until its number is written back (``evtchn_write``:
  ``xen_irq_lateeoi``, which unmasks it in Xen, and Xen re-delivers it then if
  it was notified while masked); ``RESET`` empties the ring but unmasks
  nothing; ``RESTRICT_DOMID`` answers ``EACCES``; a full ring sets the
  overflow flag that makes ``read`` fail with ``EFBIG``; closing the file
  unbinds (and so closes) every port of the handle.

The handle's ring is a real pipe created ``O_NONBLOCK | O_CLOEXEC``: the
handle owns the read end (its :meth:`~EmulatedEvtchnHandle.fileno`), the hub
keeps the write end and writes each fired port into it, so the descriptor
polls, reads and passes between processes as ``/dev/xen/evtchn`` does.

A handle lives as long as *some* copy of its descriptor is open, as a Linux
file does.  When :meth:`EmulatedEvtchnHandle.close` runs while a copy is still
open elsewhere (passed to a client, say), the handle becomes an *orphan*: its
ports stay bound and keep firing into the pipe.  The hub learns that the last
copy is gone from ``POLLERR`` on the pipe's write end (``fs/pipe.c``:
``pipe_poll`` sets it once no reader is left) — checked with a zero-timeout
poll on every hub operation and, when an asyncio loop was running at the time
the handle was orphaned, by a reader callback on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from grant_broker.backend.contract import PAGE_SIZE, EvtchnHandle
from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fds import OwnedFd

__all__ = [
    "DOMID_FIRST_RESERVED",
    "DOMID_SELF",
    "EVENT_WORDS_PER_PAGE",
    "EVTCHN_NR_CHANNELS",
    "EmulatedEvtchnHandle",
    "EventChannelHub",
    "NR_VIRQS",
    "PipeWatch",
    "VIRQ_DOM_EXC",
]

# xen/include/public/xen.h
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
NR_VIRQS = 24
VIRQ_DOM_EXC = 3  # "G. (DOM0) Exceptional event for some domain."

# Ports per domain the emulation hands out: the 2-level event ABI's bound on a
# 64-bit guest, EVTCHN_2L_NR_CHANNELS = (sizeof(xen_ulong_t) * 8) ** 2
# (xen/include/public/xen.h); Xen's get_free_port answers ENOSPC beyond it.
# (Under the FIFO ABI, which Linux uses on Xen >= 4.4, Xen could give more.)
EVTCHN_NR_CHANNELS = 64 * 64

# Linux refuses UNBIND of a port at or above xen_evtchn_nr_channels() with
# EINVAL.  Under the FIFO ABI that is the size of the domain's event array
# (events_fifo.c: event_array_pages * EVENT_WORDS_PER_PAGE), which starts at
# one page and grows, never shrinking, when a port beyond it is bound
# (evtchn_fifo_setup): on real Xen 4.17 + Linux 6.1, UNBIND of port 1024 with
# no port that high ever bound is EINVAL, not ENOTCONN.
EVENT_WORDS_PER_PAGE = 4096 // 4  # XEN_PAGE_SIZE / sizeof(event_word_t)

_PORT = struct.Struct("=I")  # evtchn_port_t, native byte order as read() returns it
_U32_MAX = 0xFFFF_FFFF
_DOMID_MAX = 0xFFFF  # domid_t; the Linux ioctl structs carry unsigned int, Xen truncates


class _Hypervisor(Protocol):
    """What this module needs of the emulated hypervisor (and uses its
    re-entrant ``lock`` attribute, when it has one)."""

    events: EventChannelHub

    def domain_exists(self, domid: int) -> bool: ...


# --------------------------------------------------------------------------- fd liveness


def _readers_gone(write_fd: int) -> bool:
    """True once no read end of the pipe is open anywhere (POLLERR on the write end)."""
    poller = select.poll()
    poller.register(write_fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


class PipeWatch:
    """The kept write end of a pipe whose read end was handed out.

    Tells, synchronously (:meth:`readers_gone`) or through the running asyncio
    loop (:meth:`watch`), when every copy of the read end has been closed —
    in this process or any other it was passed to.  Used for event-channel
    handles here and for mem-buf export descriptors in :mod:`.membuf`.

    The loop callback must be removed before the descriptor is closed (a
    recycled fd number would otherwise inherit the registration), so
    :meth:`close` does that; call it from the loop's thread or after the loop
    has closed.
    """

    __slots__ = ("_fd", "_loop")

    def __init__(self, write_fd: OwnedFd) -> None:
        self._fd = write_fd
        self._loop: asyncio.AbstractEventLoop | None = None

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def readers_gone(self) -> bool:
        """Whether the last read end is closed (a zero-timeout poll)."""
        return not self._fd.closed and _readers_gone(self._fd.fileno())

    def watch(self, callback: Callable[[], None]) -> None:
        """Call *callback* from the running loop, if there is one, when the
        last read end closes.  Without a running loop this does nothing: the
        owner then relies on :meth:`readers_gone` checks."""
        if self._loop is not None or self._fd.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # A write end never polls readable, so the reader fires only on
        # EPOLLERR, which asyncio (and libuv) report to readers and writers alike.
        loop.add_reader(self._fd.fileno(), callback)
        self._loop = loop

    def watched_elsewhere(self) -> bool:
        """True when a loop other than the current thread's running one watches
        this pipe; that loop, not the caller, should then release it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            return asyncio.get_running_loop() is not loop
        except RuntimeError:
            return True

    def close(self) -> None:
        """Stop watching and close the write end; idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and not self._fd.closed:
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_reader(self._fd.fileno())
        self._fd.close()


def _new_pipe() -> tuple[OwnedFd, PipeWatch]:
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return OwnedFd(read_fd), PipeWatch(OwnedFd(write_fd))


# --------------------------------------------------------------------------- state


class _State(enum.Enum):
    """The Xen channel states a user handle can create (``ECS_*``)."""

    UNBOUND = "unbound"
    INTERDOMAIN = "interdomain"
    VIRQ = "virq"


@dataclass(eq=False)
class _Port:
    """One allocated port of one domain (Xen's ``struct evtchn``), bound through ``owner``."""

    domid: int
    number: int
    owner: _Queue
    state: _State
    remote_domid: int = 0  # UNBOUND: who may bind; INTERDOMAIN: the other end's domain
    remote_port: int = 0  # INTERDOMAIN only
    virq: int = -1  # VIRQ only
    enabled: bool = True  # Linux user_evtchn.enabled: False from firing until unmask
    pending: bool = False  # Xen's pending bit, left set while the port is masked
    holds: int = 0  # unmap notifications armed on it (Linux's evtchn_get references)
    detached: bool = False  # its handle unbound it while held: bound in Xen, owned by nobody


@dataclass(eq=False)
class _Queue:
    """The kernel side of one open evtchn file (``struct per_user_data``)."""

    domid: int
    pipe: PipeWatch
    ports: dict[int, _Port] = field(default_factory=dict)
    overflow: bool = False
    restrict_domid: int | None = None
    domain_gone: bool = False
    released: bool = False


def _error(code: int, operation: str, detail: str) -> BrokerError:
    return BrokerError(code, f"evtchn {operation}", detail)


def _u32(value: int, what: str, operation: str) -> int:
    # The ioctl structs carry unsigned ints; refuse what they cannot hold
    # rather than let it wrap.
    if not 0 <= value <= _U32_MAX:
        raise _error(errno.EINVAL, operation, f"{what} {value} does not fit in an unsigned int")
    return value


def _domid(value: int, operation: str) -> int:
    if not 0 <= value <= _DOMID_MAX:
        raise _error(errno.EINVAL, operation, f"domain {value} is not a domid_t (0..{_DOMID_MAX})")
    return value


# --------------------------------------------------------------------------- hub


class EventChannelHub:
    """Every event channel of the emulated hypervisor.

    The hypervisor uses :meth:`is_bound`, :meth:`notify_local`,
    :meth:`send_virq`, :meth:`domain_destroyed` and :meth:`close`; the rest
    serves :class:`EmulatedEvtchnHandle`.  Thread-safe (one lock); asyncio
    watchers are added and removed from the thread of their loop.
    """

    def __init__(self, hypervisor: _Hypervisor) -> None:
        self._hypervisor = hypervisor
        # Share the hypervisor's lock when it has one: binding asks it whether
        # a domain exists while destroying a domain calls in here, so two
        # locks would be taken in both orders.
        self._lock: threading.RLock = getattr(hypervisor, "lock", None) or threading.RLock()
        self._domains: dict[int, dict[int, _Port]] = {}
        self._virqs: dict[int, dict[int, _Port]] = {}  # domid -> virq -> port (vcpu 0)
        self._event_array_pages: dict[int, int] = {}  # domid -> Linux's FIFO event array size
        self._queues: set[_Queue] = set()  # open or orphaned, not yet released
        self._orphans: set[_Queue] = set()  # handle closed, a copy of its fd still open
        self._closed = False

    # ----------------------------------------------------------- hypervisor API

    def is_bound(self, domid: int, port: int) -> bool:
        """Whether *port* of *domid* is bound by an open handle of that domain.

        Linux gntdev/gntalloc accept an unmap-notify port only then
        (``evtchn_get`` finds a user-bound, refcounted port).
        """
        with self._lock:
            self._sweep()
            return port in self._domains.get(domid, {})

    def hold(self, domid: int, port: int) -> object | None:
        """``evtchn_get``: take a reference on *domid*'s bound *port* for an
        unmap notification; None if it is not bound.  Give it back with
        :meth:`release`."""
        with self._lock:
            self._sweep()
            found = self._domains.get(domid, {}).get(port)
            if found is not None:
                found.holds += 1
            return found

    def release(self, hold: object | None) -> None:
        """``evtchn_put``: drop a reference from :meth:`hold` (None: nothing);
        a port its handle already unbound is closed with the last one."""
        if not isinstance(hold, _Port):
            return
        with self._lock:
            if hold.holds > 0:
                hold.holds -= 1
            if not hold.holds and hold.detached and self._domains.get(hold.domid, {}).get(hold.number) is hold:
                self._close_port(hold)

    def notify_local(self, domid: int, port: int) -> None:
        """Send on *domid*'s local *port*, as ``notify_remote_via_evtchn`` does
        for unmap notifications: the remote end of an interdomain channel is
        marked pending; anything else (unbound, virq, no such port) is dropped,
        as ``evtchn_send`` drops it and Linux ignores its result."""
        with self._lock:
            self._sweep()
            self._send(domid, port)

    def send_virq(self, domid: int, virq: int) -> None:
        """Raise *virq* in *domid* (``send_guest_global_virq``); dropped if unbound."""
        with self._lock:
            port = self._virqs.get(domid, {}).get(virq)
            if port is not None:
                self._raise(port)

    def domain_destroyed(self, domid: int) -> None:
        """Close every port of *domid*, as ``evtchn_destroy`` does.

        Remote ends of its interdomain channels become unbound (for *domid*)
        in their own domains.  Handles of *domid* stay open but hold no ports,
        and binding through them fails with ``ESRCH``.  Domain 0, if it has
        bound ``VIRQ_DOM_EXC``, is told (Xen's ``domain_kill`` path sends it
        to the global VIRQ handler, by default the hardware domain).
        """
        with self._lock:
            for port in list(self._domains.get(domid, {}).values()):
                self._close_port(port)
            self._domains.pop(domid, None)
            self._event_array_pages.pop(domid, None)
            self._virqs.pop(domid, None)
            for queue in self._queues:
                if queue.domid == domid:
                    queue.domain_gone = True
            if domid != 0:
                self.send_virq(0, VIRQ_DOM_EXC)

    def close(self) -> None:
        """Release every handle's ports and close every descriptor the hub holds."""
        with self._lock:
            self._closed = True
            for queue in list(self._queues):
                self._release(queue)
            self._domains.clear()
            self._virqs.clear()
            self._event_array_pages.clear()

    # ----------------------------------------------------------- handle side

    def _open(self, domid: int) -> tuple[OwnedFd, _Queue]:
        with self._lock:
            if self._closed:
                raise _error(errno.ENODEV, "open", "the emulated hypervisor is closed")
            read_fd, pipe = _new_pipe()
            queue = _Queue(domid, pipe)
            self._queues.add(queue)
            return read_fd, queue

    def _handle_closed(self, queue: _Queue) -> None:
        """The handle's own read end was just closed: release now if that was
        the last copy, else keep the ports bound until it is."""
        with self._lock:
            if queue.released:
                return
            if queue.pipe.readers_gone():
                self._release(queue)
                return
            self._orphans.add(queue)
            queue.pipe.watch(lambda: self._on_readers_gone(queue))

    def _on_readers_gone(self, queue: _Queue) -> None:
        with self._lock:
            if not queue.released and queue.pipe.readers_gone():
                self._release(queue)

    def _sweep(self) -> None:
        """Release orphans whose last descriptor copy has been closed meanwhile."""
        for queue in list(self._orphans):
            if not queue.pipe.watched_elsewhere() and queue.pipe.readers_gone():
                self._release(queue)

    def _release(self, queue: _Queue) -> None:
        """``evtchn_release``: unbind (close) every port, then drop the ring."""
        if queue.released:
            return
        queue.released = True
        for port in list(queue.ports.values()):
            self._unbind_user(port)
        queue.pipe.close()
        self._queues.discard(queue)
        self._orphans.discard(queue)

    def _check_usable(self, queue: _Queue, operation: str) -> None:
        self._sweep()
        if queue.released:
            raise _error(errno.EBADF, operation, "the handle is closed")
        if queue.domain_gone:
            raise _error(errno.ESRCH, operation, f"domain {queue.domid} was destroyed")

    def _allocate(self, queue: _Queue, state: _State, operation: str) -> _Port:
        """``get_free_port``: the lowest free port; port 0 is reserved."""
        ports = self._domains.setdefault(queue.domid, {})
        number = next((n for n in range(1, EVTCHN_NR_CHANNELS) if n not in ports), None)
        if number is None:
            raise _error(
                errno.ENOSPC, operation, f"domain {queue.domid} has all {EVTCHN_NR_CHANNELS - 1} ports in use"
            )
        port = _Port(queue.domid, number, queue, state)
        ports[number] = port
        pages = self._event_array_pages.get(queue.domid, 1)
        self._event_array_pages[queue.domid] = max(pages, number // EVENT_WORDS_PER_PAGE + 1)
        queue.ports[number] = port
        return port

    def _bind_unbound(self, queue: _Queue, remote_domain: int) -> int:
        op = "bind unbound port"
        self._check_usable(queue, op)
        _domid(remote_domain, op)
        if queue.restrict_domid is not None:
            # Linux evtchn.c: a restricted handle may not allocate unbound ports.
            raise _error(errno.EACCES, op, f"handle is restricted to domain {queue.restrict_domid}")
        # Xen's evtchn_alloc_unbound does not look the remote domain up: a port
        # may be offered to a domain that does not exist (yet).
        remote = queue.domid if remote_domain == DOMID_SELF else remote_domain
        port = self._allocate(queue, _State.UNBOUND, op)
        port.remote_domid = remote
        return port.number

    def _bind_interdomain(self, queue: _Queue, remote_domain: int, remote_port: int) -> int:
        op = "bind interdomain"
        self._check_usable(queue, op)
        _domid(remote_domain, op)
        _u32(remote_port, "port", op)
        if queue.restrict_domid is not None and queue.restrict_domid != remote_domain:
            raise _error(
                errno.EACCES, op, f"handle is restricted to domain {queue.restrict_domid}, not {remote_domain}"
            )
        rdom = queue.domid if remote_domain == DOMID_SELF else remote_domain
        if not self._hypervisor.domain_exists(rdom):
            raise _error(errno.ESRCH, op, f"domain {rdom} does not exist")
        remote = self._domains.get(rdom, {}).get(remote_port)
        if remote is None or remote.state is not _State.UNBOUND or remote.remote_domid != queue.domid:
            what = "is not allocated" if remote is None else (
                f"is {remote.state.value}" if remote.state is not _State.UNBOUND
                else f"is offered to domain {remote.remote_domid}"
            )
            raise _error(
                errno.EINVAL, op,
                f"port {remote_port} of domain {rdom} {what}, not unbound for domain {queue.domid}",
            )
        local = self._allocate(queue, _State.INTERDOMAIN, op)
        local.remote_domid, local.remote_port = rdom, remote_port
        remote.state = _State.INTERDOMAIN
        remote.remote_domid, remote.remote_port = queue.domid, local.number
        # evtchn_bind_interdomain: "We may have lost notifications on the remote
        # unbound port. Fix that up here by conservatively always setting a
        # notification on the local port."  Linux binds the port unmasked, so
        # it is delivered at once.
        self._raise(local)
        return local.number

    def _bind_virq(self, queue: _Queue, virq: int) -> int:
        op = "bind virq"
        self._check_usable(queue, op)
        if queue.restrict_domid is not None:
            raise _error(errno.EACCES, op, f"handle is restricted to domain {queue.restrict_domid}")
        if not 0 <= virq < NR_VIRQS:
            raise _error(errno.EINVAL, op, f"VIRQ {virq} is not below NR_VIRQS ({NR_VIRQS})")
        virqs = self._virqs.setdefault(queue.domid, {})
        if virq in virqs:
            raise _error(
                errno.EEXIST, op, f"VIRQ {virq} is already bound to port {virqs[virq].number} of domain {queue.domid}"
            )
        port = self._allocate(queue, _State.VIRQ, op)
        port.virq = virq
        virqs[virq] = port
        return port.number

    def _owned(self, queue: _Queue, port: int, operation: str) -> _Port:
        found = queue.ports.get(port)
        if found is None:
            raise _error(errno.ENOTCONN, operation, f"port {port} is not bound by this handle")
        return found

    def _unbind(self, queue: _Queue, port: int) -> None:
        op = "unbind"
        self._check_usable(queue, op)
        _u32(port, "port", op)
        channels = self._event_array_pages.get(queue.domid, 1) * EVENT_WORDS_PER_PAGE
        if port >= channels:
            raise _error(errno.EINVAL, op, f"port {port} is beyond the {channels} channels of the event array")
        self._unbind_user(self._owned(queue, port, op))

    def _notify(self, queue: _Queue, port: int) -> None:
        op = "notify"
        self._check_usable(queue, op)
        _u32(port, "port", op)
        self._owned(queue, port, op)
        self._send(queue.domid, port)

    def _unmask(self, queue: _Queue, port: int) -> None:
        op = "unmask"
        self._check_usable(queue, op)
        _u32(port, "port", op)
        found = queue.ports.get(port)
        if found is None or found.enabled:
            return  # evtchn_write skips ports that are not ours or not masked
        found.enabled = True
        if found.pending:
            # xen_irq_lateeoi unmasks the channel in Xen; Xen delivers a
            # pending bit that was set while masked (evtchn_port_unmask).
            self._raise(found)

    def _restrict(self, queue: _Queue, domid: int) -> None:
        op = "restrict domid"
        self._check_usable(queue, op)
        if queue.restrict_domid is not None:
            raise _error(errno.EACCES, op, f"handle is already restricted to domain {queue.restrict_domid}")
        if domid == 0 or not 0 <= domid < DOMID_FIRST_RESERVED:
            raise _error(
                errno.EINVAL, op, f"domain {domid} cannot be a restriction (0 and >= DOMID_FIRST_RESERVED refused)"
            )
        queue.restrict_domid = domid

    def _reset(self, queue: _Queue, drain: Callable[[], None]) -> None:
        self._check_usable(queue, "reset")
        drain()
        queue.overflow = False

    def _overflowed(self, queue: _Queue) -> bool:
        with self._lock:
            return queue.overflow

    # ----------------------------------------------------------- channel mechanics

    def _send(self, domid: int, number: int) -> None:
        """``evtchn_send``: interdomain -> remote end pending; otherwise dropped."""
        port = self._domains.get(domid, {}).get(number)
        if port is None or port.state is not _State.INTERDOMAIN:
            return
        remote = self._domains.get(port.remote_domid, {}).get(port.remote_port)
        if remote is not None:
            self._raise(remote)

    def _raise(self, port: _Port) -> None:
        """Set *port* pending: deliver it to its handle's ring unless it is masked."""
        if not port.enabled:
            port.pending = True  # coalesces: Xen keeps one pending bit
            return
        if port.detached:
            return  # Linux freed its handler: nobody hears it
        port.enabled = False
        port.pending = False
        queue = port.owner
        if queue.released or queue.overflow:
            return
        try:
            os.write(queue.pipe.fileno(), _PORT.pack(port.number))
        except BlockingIOError:
            queue.overflow = True  # evtchn_interrupt: ring full -> ring_overflow
        except BrokenPipeError:
            self._release(queue)  # every copy of the handle's fd is gone

    def _unbind_user(self, port: _Port) -> None:
        """``evtchn_unbind_from_user``: the handle forgets the port, and Xen closes
        it — unless an unmap notification holds it (``evtchn_get``): Linux keeps
        the channel bound, and connected, until the last such reference is put,
        so the notification still reaches the remote end (seen on Xen 4.17 +
        Linux 6.1)."""
        if port.holds:
            port.detached = True
            port.owner.ports.pop(port.number, None)
        else:
            self._close_port(port)

    def _close_port(self, port: _Port) -> None:
        """``__evtchn_close`` followed by Linux forgetting the port."""
        if port.state is _State.INTERDOMAIN:
            remote = self._domains.get(port.remote_domid, {}).get(port.remote_port)
            if remote is not None and remote.state is _State.INTERDOMAIN:
                remote.state = _State.UNBOUND
                remote.remote_domid = port.domid  # the closer's domain may bind it again
                remote.remote_port = 0
        elif port.state is _State.VIRQ:
            virqs = self._virqs.get(port.domid, {})
            if virqs.get(port.virq) is port:
                del virqs[port.virq]
        ports = self._domains.get(port.domid, {})
        if ports.get(port.number) is port:
            del ports[port.number]
        port.owner.ports.pop(port.number, None)


# --------------------------------------------------------------------------- handle


class EmulatedEvtchnHandle(EvtchnHandle):
    """An open ``/dev/xen/evtchn`` of domain *domid* on the emulated hypervisor."""

    def __init__(self, hypervisor: _Hypervisor, domid: int) -> None:
        self._hub: EventChannelHub = hypervisor.events
        self.domid = domid
        self._fd, self._queue = self._hub._open(domid)
        self._partial = b""  # bytes of a port a foreign reader of the fd left half-read

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        """This object's descriptor is closed (a copy passed elsewhere may live on)."""
        return self._fd.closed

    def _live(self) -> _Queue:
        # A closed handle may still have an orphaned queue (a copy of its fd is
        # open elsewhere), but this object no longer speaks for it: EBADF, as an
        # ioctl on a closed descriptor.
        if self._fd.closed:
            raise _error(errno.EBADF, "ioctl", "the handle is closed")
        return self._queue

    def bind_unbound_port(self, remote_domain: int) -> int:
        with self._hub._lock:
            return self._hub._bind_unbound(self._live(), remote_domain)

    def bind_interdomain(self, remote_domain: int, remote_port: int) -> int:
        with self._hub._lock:
            return self._hub._bind_interdomain(self._live(), remote_domain, remote_port)

    def bind_virq(self, virq: int) -> int:
        with self._hub._lock:
            return self._hub._bind_virq(self._live(), virq)

    def unbind(self, port: int) -> None:
        with self._hub._lock:
            self._hub._unbind(self._live(), port)

    def notify(self, port: int) -> None:
        with self._hub._lock:
            self._hub._notify(self._live(), port)

    def read_pending(self, max_ports: int = 256) -> list[int]:
        self._live()
        if max_ports <= 0:
            return []
        if self._hub._overflowed(self._queue):
            # evtchn_read: once the ring overflowed, reads fail until RESET.
            raise _error(errno.EFBIG, "read", "the event ring overflowed; reset the handle")
        # evtchn_read hands out at most a page per call.
        want = min(max_ports * _PORT.size, PAGE_SIZE) - len(self._partial)
        try:
            data = self._partial + os.read(self._fd.fileno(), want)
        except BlockingIOError:
            data = self._partial
        whole = len(data) - len(data) % _PORT.size
        self._partial = data[whole:]
        return [number for (number,) in _PORT.iter_unpack(data[:whole])]

    def unmask(self, port: int) -> None:
        with self._hub._lock:
            self._hub._unmask(self._live(), port)

    def restrict_domid(self, domid: int) -> None:
        with self._hub._lock:
            self._hub._restrict(self._live(), domid)

    def reset(self) -> None:
        with self._hub._lock:
            self._hub._reset(self._live(), self._drain)

    def _drain(self) -> None:
        self._partial = b""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd.fileno(), PAGE_SIZE):
                pass

    def close(self) -> None:
        """Close this descriptor; the ports go when the last copy of it does."""
        if self._fd.closed:
            return
        self._fd.close()
        self._hub._handle_closed(self._queue)

    def __repr__(self) -> str:
        state = "closed" if self._fd.closed else f"fd={self._fd.fileno()}"
        return f"EmulatedEvtchnHandle(domid={self.domid}, {state}, ports={sorted(self._queue.ports)})"
