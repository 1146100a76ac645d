"""DTLS record framing (RFC 6347 §4.1): checking what a peer sent is whole records, and cutting
what OpenSSL wrote into datagrams of whole records."""

from __future__ import annotations

import struct
from typing import Final

from sessions.webrtc.errors import RemoteInputError

__all__ = ["DtlsError", "check_datagram", "pack"]


# RFC 6347 §4.1: type(1) version(2) epoch(2) sequence_number(6) length(2).
_RECORD_HEADER: Final = struct.Struct("!BBBHHIH")
_HEADER_LENGTH: Final = 13
# RFC 6347 §4.1 keeps TLS's content types: change_cipher_spec, alert, handshake,
# application_data (RFC 5246 §6.2.1). Heartbeat (24) is not negotiated by us.
_CONTENT_TYPES: Final = frozenset({20, 21, 22, 23})
# RFC 6347 §4.1: DTLS versions are the one's complement of TLS ones, so always 0xFE.. .
_VERSION_MAJOR: Final = 0xFE
# RFC 5246 §6.2.3 (kept by RFC 6347 §4.1): TLSCiphertext.length <= 2^14 + 2048.
_MAX_RECORD_LENGTH: Final = 2**14 + 2048
# Datagrams longer than this are refused unread; OpenSSL's DTLS read buffer takes one whole
# datagram at a time and a WebRTC peer never sends more than ~1500 bytes.
_MAX_DATAGRAM: Final = 2**14


class DtlsError(RemoteInputError):
    """A datagram was not a well-formed sequence of DTLS records; it was dropped unread."""


def check_datagram(data: bytes) -> None:
    """Refuse anything that is not one or more whole DTLS 1.x records (RFC 6347 §4.1)."""
    if not data:
        raise DtlsError("empty datagram")
    if len(data) > _MAX_DATAGRAM:
        raise DtlsError(f"datagram of {len(data)} bytes is too long")
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER_LENGTH:
            raise DtlsError("truncated DTLS record header")
        content_type, major, _minor, _epoch, _seq_hi, _seq_lo, length = _RECORD_HEADER.unpack_from(
            data, offset
        )
        if content_type not in _CONTENT_TYPES:
            raise DtlsError(f"unknown DTLS content type {content_type}")
        if major != _VERSION_MAJOR:
            raise DtlsError("not a DTLS record version")
        if length > _MAX_RECORD_LENGTH:
            raise DtlsError(f"DTLS record length {length} exceeds 2^14 + 2048")
        offset += _HEADER_LENGTH + length
        if offset > len(data):
            raise DtlsError("truncated DTLS record")


def pack(stream: bytes, mtu: int) -> list[bytes]:
    """Cut OpenSSL's output into datagrams of whole records, each at most ``mtu`` if the
    records allow (OpenSSL sizes them to the MTU we set)."""
    records: list[bytes] = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < _HEADER_LENGTH:
            records.append(stream[offset:])  # cannot happen with OpenSSL; keep the bytes
            break
        (length,) = struct.unpack_from("!H", stream, offset + 11)
        end = min(offset + _HEADER_LENGTH + length, len(stream))
        records.append(stream[offset:end])
        offset = end
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams
