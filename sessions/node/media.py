"""The node's own media port: one UDP socket for every session on this node.

A new client is routed by the server ufrag in the USERNAME of its first STUN binding request (the
node minted that ufrag when it answered the offer); after that, by the client's address. Session
code never sees the socket: it gets datagrams from a bounded inbox and sends through a callable,
so the relays of the cluster (which deliver through QUIC tunnels) can replace this port without
touching a session.

The receive loop waits for readability once and then drains the socket without blocking until it
would block: on this machine that forwards about three times more packets per second than awaiting
``recvfrom`` per packet.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Protocol, final

import attrs
import trio

from sessions.webrtc import stun
from sessions.webrtc.errors import StunError

log = logging.getLogger("parley.media")

Address = tuple[str, int]
Datagram = tuple[bytes, Address]
#: how a session sends: (payload, client address)
SendFn = Callable[[bytes, Address], None]

INBOX_SIZE = 256
# Python's socket module does not export it; Linux's value (asm-generic/socket.h)
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None
MAX_DATAGRAM = 2048


@contextlib.asynccontextmanager
async def bound_udp(
    host: str,
    port: int,
    *,
    v6only: bool = False,
    receive_buffer: int = 0,
    reuse_port: bool = False,
) -> AsyncIterator[socket.socket]:
    """A UDP socket bound to ``host:port``, as a plain non-blocking socket.

    Sends never wait (a full buffer drops, like the network would) and receives drain without a
    Trio round trip each: wait for readability with ``trio.lowlevel.wait_readable`` once, then
    read until ``BlockingIOError``. On this machine that forwards about three times more
    datagrams per second than awaiting ``recvfrom`` per datagram. Shared by the node's media
    port, the relay's public port and the QUIC tunnel endpoints.

    ``receive_buffer`` (bytes) is what the kernel may hold for us while this process is not
    running; see :func:`set_receive_buffer`. With ``reuse_port`` several processes bind the
    same address (SO_REUSEPORT) and the kernel spreads senders over them, each sender (address
    and port) always to the same socket while the set of sockets stays the same.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        if v6only and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        raw = socket.socket(fileno=sock.fileno(), family=family, type=socket.SOCK_DGRAM)
        try:
            raw.setblocking(False)
            if receive_buffer:
                set_receive_buffer(raw, receive_buffer)
            yield raw
        finally:
            raw.detach()  # the Trio socket owns the descriptor and closes it


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a receive buffer of ``size`` bytes; returns what the kernel granted.

    Linux caps SO_RCVBUF at ``net.core.rmem_max``; a process with CAP_NET_ADMIN may go past the
    cap (SO_RCVBUFFORCE). If neither gets ``size``, a warning says which sysctl to raise: a
    short buffer turns any pause of this process into lost packets, and the kernel counts those
    where our counters cannot see them (:func:`kernel_drops`).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux reports twice the request (it counts its own bookkeeping); half is what we asked.
    force = getattr(socket, "SO_RCVBUFFORCE", _SO_RCVBUFFORCE)
    if granted // 2 < size and force is not None:
        with contextlib.suppress(PermissionError):
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted // 2 < size:
        log.warning(
            "UDP receive buffer capped below what was asked: raise net.core.rmem_max",
            extra={"asked": size, "granted": granted // 2, "port": sock.getsockname()[1]},
        )
    return granted


def kernel_drops(*socks: socket.socket | None) -> int:
    """Datagrams the kernel dropped for ``socks`` because their receive buffers were full, all
    together (Linux: the ``drops`` column of /proc/net/udp and udp6, matched by each socket's
    inode; one pass over each table). 0 for a socket that is None or the kernel does not list.
    """
    inodes: set[str] = set()
    for sock in socks:
        if sock is not None:
            with contextlib.suppress(OSError):
                inodes.add(str(os.fstat(sock.fileno()).st_ino))
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        if not inodes:
            break
        try:
            with open(table, encoding="ascii") as rows:
                next(rows, None)  # the header
                for row in rows:
                    fields = row.split()
                    if len(fields) >= 13 and fields[9] in inodes:
                        inodes.discard(fields[9])
                        total += int(fields[-1])
        except (OSError, ValueError):
            continue
    return total


class PacketPath(Protocol):
    """What the node's session backend needs of a packet path: this port, or the relays'
    tunnels in a cluster (sessions/node/relayed.py)."""

    def candidates(self, session_id: str) -> list[Address]: ...
    def mint_ufrag(self, session_id: str) -> str | None: ...
    def register(self, session_id: str, ufrag: str) -> SessionPort: ...
    def unregister(self, session_id: str) -> None: ...


@final
@attrs.define(eq=False)
class SessionPort:
    """What a session sees of the packet path: an inbox and a way to send."""

    session_id: str
    ufrag: str
    inbox_send: trio.MemorySendChannel[Datagram]
    inbox: trio.MemoryReceiveChannel[Datagram]
    send: SendFn
    addresses: set[Address] = attrs.field(factory=set)
    dropped_full: int = 0
    #: called after a batch of sends: a tunnel transmits what the batch queued at once
    flush: Callable[[], None] = lambda: None


@final
class MediaPort:
    """One UDP socket, many sessions. Start ``run`` with ``nursery.start``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._sock: socket.socket | None = None
        self._by_ufrag: dict[str, SessionPort] = {}
        self._by_addr: dict[Address, SessionPort] = {}
        self._by_session: dict[str, SessionPort] = {}
        self.counters = {
            "received": 0,
            "sent": 0,
            "unknown_source": 0,
            "unknown_ufrag": 0,
            "malformed_stun": 0,
            "inbox_full": 0,
            "send_failed": 0,
        }

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def candidates(self, session_id: str) -> list[Address]:
        """The candidates of an answer: this port, the same for every session."""
        return [self.address]

    def mint_ufrag(self, session_id: str) -> str | None:
        """None: a node's own port routes any ufrag; the session's ICE core picks a random one."""
        return None

    def flush(self) -> None:
        """Nothing to do: every send went out at once."""

    def all_counters(self) -> dict[str, int]:
        """The counters, and what the kernel dropped at the port (its buffer was full)."""
        return {**self.counters, "kernel_drops": kernel_drops(self._sock)}

    def register(self, session_id: str, ufrag: str) -> SessionPort:
        """Route packets for ``ufrag`` to a new inbox for ``session_id``."""
        if ufrag in self._by_ufrag:
            raise ValueError(f"ufrag {ufrag!r} already routed")
        send, receive = trio.open_memory_channel[Datagram](INBOX_SIZE)
        port = SessionPort(session_id, ufrag, send, receive, self.send)
        self._by_ufrag[ufrag] = port
        self._by_session[session_id] = port
        return port

    def unregister(self, session_id: str) -> None:
        port = self._by_session.pop(session_id, None)
        if port is None:
            return
        self._by_ufrag.pop(port.ufrag, None)
        for addr in port.addresses:
            self._by_addr.pop(addr, None)
        port.inbox_send.close()

    def send(self, data: bytes, addr: Address) -> None:
        """Send without waiting; a full socket buffer drops the datagram (counted)."""
        if self._sock is None:
            self.counters["send_failed"] += 1
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.counters["send_failed"] += 1
        except OSError as exc:
            self.counters["send_failed"] += 1
            log.debug("sendto %s failed: %s", addr, exc)
        else:
            self.counters["sent"] += 1

    def _route(self, data: bytes, addr: Address) -> SessionPort | None:
        port = self._by_addr.get(addr)
        if port is not None:
            return port
        # RFC 7983: only STUN (first byte 0-3) may introduce a new address.
        if not data or data[0] > 3:
            self.counters["unknown_source"] += 1
            return None
        try:
            username = stun.username_of(data)
        except StunError:
            self.counters["malformed_stun"] += 1
            return None
        if username is None:
            self.counters["unknown_source"] += 1
            return None
        # RFC 8445 §7.2.2: USERNAME is "<receiver ufrag>:<sender ufrag>"; ours comes first.
        port = self._by_ufrag.get(username.partition(":")[0])
        if port is None:
            self.counters["unknown_ufrag"] += 1
            return None
        # The session's ICE core still checks MESSAGE-INTEGRITY; an address is only cached here
        # for routing, and a forged check cannot make the session answer or send media to it.
        self._by_addr[addr] = port
        port.addresses.add(addr)
        return port

    def _deliver(self, data: bytes, addr: Address) -> None:
        self.counters["received"] += 1
        port = self._route(data, addr)
        if port is None:
            return
        try:
            port.inbox_send.send_nowait((data, addr))
        except trio.WouldBlock:
            # A session that cannot keep up loses its own packets, not everyone's.
            port.dropped_full += 1
            self.counters["inbox_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def run(
        self, *, task_status: trio.TaskStatus[MediaPort] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with bound_udp(self.host, self.requested_port) as raw:
            self.port = raw.getsockname()[1]
            self._sock = raw
            try:
                task_status.started(self)
                while True:
                    await trio.lowlevel.wait_readable(raw)
                    for _ in range(1024):  # bounded, so one flood cannot starve other tasks
                        try:
                            data, addr = raw.recvfrom(MAX_DATAGRAM)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:
                            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                                continue  # ICMP from an earlier send; not ours to act on
                            raise
                        self._deliver(data, (addr[0], addr[1]))
                    await trio.lowlevel.checkpoint()
            finally:
                self._sock = None
