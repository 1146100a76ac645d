"""The state of one voice session as a value: what a checkpoint stores and a restore needs.

:meth:`Transceiver.snapshot <sessions.transceiver.Transceiver.snapshot>` returns a
:class:`SessionSnapshot`; :meth:`SessionSnapshot.to_bytes` turns it into the bytes a node
writes to its checkpoint store, and :meth:`SessionSnapshot.from_bytes` turns them back into a
value another node can :meth:`~sessions.transceiver.Transceiver.restore`.

What travels is exactly what the client would notice if it were lost: the ICE credentials and
valid pairs (so its consent checks keep being answered, RFC 7675), the SRTP keys, rollover
counters, replay windows and index reservations (so its SRTP keeps decrypting and none of our
indexes is ever reused, RFC 3711 §9.1), our SSRC, RTP sequence number and timestamp (so it sees
one continuous stream, RFC 3550 §5.1), and the remote DTLS fingerprint. What does not travel is
rebuilt: the DTLS association (its keys are already in the SRTP state, and the client never
renegotiates), the Opus codec state (libopus resynchronizes within a frame), the jitter buffer
and the receiver statistics. Times are ages, as in :class:`~sessions.webrtc.ice.IceState`,
because monotonic clocks of two nodes share no origin.

Two kinds of snapshot. A *checkpoint* is taken while the session goes on: its SRTP state
reserves indexes beyond what was used, and a restore from it (after a crash) starts above the
reservation, so the client sees a jump. An *exact* snapshot (:attr:`SessionSnapshot.exact`) is
taken by :meth:`Transceiver.quiesce <sessions.transceiver.Transceiver.quiesce>` for a planned
move, once the old owner has stopped for good: its sequence number, timestamp and indexes are
exactly the next ones (see :mod:`sessions.transceiver.handover`), and it also carries what is
in flight inside the session — the client's packets not yet played out, our frames not yet
sent, the agent's own state (:data:`MAX_AGENT_STATE` at most) and the turn count — so the next
owner continues where this one stopped. Never store an exact snapshot as a checkpoint as it is:
:meth:`SessionSnapshot.as_checkpoint` makes a checkpoint of it.

The encoding carries the SRTP master keys and the ICE passwords: store it as a secret. The
``repr`` of a snapshot shows neither.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Final, final

import attrs

from sessions.audio.pacer import FRAME_TIMESTAMP
from sessions.webrtc.certs import FINGERPRINT_ALGORITHMS
from sessions.webrtc.ice import IceState, PeerAddress
from sessions.webrtc.srtp import SrtpState

__all__ = [
    "MAX_AGENT_STATE",
    "MAX_PENDING",
    "MAX_PLAYOUT",
    "SNAPSHOT_VERSION",
    "SessionSnapshot",
]

#: Version of :meth:`SessionSnapshot.to_bytes`; :meth:`SessionSnapshot.from_bytes` refuses
#: every other. Version 2: relayed client addresses name their relay in a field of their own,
#: and a snapshot may be exact (a planned move) and carry what is in flight.
SNAPSHOT_VERSION: Final = 3
#: versions we still read (2: without ``taken_at``)
_READABLE: Final = (2, 3)

#: Largest agent state a snapshot carries (the turn-echo agent's queued reply, as Opus, is
#: about 40 KiB for 10 s of speech; its 30 s maximum stays well below this).
MAX_AGENT_STATE: Final = 256 * 1024
#: The client's packets received but not yet played out that a snapshot carries (the jitter
#: buffer holds at most 200 ms of them).
MAX_PLAYOUT: Final = 16
#: Our 20 ms frames queued for sending that a snapshot carries (the voice loop keeps 40 ms).
MAX_PENDING: Final = 4

_MAGIC: Final = b"PLSS"
# magic, version (1), header length (4); then the JSON header, SRTP length (2), SRTP state,
# agent state length (4), agent state, pending frame count (1), pending frames (PCM).
_PREFIX: Final = struct.Struct("!4sBI")
_SRTP_LENGTH: Final = struct.Struct("!H")
_AGENT_LENGTH: Final = struct.Struct("!I")
_PENDING_COUNT: Final = struct.Struct("!B")
_FRAME_BYTES: Final = 2 * FRAME_TIMESTAMP  # 20 ms of 48 kHz mono int16
_MAX_HEADER: Final = 64 * 1024
_MAX_PAYLOAD: Final = 1500  # an RTP payload fits a datagram
_MAX_PLAYOUT_AGE: Final = 10.0  # seconds; a packet waits for playout 200 ms at most
_MAX_TURN_AGE: Final = 3600.0  # seconds; a turn is cut at 30 s
_MAX_SESSION_ID: Final = 256
_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 8122 §5 fingerprint: upper-case hex pairs joined by ':' (as the SDP parser leaves it).
_FINGERPRINT_RE: Final = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2})*", re.ASCII)
# SDP token characters (RFC 8866 §9), what our CNAME is made of.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]{1,64}", re.ASCII)
_HEADER_KEYS: Final = frozenset(
    {
        "session_id",
        "age",
        "ice",
        "remote_fingerprint",
        "next_seq",
        "next_timestamp",
        "opus_pt",
        "cname",
        "direction",
        "packets_sent",
        "octets_sent",
        "exact",
        "turns",
        "open_turn",
        "playout",
    }
)
_ADDRESS_KEYS: Final = frozenset({"host", "port", "relay"})
_MAX_HOST: Final = 64  # the longest IPv6 literal with a zone is well below
_MAX_RELAY: Final = 256
_ICE_KEYS: Final = frozenset(
    {"local_ufrag", "local_pwd", "remote_ufrag", "remote_pwd", "pairs", "selected", "expired"}
)


def _is_int(value: object) -> bool:
    # bool is an int subclass, and JSON true must not pass for 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(low: int, high: int) -> Any:
    def check(_: object, attribute: attrs.Attribute[int], value: object) -> None:
        # bool is an int subclass, and JSON true must not pass for 1.
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"{attribute.name} must be an integer in {low}..{high}")

    return check


def _check_session_id(_: object, __: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_SESSION_ID:
        raise ValueError(f"session_id must be a string of 1..{_MAX_SESSION_ID} characters")


def _check_age(_: object, __: attrs.Attribute[float], value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("age must be a number of seconds")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("age must be a finite number of seconds >= 0")


def _to_fingerprint(value: Any) -> tuple[str, str]:
    algorithm, digest = value
    return algorithm, digest


def _check_fingerprint(
    _: object, __: attrs.Attribute[tuple[str, str]], value: tuple[str, str]
) -> None:
    algorithm, digest = value
    if not isinstance(algorithm, str) or algorithm not in FINGERPRINT_ALGORITHMS:
        raise ValueError("remote_fingerprint names an unsupported hash function")
    if not isinstance(digest, str) or not _FINGERPRINT_RE.fullmatch(digest):
        raise ValueError("remote_fingerprint is not upper-case colon-separated hex")


def _check_cname(_: object, __: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise ValueError("cname must be 1-64 SDP token characters")


def _check_agent_state(_: object, __: attrs.Attribute[bytes], value: object) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_AGENT_STATE:
        raise ValueError(f"agent_state must be at most {MAX_AGENT_STATE} bytes")


def _check_playout(
    _: object, __: attrs.Attribute[tuple[tuple[int, int, bytes, float], ...]], value: object
) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_PLAYOUT:
        raise ValueError(f"playout holds at most {MAX_PLAYOUT} packets")
    for packet in value:
        if not (
            isinstance(packet, tuple)
            and len(packet) == 4
            and _is_int(packet[0])
            and 0 <= packet[0] <= 0xFFFF
            and _is_int(packet[1])
            and 0 <= packet[1] <= 0xFFFF_FFFF
            and isinstance(packet[2], bytes)
            and 1 <= len(packet[2]) <= _MAX_PAYLOAD
            and isinstance(packet[3], float)
            and 0.0 <= packet[3] <= _MAX_PLAYOUT_AGE
        ):
            raise ValueError("playout holds (sequence number, timestamp, payload, age) packets")


def _check_open_turn(_: object, __: attrs.Attribute[float | None], value: object) -> None:
    if value is not None and not (
        isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= _MAX_TURN_AGE
    ):
        raise ValueError("open_turn is the age of a turn's start, in seconds")


def _check_taken_at(_: object, __: attrs.Attribute[float], value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"bad snapshot time {value!r}")


def _check_pending(_: object, __: attrs.Attribute[tuple[bytes, ...]], value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_PENDING:
        raise ValueError(f"pending holds at most {MAX_PENDING} frames")
    if not all(isinstance(frame, bytes) and len(frame) == _FRAME_BYTES for frame in value):
        raise ValueError(f"a pending frame is {_FRAME_BYTES} bytes of PCM")


def _check_instance(kind: type) -> Any:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, kind):
            raise ValueError(f"{attribute.name} must be a {kind.__name__}")

    return check


@final
@attrs.frozen
class SessionSnapshot:
    """Everything needed to continue one connected voice session elsewhere.

    Build one with :meth:`Transceiver.snapshot <sessions.transceiver.Transceiver.snapshot>`;
    the fields are validated on construction (:class:`ValueError`). The client's address is
    the selected ICE pair (:attr:`client_addr`); our SSRC and the client's are those of the
    SRTP state (:attr:`local_ssrc`, :attr:`remote_ssrc`).
    """

    session_id: str = attrs.field(validator=_check_session_id)
    #: seconds from the session's creation (its offer being accepted) to the snapshot
    age: float = attrs.field(validator=_check_age)
    ice: IceState = attrs.field(validator=_check_instance(IceState))
    #: the offer's ``a=fingerprint`` as ``(hash name, "AB:CD:...")`` (RFC 8122 §5)
    remote_fingerprint: tuple[str, str] = attrs.field(
        converter=_to_fingerprint, validator=_check_fingerprint
    )
    srtp: SrtpState = attrs.field(validator=_check_instance(SrtpState))
    #: RTP sequence number our next packet would have carried (RFC 3550 §5.1)
    next_seq: int = attrs.field(validator=_int_in(0, 0xFFFF))
    #: RTP timestamp of our media clock at the snapshot (48 kHz, RFC 7587 §4.1)
    next_timestamp: int = attrs.field(validator=_int_in(0, 0xFFFF_FFFF))
    #: the offer's Opus payload type, which both directions use
    opus_pt: int = attrs.field(validator=_int_in(0, 127))
    #: our RTCP CNAME (RFC 3550 §6.5.1), as announced in the answer's ``a=ssrc`` line
    cname: str = attrs.field(validator=_check_cname)
    #: the offer's direction of the audio section (RFC 8866 §6.7)
    direction: str = attrs.field(validator=attrs.validators.in_(_DIRECTIONS))
    #: RTP packets and payload octets sent so far, for the SR sender info (RFC 3550 §6.4.1)
    packets_sent: int = attrs.field(validator=_int_in(0, 2**63))
    octets_sent: int = attrs.field(validator=_int_in(0, 2**63))
    #: opaque state of the agent (the echo agent keeps none); only an exact snapshot has one
    agent_state: bytes = attrs.field(default=b"", validator=_check_agent_state, repr=False)
    #: taken by a quiesce for a planned move: its sequence number, timestamp and SRTP indexes
    #: are exactly the next ones, and a restore continues with no jump (see the module
    #: docstring); a checkpoint is not exact
    exact: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: user turns so far: the next owner's turns are numbered on from here
    turns: int = attrs.field(default=0, validator=_int_in(0, 2**31))
    #: seconds since the first voiced frame of the user's turn still open (number ``turns``)
    #: at the quiesce; the next owner continues that turn
    open_turn: float | None = attrs.field(default=None, validator=_check_open_turn)
    #: the client's RTP received but not yet played out: (sequence number, timestamp, Opus
    #: payload, seconds since it arrived), oldest first
    playout: tuple[tuple[int, int, bytes, float], ...] = attrs.field(
        default=(), validator=_check_playout, repr=False
    )
    #: our 20 ms PCM frames queued for sending, next first
    pending: tuple[bytes, ...] = attrs.field(default=(), validator=_check_pending, repr=False)
    #: wall-clock time (``time.time()``) the snapshot was taken, stamped by whoever runs the
    #: session (the core has no wall clock); 0: unknown. A crash restore moves the RTP
    #: timestamp on by the time since, so that the stream keeps pace with real time
    taken_at: float = attrs.field(default=0.0, validator=_check_taken_at)

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our outbound RTP stream."""
        return self.srtp.local_ssrc

    @property
    def remote_ssrc(self) -> int | None:
        """The client's RTP SSRC, once its first authentic packet was received."""
        return self.srtp.remote_ssrc

    @property
    def client_addr(self) -> PeerAddress | None:
        """Where the client is: the address of the nominated ICE pair, if any."""
        return self.ice.selected

    def as_checkpoint(self) -> SessionSnapshot:
        """This snapshot as a checkpoint: not exact, nothing in flight. A restore from it
        starts above its SRTP reservation, which is what a crash restore must do: whoever
        continued from the exact snapshot may have sent within it."""
        return attrs.evolve(
            self, exact=False, turns=0, open_turn=None, playout=(), pending=(), agent_state=b""
        )

    # --- encoding -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A versioned encoding: magic ``PLSS``, version, JSON header, binary SRTP state.

        It holds key material (see the module docstring).
        """
        ice = self.ice
        header = {
            "session_id": self.session_id,
            "age": self.age,
            "taken_at": self.taken_at,
            "ice": {
                "local_ufrag": ice.local_ufrag,
                "local_pwd": ice.local_pwd,
                "remote_ufrag": ice.remote_ufrag,
                "remote_pwd": ice.remote_pwd,
                "pairs": [[_address_json(addr), age] for addr, age in ice.pairs],
                "selected": None if ice.selected is None else _address_json(ice.selected),
                "expired": ice.expired,
            },
            "remote_fingerprint": list(self.remote_fingerprint),
            "next_seq": self.next_seq,
            "next_timestamp": self.next_timestamp,
            "opus_pt": self.opus_pt,
            "cname": self.cname,
            "direction": self.direction,
            "packets_sent": self.packets_sent,
            "octets_sent": self.octets_sent,
            "exact": self.exact,
            "turns": self.turns,
            "open_turn": self.open_turn,
            "playout": [[seq, ts, payload.hex(), age] for seq, ts, payload, age in self.playout],
        }
        text = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False)
        encoded = text.encode("utf-8")
        srtp = self.srtp.to_bytes()
        return b"".join(
            (
                _PREFIX.pack(_MAGIC, SNAPSHOT_VERSION, len(encoded)),
                encoded,
                _SRTP_LENGTH.pack(len(srtp)),
                srtp,
                _AGENT_LENGTH.pack(len(self.agent_state)),
                self.agent_state,
                _PENDING_COUNT.pack(len(self.pending)),
                *self.pending,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SessionSnapshot:
        """Decode :meth:`to_bytes` output; anything else raises :class:`ValueError`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("a session snapshot is bytes")
        raw = bytes(data)
        if len(raw) < _PREFIX.size:
            raise ValueError("truncated session snapshot")
        magic, version, header_length = _PREFIX.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError("not a session snapshot (bad magic)")
        if version not in _READABLE:
            raise ValueError(f"unsupported session snapshot version {version}")
        if header_length > _MAX_HEADER:
            raise ValueError("session snapshot header too long")
        offset = _PREFIX.size
        header_bytes = raw[offset : offset + header_length]
        offset += header_length
        if len(header_bytes) != header_length or len(raw) < offset + _SRTP_LENGTH.size:
            raise ValueError("truncated session snapshot")
        (srtp_length,) = _SRTP_LENGTH.unpack_from(raw, offset)
        offset += _SRTP_LENGTH.size
        srtp_bytes = raw[offset : offset + srtp_length]
        offset += srtp_length
        if len(srtp_bytes) != srtp_length or len(raw) < offset + _AGENT_LENGTH.size:
            raise ValueError("truncated session snapshot")
        (agent_length,) = _AGENT_LENGTH.unpack_from(raw, offset)
        offset += _AGENT_LENGTH.size
        if agent_length > MAX_AGENT_STATE:
            raise ValueError("session snapshot agent state too long")
        agent_state = raw[offset : offset + agent_length]
        offset += agent_length
        if len(agent_state) != agent_length or len(raw) < offset + _PENDING_COUNT.size:
            raise ValueError("truncated session snapshot")
        (pending_count,) = _PENDING_COUNT.unpack_from(raw, offset)
        offset += _PENDING_COUNT.size
        if pending_count > MAX_PENDING or len(raw) != offset + pending_count * _FRAME_BYTES:
            raise ValueError("session snapshot length mismatch")
        pending = tuple(raw[at : at + _FRAME_BYTES] for at in range(offset, len(raw), _FRAME_BYTES))
        try:
            srtp = SrtpState.from_bytes(srtp_bytes)
            header = json.loads(header_bytes.decode("utf-8"), parse_constant=_no_constant)
            return cls._from_header(header, srtp, agent_state, pending, version)
        except ValueError:
            raise
        except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed session snapshot: {exc}") from None

    @classmethod
    def _from_header(
        cls,
        header: Any,
        srtp: SrtpState,
        agent_state: bytes,
        pending: tuple[bytes, ...],
        version: int,
    ) -> SessionSnapshot:
        expected = _HEADER_KEYS | {"taken_at"} if version >= 3 else _HEADER_KEYS
        if not isinstance(header, dict) or set(header) != expected:
            raise ValueError("session snapshot header has the wrong fields")
        ice = header["ice"]
        if not isinstance(ice, dict) or set(ice) != _ICE_KEYS:
            raise ValueError("session snapshot ICE state has the wrong fields")
        if not isinstance(ice["expired"], bool) or not isinstance(ice["pairs"], list):
            raise ValueError("malformed ICE state in session snapshot")
        for key in ("local_ufrag", "local_pwd", "remote_ufrag", "remote_pwd"):
            if not isinstance(ice[key], str):
                raise ValueError("malformed ICE credentials in session snapshot")
        pairs = []
        for pair in ice["pairs"]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("malformed ICE pair in session snapshot")
            if not isinstance(pair[1], int | float) or isinstance(pair[1], bool):
                raise ValueError("malformed ICE pair age in session snapshot")
            pairs.append((_address(pair[0]), float(pair[1])))
        selected = ice["selected"]
        ice_state = IceState(
            local_ufrag=ice["local_ufrag"],
            local_pwd=ice["local_pwd"],
            remote_ufrag=ice["remote_ufrag"],
            remote_pwd=ice["remote_pwd"],
            pairs=tuple(pairs),
            selected=None if selected is None else _address(selected),
            expired=ice["expired"],
        )
        fingerprint = header["remote_fingerprint"]
        if not isinstance(fingerprint, list) or len(fingerprint) != 2:
            raise ValueError("malformed remote fingerprint in session snapshot")
        if not isinstance(header["exact"], bool):
            raise ValueError("malformed exact flag in session snapshot")
        open_turn = header["open_turn"]
        if open_turn is not None:
            if not isinstance(open_turn, int | float) or isinstance(open_turn, bool):
                raise ValueError("malformed open turn in session snapshot")
            open_turn = float(open_turn)
        return cls(
            session_id=header["session_id"],
            age=header["age"],
            ice=ice_state,
            remote_fingerprint=(fingerprint[0], fingerprint[1]),
            srtp=srtp,
            next_seq=header["next_seq"],
            next_timestamp=header["next_timestamp"],
            opus_pt=header["opus_pt"],
            cname=header["cname"],
            direction=header["direction"],
            packets_sent=header["packets_sent"],
            octets_sent=header["octets_sent"],
            agent_state=agent_state,
            exact=header["exact"],
            turns=header["turns"],
            open_turn=open_turn,
            playout=_playout(header["playout"]),
            pending=pending,
            taken_at=header.get("taken_at", 0.0),
        )


