"""The emulated hypervisor: several domains in one process, behaving like Xen + Linux.

:class:`EmulatedHypervisor` owns the domains, their grant tables and every
descriptor the emulation holds.  :meth:`EmulatedHypervisor.backend` gives a
:class:`~grant_broker.backend.contract.Backend` acting as one domain; the
devices it opens are real descriptors (see :mod:`.instance`) over real shared
memory (memfds, see :mod:`.grants`), so they can be passed to other processes
exactly like the Linux devices' fds and the memory they map.

Services for the device emulations (this package only):

* ``lock`` — one re-entrant lock for all emulated state;
* ``grants`` — the :class:`~.grants.GrantSystem`;
* ``memory`` — the :class:`~.grants.HypervisorMemory`: every memfd the
  hypervisor made, which is all a dma-buf import or a read-only view may use;
* :meth:`open_link` — an :class:`~.instance.InstanceLink` registered with its
  domain, released when the domain is destroyed or the hypervisor closes;
* :meth:`reap` — release instances whose descriptors are gone everywhere
  (for when no event loop watches them);
* :meth:`event_port_bound`, :meth:`hold_event_port`, :meth:`release_event_port`,
  :meth:`send_event` — what unmap notifications need from the event-channel
  emulation (``self.events``): a notification holds its port bound, as
  Linux's ``evtchn_get`` does, until it is sent or replaced.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from grant_broker.backend.contract import (
    Backend,
    Capabilities,
    EvtchnHandle,
    GntallocInstance,
    GntdevInstance,
    MemBufAbi,
    MemBufDevice,
)
from grant_broker_protocol.errors import BrokerError
from grant_broker.uapi.mem_buf import MEM_BUF_VMID_PRIMARY_VM

from .evtchn import EmulatedEvtchnHandle, EventChannelHub
from .gntalloc import EmulatedGntalloc
from .gntdev import EmulatedGntdev
from .grants import GrantSystem, HypervisorMemory
from .instance import InstanceLink, check_all
from .membuf import EmulatedMemBufDevice, MemparcelRegistry

_Instance = TypeVar("_Instance")

# Linux gntalloc's module parameter ``limit`` (pages per domain).
DEFAULT_GNTALLOC_LIMIT = 1024

EMULATION_NOTES: tuple[str, ...] = (
    "one process emulates every domain; any domid can be acted as",
    "memory already mmapped from a span stays accessible after unmap or close "
    "(on Linux until munmap); unmap notifications fire at unmap / close, not at the last munmap",
    "read-only spans are O_RDONLY descriptors of memfds of mode 0600: a writable mmap of them is refused, "
    "and so is a writable reopen through /proc/<pid>/fd/<n> — except to a client running as the broker's "
    "user or as root",
    "a dma-buf import takes only memory the emulated hypervisor made, through a writable descriptor: a "
    "dma-buf it exported or its gntalloc pages; any other file, a client's own memfd included, is EINVAL "
    "(on Linux a memfd becomes a dma-buf through /dev/udmabuf)",
    "a mem-buf import gets the access of the descriptor that was exported: WRITE perms on a read-only "
    "export are EACCES; read-only perms on a client's writable memfd are EINVAL (the emulation cannot "
    "make a read-only descriptor of a client's file; export an O_RDONLY descriptor instead); memory "
    "the hypervisor made can be imported read-only",
    "memory the hypervisor makes (gntalloc pages, mem-buf allocations) cannot be resized; a client's "
    "memfd exported through mem-buf can still be shrunk by its owner under the importers",
    "a dma-buf export must be all the pages of one granted buffer (one gntalloc allocation or one "
    "imported dma-buf), in order from its first page",
    "get_offset_for_vaddr recognises a mapping by the file and offset mapped at the address",
    "gntdev spans are descriptors of the granter's memory (memfds), not of the gntdev instance",
    "a gntdev span can be mmapped any number of times (on a PV dom0 a gntdev mapping can be mmapped once "
    "in its lifetime: after its munmap a new mmap is EINVAL)",
    "a gntdev CLEAR_BYTE notification fires at unmap once map_memory was called, even if no span was "
    "mmapped (on a PV dom0 only the munmap of an mmapped mapping clears the byte)",
    "a grant deallocated while another domain maps it ends at that domain's last unmap (Linux retries "
    "gnttab_end_foreign_access from a one-second timer: on real Xen the ref stays mappable for about a second more)",
    "an instance whose last descriptor closes elsewhere (another process) is released when the "
    "running asyncio loop sees the hang-up, or else at the emulation's next device operation",
    "SET_MAX_GRANTS is implemented (real Linux gntdev answers ENOTTY)",
    "gntdev dma-buf ioctls are implemented (Debian's kernel lacks CONFIG_XEN_GNTDEV_DMABUF)",
)


class _Domain:
    """One domain: its identity and the instances opened as it."""

    __slots__ = ("domid", "links", "gntalloc_pages")

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.links: set[InstanceLink] = set()
        self.gntalloc_pages = 0


class EmulatedHypervisor:
    """An in-process hypervisor holding several domains.

    A context manager; :meth:`close` releases every instance (firing their
    unmap notifications) and closes every descriptor the emulation holds.
    """

    def __init__(self, *, gntalloc_limit: int = DEFAULT_GNTALLOC_LIMIT) -> None:
        self.lock = threading.RLock()
        self.gntalloc_limit = gntalloc_limit
        self.grants = GrantSystem()
        self.memory = HypervisorMemory()
        self._domains: dict[int, _Domain] = {}
        self._backends: list[EmulatedBackend] = []
        self._closed_links: set[InstanceLink] = set()  # closed here, a copy still open: see reap()
        self._export_bytes = itertools.count()
        self._closed = False
        self.events = EventChannelHub(self)
        self.memparcels = MemparcelRegistry(self)

    # ------------------------------------------------------------------ domains

    def backend(self, domid: int, *, vmid: int = MEM_BUF_VMID_PRIMARY_VM) -> "EmulatedBackend":
        """A backend acting as domain *domid*, creating the domain on first use.

        A second call for the same domain returns a new backend object for
        that domain.  *vmid* is the mem-buf VMID the backend's mem-buf device
        acts as (a property of the backend, not of the domain).

        Raises:
            ValueError: *domid* is not a valid domain id (0..0x7FEF).
            BrokerError(EBADF): the hypervisor is closed.
        """
        if not 0 <= domid < 0x7FF0:  # DOMID_FIRST_RESERVED, xen/include/public/xen.h
            raise ValueError(f"domain id {domid} is outside 0..0x7FEF")
        with self.lock:
            self._check_open("create backend")
            if domid not in self._domains:
                self._domains[domid] = _Domain(domid)
                self.grants.create(domid)
            backend = EmulatedBackend(self, domid, vmid)
            self._backends = [b for b in self._backends if not b.closed]
            self._backends.append(backend)
            return backend

    def domain_exists(self, domid: int) -> bool:
        """Whether *domid* exists (created by :meth:`backend`, not destroyed)."""
        # No lock on purpose: the event-channel emulation calls this while
        # holding its own lock, and the grant side holds :attr:`lock` while it
        # calls into that emulation; a dict lookup is atomic, so no lock order
        # between the two is needed.
        return domid in self._domains

    def destroy_domain(self, domid: int) -> None:
        """The domain disappears: its instances are released, its grants
        become GNTST_bad_domain for everyone (pages others still map stay
        alive until they unmap), its event channels and mem-buf state go.

        Unknown domains are ignored.
        """
        with self.lock:
            domain = self._domains.pop(domid, None)
            if domain is None:
                return
            for link in list(domain.links):
                link.release()
            self.grants.destroy(domid)
            self.events.domain_destroyed(domid)

    # ------------------------------------------------------------------ services for devices

    def open_link(self, domid: int, on_release: Callable[[], None], *, name: str) -> InstanceLink:
        """A new instance descriptor for domain *domid* (see :class:`InstanceLink`).

        *on_release* runs once, under :attr:`lock`, when the instance is
        released — by its last descriptor closing, by :meth:`destroy_domain`
        or by :meth:`close`.

        Raises:
            BrokerError(ESRCH): *domid* does not exist.
        """
        with self.lock:
            self._check_open(f"open {name}")
            domain = self._domains.get(domid)
            if domain is None:
                raise BrokerError(errno.ESRCH, f"open {name}", f"domain {domid} does not exist")
            holder: list[InstanceLink] = []

            def released() -> None:
                with self.lock:
                    domain.links.discard(holder[0])
                    on_release()

            link = InstanceLink(released, name=name, on_close=self._closed_links.add)
            holder.append(link)
            domain.links.add(link)
            return link

    def reap(self) -> None:
        """Release instances whose every descriptor is closed and that no
        event loop watches (a process holding one died, say).  Cheap: one
        ``poll`` over the candidates."""
        with self.lock:
            # Only links closed here while a copy lived on can be waiting to be
            # released: looking at just those keeps every device operation
            # O(1) in the number of open instances (sessions).
            if self._closed_links:
                check_all(self._closed_links)
                self._closed_links = {link for link in self._closed_links if not link.released}

    def event_port_bound(self, domid: int, port: int) -> bool:
        """Whether *port* is bound in domain *domid* (``evtchn_get`` succeeds)."""
        return bool(self.events.is_bound(domid, port))

    def hold_event_port(self, domid: int, port: int) -> object | None:
        """``evtchn_get`` for an unmap notification: a reference that keeps
        *port* bound until :meth:`release_event_port`; None if it is not bound."""
        return self.events.hold(domid, port)

    def release_event_port(self, hold: object | None) -> None:
        """``evtchn_put`` of a :meth:`hold_event_port` reference (None: nothing)."""
        self.events.release(hold)

    def send_event(self, domid: int, port: int) -> None:
        """``notify_remote_via_evtchn`` from the kernel of *domid*: never fails
        (a port unbound since is silently skipped, as in Linux)."""
        try:
            self.events.notify_local(domid, port)
        except (BrokerError, KeyError, LookupError):
            pass

    def next_export_byte(self) -> int:
        """A fresh lock byte for a dma-buf export (see :mod:`.grants`)."""
        return next(self._export_bytes)

    def gntalloc_pages(self, domid: int) -> int:
        domain = self._domains.get(domid)
        return 0 if domain is None else domain.gntalloc_pages

    def gntalloc_pages_changed(self, domid: int, delta: int) -> None:
        domain = self._domains.get(domid)
        if domain is not None:
            domain.gntalloc_pages += delta

    # ------------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise BrokerError(errno.EBADF, operation, "the emulated hypervisor is closed")

    def close(self) -> None:
        """Release everything (firing unmap notifications) and close every
        descriptor the emulation holds.  Idempotent."""
        with self.lock:
            if self._closed:
                return
            for backend in self._backends:
                backend.close()
            self._backends.clear()
            for domain in list(self._domains.values()):
                for link in list(domain.links):
                    link.release()
            self._closed = True
            self.events.close()
            self.memparcels.close()
            self.grants.close()
            self._domains.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmulatedHypervisor domains={sorted(self._domains)}{' closed' if self._closed else ''}>"


class EmulatedBackend(Backend):
    """The devices of one domain of an :class:`EmulatedHypervisor`."""

    name = "emulated"

    def __init__(self, hypervisor: EmulatedHypervisor, domid: int, vmid: int) -> None:
        self.hypervisor = hypervisor
        self.domid = domid
        self.vmid = vmid
        self._opened: list[Any] = []
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            backend="emulated",
            gntdev=True,
            gntalloc=True,
            evtchn=True,
            grant_copy=True,
            dmabuf=True,
            dmabuf_export=True,
            dmabuf_import=True,
            set_max_grants=True,
            membuf_abi=MemBufAbi.LEGACY_2020,
            any_domain=True,
            notes=EMULATION_NOTES,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _open(self, what: str, factory: Callable[[], _Instance]) -> _Instance:
        with self.hypervisor.lock:
            if self._closed:
                raise BrokerError(errno.EBADF, f"open {what}", f"the backend of domain {self.domid} is closed")
            if not self.hypervisor.domain_exists(self.domid):
                raise BrokerError(errno.ESRCH, f"open {what}", f"domain {self.domid} does not exist")
            self.hypervisor.reap()
            instance = factory()
            self._opened = [i for i in self._opened if not getattr(i, "closed", False)]
            self._opened.append(instance)
            return instance

    def open_gntdev(self) -> GntdevInstance:
        return self._open("gntdev", lambda: EmulatedGntdev(self.hypervisor, self.domid))

    def open_gntalloc(self) -> GntallocInstance:
        return self._open("gntalloc", lambda: EmulatedGntalloc(self.hypervisor, self.domid))

    def open_evtchn(self) -> EvtchnHandle:
        return self._open("evtchn", lambda: EmulatedEvtchnHandle(self.hypervisor, self.domid))

    def open_membuf(self) -> MemBufDevice:
        return self._open("membuf", lambda: EmulatedMemBufDevice(self.hypervisor, self.vmid))

    def close(self) -> None:
        """Close every instance opened through this backend that is still open."""
        with self.hypervisor.lock:
            self._closed = True
            opened, self._opened = self._opened, []
            for instance in opened:
                instance.close()

    def __repr__(self) -> str:
        return f"<EmulatedBackend domain {self.domid} vmid {self.vmid}>"
