"""The one address type of a UDP datagram's sender or receiver, for every layer above.

Kept apart from :mod:`relay.udp` (sockets, Trio) so that sans-I/O modules — the tunnel's
framing, the protocol cores — can name addresses without importing any I/O.
"""

from __future__ import annotations

import ipaddress

__all__ = ["Address", "parse_listen"]

#: (host, port) as the socket API takes it: an IPv4 or IPv6 literal and a port
Address = tuple[str, int]


def parse_listen(text: str, setting: str) -> Address:
    """``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``) as an address; ValueError naming ``setting``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"{setting}: {text!r} is not IP:PORT (IPv6 as [ADDR]:PORT)") from None
    if not sep or not 0 <= number <= 0xFFFF:
        raise ValueError(f"{setting}: {text!r} is not IP:PORT with a port of 0 to 65535")
    return host, number
