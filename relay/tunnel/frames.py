"""The tunnel's media framing, shared by relays and nodes.

Every client datagram crosses a relay↔node QUIC tunnel as one QUIC DATAGRAM frame (RFC 9221),
unreliable like the UDP it carries, with a compact header in front of the client's bytes::

    relay → node  (FROM_CLIENT)           node → relay  (TO_CLIENT)
    +------+-------+                      +------+-------+----------------+
    | 0x01 | flags |                      | 0x02 | flags | epoch (u64 BE) |
    +------+-------+------------+         +------+-------+--+-------------+
    | client address (4 or 16) | port |   | client address (4 or 16) | port |
    +--------+--------------------+       +--------+--------------------+
    | id len | session id (ASCII) |       | id len | session id (ASCII) |
    +--------+--------------------+       +--------+--------------------+
    | the client's UDP payload    |       | the payload for the client  |

* ``flags`` bit 0: the address is IPv6 (16 bytes), else IPv4 (4 bytes). Other bits are zero.
* The session id travels in every frame so that a node that just took a session over (a drain,
  a failover) can route its first packet, which need not be STUN, without any lookup.
* ``epoch`` is the sender's ownership epoch of the session (storage/ownership.py): the relay
  drops a frame whose epoch is stale — fencing a node that lost the session (relay/routes.py).

A third kind goes node → relay when a session has just moved to another node (a planned move,
storage/moves.py) and a client's datagram still reached the old owner::

    +------+-------+----------------+--------+-------------------+
    | 0x03 | flags | epoch (u64 BE) | to len | to node id (ASCII) |   HAND_ON
    +------+-------+----------------+--------+-------------------+
    | client address (4 or 16) | port | id len | session id | the client's payload |

The relay hands the client's bytes on to node ``to``, whose ownership ``epoch`` they carry
(the new owner's), as if they had just arrived: nothing a client sent during a move is lost.

With a 20-character session id the header costs 30 bytes over IPv4, 42 over IPv6. Decoding never
raises anything but :class:`FrameError` for remote input.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import Final, final

import attrs

from relay.addresses import Address

__all__ = [
    "FROM_CLIENT",
    "HAND_ON",
    "TO_CLIENT",
    "FrameError",
    "FromClient",
    "FromClientReader",
    "HandOn",
    "ToClient",
    "ToClientReader",
    "client_header",
    "decode",
    "encode_from_client",
    "encode_hand_on",
    "encode_to_client",
]

FROM_CLIENT: Final = 0x01
TO_CLIENT: Final = 0x02
HAND_ON: Final = 0x03
_IPV6: Final = 0x01
_EPOCH = struct.Struct("!Q")
_PORT = struct.Struct("!H")
MAX_SESSION_ID: Final = 255


class FrameError(ValueError):
    """A tunnel frame that cannot be decoded (remote input: count it and drop it)."""


@final
@attrs.frozen
class FromClient:
    """A client's datagram, as the relay forwards it to the session's node."""

    session: str
    client: Address
    payload: bytes


@final
@attrs.frozen
class ToClient:
    """A node's datagram for a client, stamped with the node's ownership epoch."""

    session: str
    epoch: int
    client: Address
    payload: bytes


@final
@attrs.frozen
class HandOn:
    """A client's datagram that reached a session's previous owner: for node ``to``."""

    session: str
    epoch: int
    to: str
    client: Address
    payload: bytes


# A node frames every datagram for a client with that client's address: parsing the text form
# each time was 2 % of a busy node's GIL time. The same few thousand addresses recur.
@functools.lru_cache(maxsize=4096)
def _address(host: str, port: int) -> tuple[int, bytes]:
    packed = ipaddress.ip_address(host).packed
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return (_IPV6 if len(packed) == 16 else 0), packed + _PORT.pack(port)


def _session(session: str) -> bytes:
    raw = session.encode("ascii")
    if not 0 < len(raw) <= MAX_SESSION_ID:
        raise ValueError(f"session id must be 1..{MAX_SESSION_ID} ASCII characters")
    return bytes((len(raw),)) + raw


def client_header(session: str, client: Address) -> bytes:
    """Everything of a FROM_CLIENT frame before the payload: the same for every datagram of one
    client address in one session, so the relay frames one once and prepends it after that."""
    flags, address = _address(*client)
    return b"".join((bytes((FROM_CLIENT, flags)), address, _session(session)))


def encode_from_client(session: str, client: Address, payload: bytes) -> bytes:
    """Frame a client's datagram for the tunnel (relay side)."""
    return client_header(session, client) + payload


