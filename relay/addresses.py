"""The one address type of a UDP datagram's sender or receiver, for every layer above.

Kept apart from :mod:`relay.udp` (sockets, Trio) so that sans-I/O modules — the tunnel's
framing, the protocol cores — can name addresses without importing any I/O.
"""

from __future__ import annotations

__all__ = ["Address"]

#: (host, port) as the socket API takes it: an IPv4 or IPv6 literal and a port
Address = tuple[str, int]
