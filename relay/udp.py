"""UDP as every packet path of Parley uses it: one bound non-blocking socket, drained in batches.

The relay's public port (relay/edge.py), the QUIC tunnel endpoints (relay/tunnel/quic.py) and a
node's own media port (sessions/node/media.py) all read their socket the same way: wait for
readability once, then read without blocking until the socket would block, handing each
datagram to a callback and flushing what the batch queued once at the end. On this machine that
forwards about three times more datagrams per second than awaiting ``recvfrom`` per datagram
(~130k against ~45k packets/s), because a Trio round trip per datagram costs more than the rest.

Sends never wait either: a full buffer drops the datagram, as the network would, and the
protocols above (ICE consent, QUIC recovery, RTP's tolerance of loss) already live with loss.

A tunnel sends runs of equal-sized QUIC packets to one peer; :class:`BatchSender` hands such a
run to the kernel in one ``sendmsg`` with UDP generic segmentation offload (Linux's UDP_SEGMENT,
4.18+), which splits it into the same datagrams on the way out: one system call for up to 64
packets. Python has no ``sendmmsg``/``recvmmsg``, so datagrams to different peers (the relay's
clients) and received datagrams still cost a call each.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, NoReturn, final

import trio

from relay.addresses import Address

__all__ = [
    "BATCH",
    "GSO_MAX_SEGMENTS",
    "MAX_DATAGRAM",
    "Address",
    "BatchSender",
    "bound_udp",
    "drain_forever",
    "kernel_drops",
    "send_nowait",
    "set_receive_buffer",
]

log = logging.getLogger("parley.udp")

#: a UDP peer: (host, port); IPv6 scope and flow information are dropped on receipt

#: the largest client datagram read (media and STUN stay far below a 1500-byte path MTU)
MAX_DATAGRAM: Final = 2048
#: datagrams read per wakeup before other tasks get a turn, so a flood cannot starve them
BATCH: Final = 1024

# Python's socket module does not export it; Linux's value (asm-generic/socket.h).
_SO_RCVBUFFORCE: Final = 33 if sys.platform.startswith("linux") else None

# What a receive may report about an earlier send (an ICMP error, RFC 1122 §4.1.3.3): not this
# datagram's problem, and not ours to act on; the protocols above notice a dead peer themselves.
_ICMP_ERRORS: Final = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


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

    Read it with :func:`drain_forever` and write it with :func:`send_nowait`. The socket is
    closed on the way out.

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


# getsockopt(SO_MEMINFO) returns the socket's sk_meminfo (include/uapi/linux/sock_diag.h): u32
# fields, the ninth (SK_MEMINFO_DROPS, Linux 4.6 and later) the datagrams it dropped.
_SO_MEMINFO: Final = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO_DROPS: Final = struct.Struct("=32xI")


def _socket_drops(sock: socket.socket) -> int | None:
    """The socket's own drop counter, or ``None`` where the kernel does not give it."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, 64)
    except OSError:
        return None
    if len(raw) < _MEMINFO_DROPS.size:
        return None
    (drops,) = _MEMINFO_DROPS.unpack_from(raw)
    return int(drops)


def kernel_drops(*socks: socket.socket | None) -> int:
    """Datagrams the kernel dropped for ``socks`` because their receive buffers were full, all
    together. Linux: each socket's own counter (``SO_MEMINFO``, a constant-time read), else the
    ``drops`` column of /proc/net/udp and udp6, matched by the socket's inode (one pass over
    each table: its length is every UDP socket of the host). 0 for a socket that is None or
    the kernel does not list.
    """
    total = 0
    inodes: set[str] = set()
    for sock in socks:
        if sock is None:
            continue
        own = _socket_drops(sock)
        if own is not None:
            total += own
            continue
        with contextlib.suppress(OSError):
            inodes.add(str(os.fstat(sock.fileno()).st_ino))
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


def send_nowait(sock: socket.socket, data: bytes, addr: Address) -> bool:
    """Send one datagram without waiting; False if it was dropped instead.

    Every failure is loss, as on the network: a full socket buffer (EAGAIN), a full device
    queue (ENOBUFS), an ICMP error about an earlier datagram surfacing here (ECONNREFUSED,
    EHOSTUNREACH), an address the kernel cannot route. The caller counts it.
    """
    try:
        sock.sendto(data, addr)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        log.debug("sendto %s failed: %s", addr, exc)
        return False
    return True