def encode_to_client(session: str, epoch: int, client: Address, payload: bytes) -> bytes:
    """Frame a datagram for a client (node side), stamped with ``epoch``."""
    return _to_client_header(session, epoch, client) + payload


# The same for every datagram of a session to one client address at one epoch: a node frames
# 50 a second per session, so it builds each header once (bounded: old ones fall out).
@functools.lru_cache(maxsize=4096)
def _to_client_header(session: str, epoch: int, client: Address) -> bytes:
    flags, address = _address(*client)
    return b"".join((bytes((TO_CLIENT, flags)), _EPOCH.pack(epoch), address, _session(session)))


def encode_hand_on(session: str, epoch: int, to: str, client: Address, payload: bytes) -> bytes:
    """Frame a client's datagram that reached us after ``session`` moved to node ``to``."""
    flags, address = _address(*client)
    return b"".join(
        (
            bytes((HAND_ON, flags)),
            _EPOCH.pack(epoch),
            _session(to),  # a node id: the same length-prefixed ASCII as a session id
            address,
            _session(session),
            payload,
        )
    )


def decode(frame: bytes) -> FromClient | ToClient | HandOn:
    """Decode one frame; raises :class:`FrameError` for anything malformed."""
    if len(frame) < 2:
        raise FrameError("frame shorter than its type and flags")
    kind, flags = frame[0], frame[1]
    if flags & ~_IPV6:
        raise FrameError(f"unknown flags {flags:#x}")
    at = 2
    epoch = 0
    to = ""
    if kind in (TO_CLIENT, HAND_ON):
        if len(frame) < at + 8:
            raise FrameError("frame too short for its epoch")
        (epoch,) = _EPOCH.unpack_from(frame, at)
        at += 8
        if kind == HAND_ON:
            if len(frame) < at + 1 or frame[at] == 0 or len(frame) < at + 1 + frame[at]:
                raise FrameError("frame too short for its node id")
            try:
                to = frame[at + 1 : at + 1 + frame[at]].decode("ascii")
            except UnicodeDecodeError:
                raise FrameError("node id is not ASCII") from None
            at += 1 + frame[at]
    elif kind != FROM_CLIENT:
        raise FrameError(f"unknown frame type {kind:#x}")
    size = 16 if flags & _IPV6 else 4
    if len(frame) < at + size + 3:
        raise FrameError("frame too short for its address")
    raw = frame[at : at + size]
    host = str(ipaddress.IPv6Address(raw)) if size == 16 else ".".join(map(str, raw))
    at += size
    (port,) = _PORT.unpack_from(frame, at)
    at += 2
    length = frame[at]
    at += 1
    if length == 0 or len(frame) < at + length:
        raise FrameError("frame too short for its session id")
    try:
        session = frame[at : at + length].decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("session id is not ASCII") from None
    payload = frame[at + length :]
    if kind == TO_CLIENT:
        return ToClient(session, epoch, (host, port), payload)
    if kind == HAND_ON:
        return HandOn(session, epoch, to, (host, port), payload)
    return FromClient(session, (host, port), payload)


