"""What an ICE session is, as values: its credentials (RFC 8445 §5.3, RFC 8839 §5.4), the
:class:`PeerAddress` a client's datagrams come from, and the :class:`IceState` a responder
carries to another node (see :meth:`~sessions.webrtc.ice.IceLiteResponder.restore`)."""

from __future__ import annotations

import math
import random
import re
import secrets
import string
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple, final

import attrs

__all__ = ["MAX_PAIRS", "PWD_RE", "UFRAG_RE", "IceState", "PeerAddress", "mint_credentials"]


class PeerAddress(NamedTuple):
    """Where a client's datagram came from, as a session sees it (and where its answer goes).

    ``host`` and ``port`` are the client's UDP transport address as the datagram's sender (an
    IPv4 or IPv6 literal and a port). ``relay`` names the relay of the cluster the datagram
    came through, ``""`` when it reached the node's own port directly. The relay is our local
    candidate of the pair, so one client address seen through two relays is two candidate pairs
    (RFC 8445 §6.1.2.2), each answered through the relay it came by. Only
    :attr:`socket_address` goes to a socket, a tunnel frame or XOR-MAPPED-ADDRESS.
    """

    host: str
    port: int
    relay: str = ""

    @property
    def socket_address(self) -> tuple[str, int]:
        """``(host, port)``, as the socket API and the relay's tunnel frames take it."""
        return self.host, self.port


#: Most validated pairs kept; RFC 8445 §6.1.2.5 bounds a full agent's check list at 100 too.
MAX_PAIRS: Final = 100

# RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4..256, password 22..256 chars.
_ICE_CHARS: Final = string.ascii_letters + string.digits + "+/"
#: An ICE ufrag, as our credentials and the peer's must be.
UFRAG_RE: Final = re.compile(r"[A-Za-z0-9+/]{4,256}", re.ASCII)
#: An ICE password, as our credentials and the peer's must be.
PWD_RE: Final = re.compile(r"[A-Za-z0-9+/]{22,256}", re.ASCII)


def mint_credentials(
    rng: random.Random | None = None, *, ufrag_length: int = 16, pwd_length: int = 32
) -> tuple[str, str]:
    """A fresh ``(ufrag, pwd)`` pair of ice-chars for our side of an ICE session.

    RFC 8445 §5.3 asks for at least 24 random bits in the ufrag and 128 in the password; each
    ice-char carries 6, so the RFC 8839 §5.4 minimum lengths (4 and 22) just meet that. The
    defaults are longer: 96 bits of ufrag keep the relay's ufrag-to-session routing free of
    collisions, and 192 bits of password leave a wide margin. Characters come from
    :mod:`secrets` unless ``rng`` is given, which is for reproducible tests only.
    """
    if not 4 <= ufrag_length <= 256:
        raise ValueError("an ICE ufrag is 4 to 256 ice-chars (RFC 8839 §5.4)")
    if not 22 <= pwd_length <= 256:
        raise ValueError("an ICE password is 22 to 256 ice-chars (RFC 8839 §5.4)")
    choice = secrets.choice if rng is None else rng.choice
    ufrag = "".join(choice(_ICE_CHARS) for _ in range(ufrag_length))
    pwd = "".join(choice(_ICE_CHARS) for _ in range(pwd_length))
    return ufrag, pwd


def _check_ufrag(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not UFRAG_RE.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 4-256 ice-chars (RFC 8839 §5.4)")


def _check_pwd(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not PWD_RE.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 22-256 ice-chars (RFC 8839 §5.4)")


def _to_pairs(
    value: Iterable[tuple[Sequence[object], float]],
) -> tuple[tuple[PeerAddress, float], ...]:
    # Accepts what a round trip through JSON or msgpack makes of the tuples (lists).
    return tuple((_to_address(addr), float(age)) for addr, age in value)


def _to_address(value: Sequence[object]) -> PeerAddress:
    if len(value) not in (2, 3):
        raise TypeError(f"an address is (host, port[, relay]), not {value!r}")
    host, port, *rest = value
    relay = rest[0] if rest else ""
    if not isinstance(host, str) or not isinstance(port, int) or not isinstance(relay, str):
        raise TypeError(f"an address is (host: str, port: int, relay: str), not {value!r}")
    return PeerAddress(host, port, relay)


def _to_optional_address(value: Sequence[object] | None) -> PeerAddress | None:
    return None if value is None else _to_address(value)


def _check_pairs(
    instance: IceState,
    _: attrs.Attribute[tuple[tuple[PeerAddress, float], ...]],
    value: tuple[tuple[PeerAddress, float], ...],
) -> None:
    addresses = [addr for addr, _ in value]
    if len(set(addresses)) != len(addresses):
        raise ValueError("a pair appears twice")
    if len(value) > MAX_PAIRS:
        raise ValueError(f"more than {MAX_PAIRS} pairs")
    for _addr, age in value:
        if not (math.isfinite(age) and age >= 0):
            raise ValueError("a pair's age is a finite number of seconds >= 0")


def _check_selected(
    instance: IceState, _: attrs.Attribute[PeerAddress | None], value: object
) -> None:
    if value is not None and value not in [addr for addr, _ in instance.pairs]:
        raise ValueError("the selected address must be one of the pairs")
    if instance.expired and value is None:
        raise ValueError("only a session with a selected pair can have expired consent")


@final
@attrs.frozen
class IceState:
    """Everything a responder needs to carry on elsewhere (see :meth:`IceLiteResponder.restore`).

    Times are ages, in seconds before the ``now`` given to :meth:`IceLiteResponder.snapshot`,
    so the state means the same thing under another node's monotonic clock. The passwords are
    key material: they are kept out of ``repr``.
    """

    local_ufrag: str = attrs.field(validator=_check_ufrag)
    local_pwd: str = attrs.field(validator=_check_pwd, repr=False)
    remote_ufrag: str = attrs.field(validator=_check_ufrag)
    remote_pwd: str = attrs.field(validator=_check_pwd, repr=False)
    #: ``(address, seconds since its last valid check)`` of each valid pair, oldest check first
    pairs: tuple[tuple[PeerAddress, float], ...] = attrs.field(
        default=(), converter=_to_pairs, validator=_check_pairs
    )
    #: the nominated pair (the latest nomination), if any
    selected: PeerAddress | None = attrs.field(
        default=None, converter=_to_optional_address, validator=_check_selected
    )
    #: whether consent on the selected pair has already expired
    expired: bool = False

    @property
    def consent_age(self) -> float | None:
        """Seconds since the last valid check on the selected pair; ``None`` without one."""
        for addr, age in self.pairs:
            if addr == self.selected:
                return age
        return None
