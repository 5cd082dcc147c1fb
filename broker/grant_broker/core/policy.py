"""Who may open a session, what one session may hold, and which domains it may act as and name.

The kernel interfaces have almost no per-client limits (gntdev has no grant
quota, an evtchn handle binds as many ports as the domain has): the broker's
own quotas live here, and are checked once, in the operations.  So do the
rules of which domains (and mem-buf VMIDs) a uid may act as and name
(:class:`Policy`, :class:`DomainGrant`, :class:`DomainOwners`), checked at the
hello by the registry and on every call through
:func:`grant_broker.core.checks.check_peers`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from grant_broker_protocol.errors import BrokerError
from grant_broker_protocol.fdchannel import PeerCredentials


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may hold; the broker's own quotas (the kernel has almost none)."""

    max_sessions: int = 4096
    max_sessions_per_uid: int = 256
    max_grants_per_session: int = 65536
    max_ports_per_session: int = 1024
    max_pending_fd_frames: int = 16
    max_subscriptions_per_session: int = 64
    max_map_memory_per_mapping: int = 64
    fd_frame_wait_seconds: float = 5.0
    hello_timeout_seconds: float = 5.0
    # Budgets per session and per uid (core/budgets.py): what the broker holds
    # on a client's behalf, so that one user cannot starve the others.  The
    # per-uid ones are the sum over all sessions of the uid.
    fd_transfer_expiry_seconds: float = 30.0  # descriptors sent that no call claims are closed after this
    max_fds_held_per_session: int = 1024  # pending transfers' descriptors, dma-bufs kept, copy buffers
    max_fds_held_per_uid: int = 4096
    max_pool_pages_per_session: int = 256  # gntalloc pages; Linux's pool (`limit`) is 1024 per domain
    max_pool_pages_per_uid: int = 512
    max_copy_buffer_bytes_per_session: int = 64 << 20  # client memory mapped into the broker
    max_copy_buffer_bytes_per_uid: int = 256 << 20
    max_ports_per_uid: int = 2048
    max_subscriptions_per_uid: int = 256
    max_calls_per_session: int = 1024  # calls being served (the SDK's max_in_flight is 1024 too)
    max_calls_per_uid: int = 4096
    # Fast-path calls of one session served at once; beyond it the broker
    # stops reading the session's connection until one ends.
    max_fast_calls_in_flight: int = 256


ADMIN_RIGHTS: tuple[str, ...] = ("view", "release", "drain", "limits")
"""What an administrator on the remote admin listener may do (``Policy.admin_identities``):
``view`` — the status, a session, the metrics; ``release`` — force-release a
session; ``drain`` — drain the broker; ``limits`` — change limits and budgets."""
ALL_ADMIN_RIGHTS = "all"
"""Written instead of the rights: every one of :data:`ADMIN_RIGHTS`."""


@dataclass(frozen=True, slots=True)
class AdminIdentity:
    """A client certificate's identity on the remote admin listener and the
    rights (:data:`ADMIN_RIGHTS`) it has.  *identity* is compared, exactly,
    with each name the certificate carries: its subject's common name, its
    whole subject (``CN=ops,O=Example``, as gRPC spells it) and each subject
    alternative name (DNS name, URI such as a SPIFFE ID, e-mail, IP address).
    Written ``IDENTITY=RIGHT[,RIGHT...]`` on the command line: :meth:`parse`."""

    identity: str
    rights: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> "AdminIdentity":
        """``ops.example.org=view,release`` or ``spiffe://example.org/ops=all``
        (the last ``=`` separates the rights).

        Raises:
            ValueError: anything else (the message says what is expected).
        """
        identity, equals, listed = text.rpartition("=")
        rights = frozenset(right.strip() for right in listed.split(",") if right.strip())
        known = (*ADMIN_RIGHTS, ALL_ADMIN_RIGHTS)
        if not equals or not identity or not rights or not rights <= set(known):
            raise ValueError(
                f"{text!r}: expected IDENTITY=RIGHT[,RIGHT...] with rights among {', '.join(known)}, e.g. ops.example.org=view,drain"
            )
        if ALL_ADMIN_RIGHTS in rights:
            rights = frozenset(ADMIN_RIGHTS)
        return cls(identity, rights)


ActAs = Literal["owned", "granted", "any"]
ACT_AS_MODES: tuple[ActAs, ...] = ("owned", "granted", "any")
"""What a uid that no grant names may act as (``Policy.act_as``, ``serve --act-as``)."""


