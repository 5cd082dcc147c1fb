"""Grants across real processes: span and instance descriptors passed to a child.

The child is a fresh interpreter (``subprocess`` with ``pass_fds``) that
knows nothing of the broker: it mmaps the descriptors it is given, exactly as
a client of the broker would.  The child maps the grantee's memory itself
(on a PV dom0 a gntdev mapping can be mmapped by one process at a time), and
the parent watches through the granter's own view.
"""

from __future__ import annotations

import subprocess
import sys

from grant_broker.uapi.gntdev import UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT

from ._grant_helpers import close_spans, event_channel, grant_refs, granted_pages, granter_view

CHILD_TIMEOUT = 30  # seconds

# argv: fd offset length.  Maps the span writable, writes a greeting, then
# answers each "read N" line on stdin with the N bytes at offset 100.
SHARING_CHILD = r"""
import mmap, sys
fd, offset, length = map(int, sys.argv[1:4])
memory = mmap.mmap(fd, length, mmap.MAP_SHARED, offset=offset)
memory[0:10] = b"from child"
print("ready", flush=True)
for line in sys.stdin:
    count = int(line.split()[1])
    print(memory[100:100 + count].decode(), flush=True)
"""

# argv: fd offset length.  Maps the span writable and holds it (and every
# other descriptor it was given) until killed.
HOLDING_CHILD = r"""
import mmap, sys, time
fd, offset, length = map(int, sys.argv[1:4])
memory = mmap.mmap(fd, length, mmap.MAP_SHARED, offset=offset)
print("ready", flush=True)
time.sleep(600)
"""


def _child(code: str, span, *extra_fds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, str(span.fd.fileno()), str(span.offset), str(span.length)],
        pass_fds=(span.fd.fileno(), *extra_fds),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_child_process_shares_a_granted_page(domains) -> None:
    with (
        granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
        granter_view(gntalloc, allocation) as granter,
        domains.local.open_gntdev() as gntdev,
    ):
        index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
        spans = gntdev.map_memory(index, 1, writable=True)
        try:
            (span,) = spans
            with _child(SHARING_CHILD, span) as child:
                try:
                    assert child.stdout.readline().strip() == "ready"
                    assert bytes(granter[0:10]) == b"from child"
                    granter[100:111] = b"from parent"
                    child.stdin.write("read 11\n")
                    child.stdin.flush()
                    assert child.stdout.readline().strip() == "from parent"
                finally:
                    child.stdin.close()
                    child.wait(CHILD_TIMEOUT)
            assert child.returncode == 0
        finally:
            close_spans(spans)
        gntdev.unmap_grant_ref(index, 1)


async def test_unmap_notify_fires_when_the_holder_is_killed(domains) -> None:
    mark, offset = 0xA5, 200
    async with event_channel(domains.local, domains.peer) as channel:
        with (
            granted_pages(domains.peer, domains.local.domid) as (gntalloc, allocation),
            granter_view(gntalloc, allocation) as granter,
        ):
            granter[offset] = mark
            gntdev = domains.local.open_gntdev()
            try:
                index = gntdev.map_grant_refs(grant_refs(domains.peer, allocation))
                spans = gntdev.map_memory(index, 1, writable=True)
                gntdev.set_unmap_notify(index + offset, UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT, channel.sender_port)
                try:
                    (span,) = spans
                    child = _child(HOLDING_CHILD, span, gntdev.fileno())
                finally:
                    close_spans(spans)
            finally:
                gntdev.close()  # the child's copy keeps the instance alive
            with child:
                try:
                    assert child.stdout.readline().strip() == "ready"
                    assert granter[offset] == mark
                    assert channel.receiver.read_pending() == []
                finally:
                    child.kill()
                    child.wait(CHILD_TIMEOUT)
            assert await channel.received() == [channel.receiver_port]
            assert granter[offset] == 0