#: most datagrams in one segmented send (the kernel's UDP_MAX_SEGMENTS is 64 before Linux 6.9)
GSO_MAX_SEGMENTS: Final = 64
#: most bytes in one segmented send: one UDP datagram's worth, less the headers
_GSO_MAX_BYTES: Final = 65_000
# linux/udp.h; Python's socket module does not export them.
_SOL_UDP: Final = 17
_UDP_SEGMENT: Final = 103
_SEGMENT: Final = struct.Struct("=H")
_LINUX: Final = sys.platform.startswith("linux")
# What a kernel or device without segmentation offload answers a segmented send with.
_NO_GSO: Final = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


@final
class BatchSender:
    """Sends lists of datagrams on one socket without waiting, a run of equal-sized datagrams
    to one address in one ``sendmsg`` (UDP_SEGMENT) where the kernel allows it.

    A run is consecutive datagrams to the same address, all of the first one's size except
    perhaps a shorter last one (what the kernel requires), at most :data:`GSO_MAX_SEGMENTS` of
    them. If the kernel or the route's device refuses a segmented send, this sender sends
    one datagram per call from then on (``gso`` turns False). Like :func:`send_nowait`, every
    failure is loss.
    """

    __slots__ = ("batches", "gso", "sock")

    def __init__(self, sock: socket.socket, *, gso: bool = _LINUX) -> None:
        self.sock = sock
        #: whether runs go out as one segmented send
        self.gso = gso
        #: segmented sends made (each carrying two datagrams or more)
        self.batches = 0

    def send(self, datagrams: Sequence[tuple[bytes, Address]]) -> tuple[int, int]:
        """Send every datagram, in order; returns (sent, dropped)."""
        count = len(datagrams)
        if count == 1:
            data, addr = datagrams[0]
            return (1, 0) if send_nowait(self.sock, data, addr) else (0, 1)
        if not self.gso:
            sent = sum(send_nowait(self.sock, data, addr) for data, addr in datagrams)
            return sent, count - sent
        sent = 0
        start = 0
        while start < count:
            data, addr = datagrams[start]
            size = len(data)
            end = start + 1
            total = size
            limit = min(count, start + GSO_MAX_SEGMENTS)
            while end < limit:
                following, to = datagrams[end]
                length = len(following)
                if to != addr or length > size or total + length > _GSO_MAX_BYTES:
                    break
                end += 1
                total += length
                if length < size:
                    break  # only the last segment may be shorter
            if end - start == 1:
                sent += send_nowait(self.sock, data, addr)
            else:
                sent += self._segmented([d for d, _ in datagrams[start:end]], size, addr)
            start = end
        return sent, count - sent

    def _segmented(self, run: list[bytes], size: int, addr: Address) -> int:
        try:
            self.sock.sendmsg(run, [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT.pack(size))], 0, addr)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno not in _NO_GSO:
                log.debug("sendmsg %s failed: %s", addr, exc)
                return 0
            # No segmentation offload on this path: send them one by one, now and from now on.
            log.info("UDP segmentation offload refused (%s); sending datagrams one by one", exc)
            self.gso = False
            return sum(send_nowait(self.sock, data, addr) for data in run)
        self.batches += 1
        return len(run)


def _nothing(count: int) -> None:
    """The default batch callback: nothing was queued that needs a flush."""


async def drain_forever(
    sock: socket.socket,
    deliver: Callable[[bytes, Address], None],
    flush: Callable[[int], None] = _nothing,
    *,
    batch: int = BATCH,
    size: int = MAX_DATAGRAM,
) -> NoReturn:
    """Read ``sock`` until cancelled: every datagram to ``deliver(data, (host, port))``.

    Waits for readability once, then reads without blocking until the socket would block or
    ``batch`` datagrams were read, and calls ``flush(count)`` once for that batch (``count``
    datagrams were delivered; possibly 0): whatever the callbacks queued leaves together. A
    datagram longer than ``size`` is truncated by the kernel. ICMP errors about earlier sends
    are skipped; any other receive error is a local fault and propagates.
    """
    receive = sock.recvfrom
    # An IPv4 peer's address already is (host, port); an IPv6 one comes with scope and flow.
    v4 = sock.family == socket.AF_INET
    while True:
        await trio.lowlevel.wait_readable(sock)
        count = 0
        for _ in range(batch):
            try:
                data, addr = receive(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _ICMP_ERRORS:
                    continue
                raise
            count += 1
            deliver(data, addr if v4 else (addr[0], addr[1]))
        flush(count)
        # A full batch means more is waiting: let the other tasks run before reading on.
        await trio.lowlevel.checkpoint()