def _playout(value: object) -> tuple[tuple[int, int, bytes, float], ...]:
    if not isinstance(value, list) or len(value) > MAX_PLAYOUT:
        raise ValueError("malformed playout in session snapshot")
    packets = []
    for packet in value:
        if (
            not isinstance(packet, list)
            or len(packet) != 4
            or not isinstance(packet[2], str)
            or not isinstance(packet[3], int | float)
            or isinstance(packet[3], bool)
        ):
            raise ValueError("malformed playout packet in session snapshot")
        packets.append((packet[0], packet[1], bytes.fromhex(packet[2]), float(packet[3])))
    return tuple(packets)


def _address_json(addr: PeerAddress) -> dict[str, object]:
    # The relay is a field of its own: "" for a client that reached the node directly.
    return {"host": addr.host, "port": addr.port, "relay": addr.relay}


def _address(value: object) -> PeerAddress:
    if (
        not isinstance(value, dict)
        or set(value) != _ADDRESS_KEYS
        or not isinstance(value["host"], str)
        or not 1 <= len(value["host"]) <= _MAX_HOST
        or not _is_int(value["port"])
        or not 0 <= value["port"] <= 65535
        or not isinstance(value["relay"], str)
        or len(value["relay"]) > _MAX_RELAY
    ):
        raise ValueError("malformed address in session snapshot")
    return PeerAddress(value["host"], value["port"], value["relay"])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number in a session snapshot")