@dataclass(frozen=True, slots=True)
class DomainGrant:
    """Domains (or mem-buf VMIDs) *ids* granted to the peers of uid *uid*, or of
    (primary, as ``SO_PEERCRED`` gives it) gid *gid*.  Written
    ``[uid:|gid:]N:ID[,ID|,FIRST-LAST...]`` on the command line (``1000:3,4``,
    ``gid:100:10-19``): see :meth:`parse`."""

    ids: frozenset[int]
    uid: int | None = None
    gid: int | None = None

    def applies(self, creds: PeerCredentials) -> bool:
        return creds.uid == self.uid if self.uid is not None else creds.gid == self.gid

    @classmethod
    def parse(cls, text: str) -> "DomainGrant":
        """``1000:3,4`` (uid 1000: 3 and 4), ``uid:1000:3``, ``gid:100:10-19``.

        Raises:
            ValueError: anything else (the message says what is expected).
        """
        expected = f"{text!r}: expected [uid:|gid:]N:ID[,ID...] with IDs as numbers or FIRST-LAST ranges, e.g. 1000:3,4"
        kind, _, rest = text.partition(":") if text.startswith(("uid:", "gid:")) else ("uid", "", text)
        who, _, listed = rest.partition(":")
        ids: set[int] = set()
        try:
            number = int(who)
            for item in listed.split(","):
                first_text, dash, last_text = item.strip().partition("-")
                first = int(first_text)
                last = int(last_text) if dash else first
                if not 0 <= first <= last <= 0xFFFFFFFF or last - first >= 0x10000:
                    raise ValueError(item)
                ids.update(range(first, last + 1))
        except ValueError:
            raise ValueError(expected) from None
        if number < 0:
            raise ValueError(expected)
        return cls(frozenset(ids), uid=number) if kind == "uid" else cls(frozenset(ids), gid=number)


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may open a session, and which domains its calls may act as and name.

    ``allowed_uids``/``allowed_gids`` empty = anyone the socket permissions let
    in (the socket is mode 0660).

    Domains (issue 14 §5).  Administrators (``admin_uids``) and the broker's
    own uid (``owner_uid``; it owns the broker's devices anyway) are not
    restricted.  For everyone else:

    * **Acting as** (a backend where a session chooses its domain: the
      emulated one).  A uid (or gid) that ``act_as_domains`` grants domains
      may act only as those (a hello that names none: the smallest), and
      likewise ``act_as_vmids`` for mem-buf VMIDs; what is granted is
      reserved for its grantees.  A uid granted none may act as, by
      ``act_as`` (:data:`ACT_AS_MODES`):

      - ``"owned"`` (``grant-broker serve``'s default): a domain or VMID no
        grant names and no other uid has acted as — the first uid to act as
        one owns it for the broker's life (:class:`DomainOwners`), so nobody
        can act as another user's domain to map the grants offered to it,
        bind the ports offered to it or import what is shared with its VMID;
      - ``"granted"``: none (it may open no session on such a backend);
      - ``"any"`` (the default of this class, for embedding and tests): any
        that no grant names, as before there was a policy.

      The domain is checked at the hello (it never changes), the VMID by
      every mem-buf call.
    * **Naming** (every backend; on a real Xen host every session acts as the
      broker's own domain, so this is what narrows a client there): a uid or
      gid that ``remote_domains`` names may map grants of, grant to, copy
      with and bind event channels to only those domains (and its session's
      own); ``remote_vmids`` likewise the VMIDs of mem-buf ACLs (and its
      own).  A uid that no rule names is not narrowed.  Checked by every call
      that names a domain (:func:`grant_broker.core.checks.check_peers`).
    """

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    admin_uids: frozenset[int] = frozenset({0})
    act_as_domains: tuple[DomainGrant, ...] = ()
    act_as_vmids: tuple[DomainGrant, ...] = ()
    remote_domains: tuple[DomainGrant, ...] = ()
    remote_vmids: tuple[DomainGrant, ...] = ()
    act_as: ActAs = "any"
    owner_uid: int = field(default_factory=os.geteuid)
    # Certificate identities of the remote admin listener and their rights (AdminIdentity).
    admin_identities: tuple[AdminIdentity, ...] = ()

    def __post_init__(self) -> None:
        if self.act_as not in ACT_AS_MODES:
            raise ValueError(f"act_as {self.act_as!r} is not one of {', '.join(ACT_AS_MODES)}")

    def admits(self, creds: PeerCredentials) -> bool:
        if not self.allowed_uids and not self.allowed_gids:
            return True
        return creds.uid in self.allowed_uids or creds.gid in self.allowed_gids or creds.uid == 0

    def is_admin(self, creds: PeerCredentials) -> bool:
        return creds.uid in self.admin_uids

    def admin_rights(self, names: Iterable[str]) -> tuple[str, frozenset[str]] | None:
        """The identity among a client certificate's *names* that
        ``admin_identities`` names, and its rights (the union, should several
        be named); None: the certificate is nobody's here."""
        wanted = set(names)
        matched = [grant for grant in self.admin_identities if grant.identity in wanted]
        if not matched:
            return None
        return matched[0].identity, frozenset().union(*(grant.rights for grant in matched))

    # ------------------------------------------------------------ domains (§5)

    def unrestricted(self, creds: PeerCredentials) -> bool:
        """Administrators and the broker's own uid may act as and name any domain."""
        return creds.uid in self.admin_uids or creds.uid == self.owner_uid

    @staticmethod
    def _granted(grants: tuple[DomainGrant, ...], creds: PeerCredentials) -> frozenset[int] | None:
        """The union of *grants* that apply to *creds*; None when none applies."""
        applying = [grant.ids for grant in grants if grant.applies(creds)]
        return frozenset().union(*applying) if applying else None

    def acting_domain(self, creds: PeerCredentials, domid: int | None) -> int | None:
        """The domain a session of *creds* asks to act as, given its hello's
        *domid* (None: named none), on a backend where sessions choose: a
        uid granted domains gets *domid* if granted, or the smallest one;
        anyone else *domid* itself (None: the backend's default), which
        :meth:`check_owner` then checks.

        Raises:
            BrokerError: EPERM when *domid* is not one of those granted.
        """
        return self._acting(self.act_as_domains, creds, domid, "domain")

    def acting_vmid(self, creds: PeerCredentials, vmid: int | None) -> int | None:
        """As :meth:`acting_domain`, for the mem-buf VMID (checked by each
        mem-buf call with :meth:`check_owner`)."""
        return self._acting(self.act_as_vmids, creds, vmid, "mem-buf VMID")

    def _acting(self, grants: tuple[DomainGrant, ...], creds: PeerCredentials, wanted: int | None, what: str) -> int | None:
        granted = None if self.unrestricted(creds) else self._granted(grants, creds)
        if granted is None:
            return wanted
        if wanted is None:
            return min(granted)
        if wanted not in granted:
            raise _denied("open session", f"uid {creds.uid} may not act as {what} {wanted}; it may act as {_ids(granted)}")
        return wanted

    def check_owner(
        self, creds: PeerCredentials, kind: str, ident: int, owners: "DomainOwners", operation: str = "open session"
    ) -> None:
        """*creds* may act as domain (*kind* ``"domain"``) or mem-buf VMID
        (``"vmid"``) *ident*; it is recorded as *ident*'s owner if it had none.

        The unrestricted may, and the uids granted *ident*; a uid granted
        none of its kind may act as one that no grant names and that no other
        uid has acted as before (the first uid to act as one owns it for the
        broker's life) with ``act_as`` ``"owned"``, none with ``"granted"``,
        any with ``"any"``.

        Raises:
            BrokerError: EPERM otherwise.
        """
        if kind == "domain":
            grants, what, option = self.act_as_domains, "domain", "--allow-domain"
        else:
            grants, what, option = self.act_as_vmids, "mem-buf VMID", "--allow-vmid"
        if not self.unrestricted(creds):
            granted = self._granted(grants, creds)
            owner = owners.owner(kind, ident)
            if granted is not None:
                if ident not in granted:
                    raise _denied(operation, f"uid {creds.uid} may not act as {what} {ident}; it may act as {_ids(granted)}")
            elif self.act_as == "granted":
                raise _denied(
                    operation,
                    f"uid {creds.uid} (gid {creds.gid}) may act as no {what} on this broker; "
                    f"an administrator grants them with serve {option} UID:ID[,ID...]",
                )
            elif any(ident in grant.ids for grant in grants):
                raise _denied(operation, f"{what} {ident} is reserved by the broker's policy for the users granted it")
            elif self.act_as == "owned" and owner is not None and owner != creds.uid:
                raise _denied(
                    operation,
                    f"{what} {ident} belongs to another user (the first to act as it on this broker); choose another, "
                    f"or ask an administrator to grant you one with serve {option}",
                )
        owners.claim(kind, ident, creds.uid)

    def remote_domains_for(self, creds: PeerCredentials) -> frozenset[int] | None:
        """The domains (besides its own) a session of *creds* may name; None: any."""
        if not self.remote_domains or self.unrestricted(creds):
            return None
        return self._granted(self.remote_domains, creds)

    def remote_vmids_for(self, creds: PeerCredentials) -> frozenset[int] | None:
        """The mem-buf VMIDs (besides its own) a session of *creds* may name in an ACL; None: any."""
        if not self.remote_vmids or self.unrestricted(creds):
            return None
        return self._granted(self.remote_vmids, creds)


class DomainOwners:
    """Which uid first acted as each domain and mem-buf VMID of a broker (one
    per :class:`~grant_broker.core.registry.SessionRegistry`): the owner of
    one that no grant names, for :meth:`Policy.check_owner`."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, int], int] = {}

    def owner(self, kind: str, ident: int) -> int | None:
        return self._owners.get((kind, ident))

    def claim(self, kind: str, ident: int, uid: int) -> None:
        """*uid* owns *ident* unless someone already does."""
        self._owners.setdefault((kind, ident), uid)


def _denied(operation: str, detail: str) -> BrokerError:
    return BrokerError(errno.EPERM, operation, detail)


def _ids(ids: frozenset[int]) -> str:
    """*ids* for a message: ``3, 4, 10-19``."""
    ordered = sorted(ids)
    runs: list[str] = []
    start = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(runs)
