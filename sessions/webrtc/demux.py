"""First-byte demultiplexing of one UDP port (RFC 7983 §7, as updated by RFC 9443).

A WebRTC media port carries STUN, DTLS and SRTP/SRTCP interleaved; the first byte of each
datagram says which. RTP and RTCP share one range and are told apart by the second byte
(RFC 5761 §4). Everything here is a table look-up: safe on any input, never raises.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["PacketKind", "classify", "is_rtcp"]


class PacketKind(enum.Enum):
    """What a datagram's first byte says it is."""

    #: 0..3: STUN (ICE connectivity checks and consent freshness)
    STUN = "stun"
    #: 16..19: ZRTP, which WebRTC does not use; drop
    ZRTP = "zrtp"
    #: 20..63: DTLS records (the handshake that keys SRTP)
    DTLS = "dtls"
    #: 64..79: TURN ChannelData
    TURN_CHANNEL = "turn_channel"
    #: 128..191: RTP or RTCP (SRTP/SRTCP on the wire); split with :func:`is_rtcp`
    RTP_RTCP = "rtp_rtcp"
    #: anything else, including an empty datagram; drop
    UNKNOWN = "unknown"


def _range_kind(first: int) -> PacketKind:
    # RFC 7983 §7 decision tree. RFC 9443 keeps these ranges and lets QUIC use what is left
    # of 64..127 and 192..255; we carry no QUIC on this port, so those bytes are UNKNOWN.
    if first <= 3:
        return PacketKind.STUN
    if 16 <= first <= 19:
        return PacketKind.ZRTP
    if 20 <= first <= 63:
        return PacketKind.DTLS
    if 64 <= first <= 79:
        return PacketKind.TURN_CHANNEL
    if 128 <= first <= 191:
        return PacketKind.RTP_RTCP
    return PacketKind.UNKNOWN


_TABLE: Final = tuple(_range_kind(b) for b in range(256))


def classify(data: bytes) -> PacketKind:
    """Classify a datagram by its first byte; empty input is :attr:`PacketKind.UNKNOWN`."""
    if not data:
        return PacketKind.UNKNOWN
    return _TABLE[data[0]]


def is_rtcp(data: bytes) -> bool:
    """Whether an RTP/RTCP datagram is RTCP (RFC 5761 §4).

    RTCP packet types 192..223 occupy the marker-bit-plus-payload-type byte, where RTP payload
    types 64..95 with the marker set would be; those are therefore never used for RTP. Input
    shorter than two bytes is not RTCP (the RTP parser will reject it).
    """
    return len(data) >= 2 and 192 <= data[1] <= 223