class _HeaderMemory:
    """What :class:`ToClientReader` and :class:`FromClientReader` share: the header bytes of
    the frames read so far (the client's address and port, the session id), one map per
    address size, mapped to ``(session, client)``; at most ``limit`` per map, past that the
    memory starts over."""

    __slots__ = ("_known", "limit")

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        # (address + port + session id) bytes -> (session, client), one map per address size
        self._known: tuple[dict[bytes, tuple[str, Address]], dict[bytes, tuple[str, Address]]] = (
            {},
            {},
        )

    def _recall(self, frame: bytes, start: int) -> tuple[tuple[str, Address] | None, int]:
        """The remembered fields of a frame whose address starts at ``start`` (its flags are
        valid), and where its payload starts; None (and 0 if the frame is too short for its
        header) when they are not remembered: decode it, then :meth:`_remember` them."""
        at = start + (16 if frame[1] else 4) + 2  # the address and the port
        end = at + 1 + frame[at] if len(frame) > at else 0
        if not end or not frame[at] or len(frame) < end:
            return None, 0
        return self._known[frame[1]].get(frame[start:end]), end

    def _remember(self, frame: bytes, start: int, fields: tuple[str, Address]) -> None:
        """Remember the fields of a frame :func:`decode` accepted."""
        known = self._known[frame[1]]
        if len(known) >= self.limit:
            known.clear()
        end = start + (16 if frame[1] else 4) + 2
        known[frame[start : end + 1 + frame[end]]] = fields


@final
class ToClientReader(_HeaderMemory):
    """Reads TO_CLIENT frames as :func:`decode` does, remembering each client and session.

    A relay receives every media frame for a client with the same address and session bytes;
    decoding them into text and a tuple once per client, not once per frame, is most of what
    reading a frame costs. Whatever :meth:`read` accepts, :func:`decode` accepts with the same
    fields (a header is only remembered after :func:`decode` has read it), and it raises
    :class:`FrameError` for the same frames. At most ``limit`` headers are remembered per
    address size; past that the memory starts over.
    """

    __slots__ = ()

    def read(self, frame: bytes) -> tuple[str, int, Address, bytes] | None:
        """``(session, epoch, client, payload)`` of a TO_CLIENT frame. None for anything that
        does not start as one: read that with :func:`decode` (which may raise). Raises
        :class:`FrameError` for a malformed TO_CLIENT frame."""
        if len(frame) < 2 or frame[0] != TO_CLIENT or frame[1] > _IPV6:
            return None
        fields, end = self._recall(frame, 10)  # after type, flags and epoch
        if fields is None:
            decoded = decode(frame)  # raises FrameError for anything malformed
            assert isinstance(decoded, ToClient)
            self._remember(frame, 10, (decoded.session, decoded.client))
            return decoded.session, decoded.epoch, decoded.client, decoded.payload
        (epoch,) = _EPOCH.unpack_from(frame, 2)
        return fields[0], epoch, fields[1], frame[end:]


@final
class FromClientReader(_HeaderMemory):
    """Reads FROM_CLIENT frames as :func:`decode` does, remembering each client and session:
    the node's side of :class:`ToClientReader` (a node receives every datagram of a client
    with the same header). Whatever :meth:`read` accepts, :func:`decode` accepts with the
    same fields, and it raises :class:`FrameError` for the same frames.
    """

    __slots__ = ()

    def read(self, frame: bytes) -> tuple[str, Address, bytes] | None:
        """``(session, client, payload)`` of a FROM_CLIENT frame. None for anything that does
        not start as one: read that with :func:`decode` (which may raise). Raises
        :class:`FrameError` for a malformed FROM_CLIENT frame."""
        if len(frame) < 2 or frame[0] != FROM_CLIENT or frame[1] > _IPV6:
            return None
        fields, end = self._recall(frame, 2)  # after type and flags
        if fields is None:
            decoded = decode(frame)  # raises FrameError for anything malformed
            assert isinstance(decoded, FromClient)
            self._remember(frame, 2, (decoded.session, decoded.client))
            return decoded.session, decoded.client, decoded.payload
        return fields[0], fields[1], frame[end:]
