"""When a benchmark's client received its packets, by the kernel's clock: what the clients of
ops/bench/sessions.py, migration.py, globe.py and scale.py share.

Linux stamps every datagram a socket receives; ``SIOCGSTAMP`` reads the stamp of the last one
read (on ``CLOCK_REALTIME``; its first call on a socket turns stamping on). A client's own event
loop may take a while to get to a datagram, which is the client's delay, not the server's: the
kernel's stamp leaves it out.
"""

from __future__ import annotations

import contextlib
import fcntl
import struct
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["SPEECH_TEXT", "is_rtp", "kernel_receive_time", "realtime_offset", "stamp_rtp_arrivals"]

#: what the benchmarks' clients say (espeak-ng), a few seconds of speech
SPEECH_TEXT: Final = "one two three four five six seven eight nine ten"

_SIOCGSTAMP: Final = 0x8906  # Linux: the kernel's receive time of the last datagram read
_TIMEVAL: Final = struct.Struct("@ll")


def realtime_offset() -> float:
    """``time.time() - time.monotonic()`` now: takes a kernel stamp to time.monotonic()."""
    return time.time() - time.monotonic()


def start_stamping(fd: int) -> None:
    """Turn the kernel's receive stamps on for socket ``fd`` (the first read of one does)."""
    with contextlib.suppress(OSError):  # ENOENT: nothing received yet, stamping now on
        fcntl.ioctl(fd, _SIOCGSTAMP, bytes(_TIMEVAL.size))


def kernel_receive_time(fd: int, offset: float) -> float:
    """When the kernel received the last datagram read from ``fd``, on time.monotonic()
    (``offset`` from :func:`realtime_offset`); time.monotonic() now if it has no stamp."""
    try:
        sec, usec = _TIMEVAL.unpack(fcntl.ioctl(fd, _SIOCGSTAMP, bytes(_TIMEVAL.size)))
    except OSError:
        return time.monotonic()
    return float(sec + usec / 1e6 - offset)


def is_rtp(data: object) -> bool:
    """SRTP media, not SRTCP, STUN or DTLS (RFC 7983 first byte, RFC 5761 payload types)."""
    return (
        isinstance(data, bytes)
        and len(data) >= 12
        and 128 <= data[0] <= 191
        and not 192 <= data[1] <= 223
    )


def stamp_rtp_arrivals(connection: Any, record: Callable[[float, bytes], None]) -> None:
    """Call ``record(kernel receive time, packet)`` for every SRTP media packet an aiortc peer's
    ICE ``connection`` (aioice's, from ``RTCDtlsTransport.transport._connection``) receives,
    before aiortc sees it. Its sockets exist once the local description is set."""
    offset = realtime_offset()
    for protocol in connection._protocols:
        fd = protocol.transport.get_extra_info("socket").fileno()
        start_stamping(fd)
        original = protocol.datagram_received

        def received(
            data: bytes | str,
            addr: tuple[Any, ...],
            fd: int = fd,
            original: Callable[[bytes | str, tuple[Any, ...]], None] = original,
        ) -> None:
            if isinstance(data, bytes) and is_rtp(data):
                record(kernel_receive_time(fd, offset), data)
            original(data, addr)

        protocol.datagram_received = received
