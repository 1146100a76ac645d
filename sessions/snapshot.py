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

from sessions.webrtc.certs import FINGERPRINT_ALGORITHMS
from sessions.webrtc.ice import Address, IceState
from sessions.webrtc.srtp import SrtpState

__all__ = ["SNAPSHOT_VERSION", "SessionSnapshot"]

#: Version of :meth:`SessionSnapshot.to_bytes`; :meth:`SessionSnapshot.from_bytes` refuses
#: every other.
SNAPSHOT_VERSION: Final = 1

_MAGIC: Final = b"PLSS"
# magic, version (1), header length (4); then the JSON header, SRTP length (2), SRTP state.
_PREFIX: Final = struct.Struct("!4sBI")
_SRTP_LENGTH: Final = struct.Struct("!H")
_MAX_HEADER: Final = 64 * 1024
_MAX_AGENT_STATE: Final = 32 * 1024
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
        "agent_state",
    }
)
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
    if not isinstance(value, bytes) or len(value) > _MAX_AGENT_STATE:
        raise ValueError(f"agent_state must be at most {_MAX_AGENT_STATE} bytes")


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
    #: opaque state of the agent (the echo agent keeps none)
    agent_state: bytes = attrs.field(default=b"", validator=_check_agent_state, repr=False)

    @property
    def local_ssrc(self) -> int:
        """The SSRC of our outbound RTP stream."""
        return self.srtp.local_ssrc

    @property
    def remote_ssrc(self) -> int | None:
        """The client's RTP SSRC, once its first authentic packet was received."""
        return self.srtp.remote_ssrc

    @property
    def client_addr(self) -> Address | None:
        """Where the client is: the address of the nominated ICE pair, if any."""
        return self.ice.selected

    # --- encoding -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A versioned encoding: magic ``PLSS``, version, JSON header, binary SRTP state.

        It holds key material (see the module docstring).
        """
        ice = self.ice
        header = {
            "session_id": self.session_id,
            "age": self.age,
            "ice": {
                "local_ufrag": ice.local_ufrag,
                "local_pwd": ice.local_pwd,
                "remote_ufrag": ice.remote_ufrag,
                "remote_pwd": ice.remote_pwd,
                "pairs": [[[host, port], age] for (host, port), age in ice.pairs],
                "selected": None if ice.selected is None else list(ice.selected),
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
            "agent_state": self.agent_state.hex(),
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
        if version != SNAPSHOT_VERSION:
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
        if len(raw) != offset + srtp_length:
            raise ValueError("session snapshot length mismatch")
        try:
            srtp = SrtpState.from_bytes(raw[offset:])
            header = json.loads(header_bytes.decode("utf-8"), parse_constant=_no_constant)
            return cls._from_header(header, srtp)
        except ValueError:
            raise
        except (TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed session snapshot: {exc}") from None

    @classmethod
    def _from_header(cls, header: Any, srtp: SrtpState) -> SessionSnapshot:
        if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
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
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], list):
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
        agent_state = header["agent_state"]
        if not isinstance(agent_state, str):
            raise ValueError("malformed agent state in session snapshot")
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
            agent_state=bytes.fromhex(agent_state),
        )


def _address(value: object) -> Address:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not _is_int(value[1])
        or not 0 <= value[1] <= 65535
    ):
        raise ValueError("malformed address in session snapshot")
    return value[0], value[1]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number in a session snapshot")
