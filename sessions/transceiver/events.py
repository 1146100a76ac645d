"""What a :class:`~sessions.transceiver.Transceiver` tells its owner: the session's events.

The owner drains them with :meth:`Transceiver.next_event
<sessions.transceiver.Transceiver.next_event>` after every call that may have produced one.
The transport produces the connection's events (:class:`IceConnected`, :class:`DtlsConnected`,
:class:`MediaStarted`, :class:`SessionFailed`, :class:`SessionClosed`), the checkpoint policy
:class:`CheckpointDue`, and the voice loop :class:`ClientEvent`.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias, final

import attrs

from sessions.webrtc.ice import PeerAddress
from sessions.webrtc.srtp import SrtpProfile

__all__ = [
    "CODE_CONNECT_TIMEOUT",
    "CODE_CONSENT_EXPIRED",
    "CODE_DTLS_FAILED",
    "CheckpointDue",
    "ClientEvent",
    "DtlsConnected",
    "IceConnected",
    "MediaStarted",
    "SessionClosed",
    "SessionEvent",
    "SessionFailed",
]

#: ``SessionFailed.code`` values.
CODE_CONSENT_EXPIRED: Final = "consent_expired"
CODE_DTLS_FAILED: Final = "dtls_failed"
CODE_CONNECT_TIMEOUT: Final = "connect_timeout"


@final
@attrs.frozen
class IceConnected:
    """The client nominated the pair from ``addr`` (RFC 8445 §7.3.1.5): media goes there.

    Emitted again if the client nominates another address later (a NAT rebinding, a network
    change); the latest nomination wins.
    """

    addr: PeerAddress


@final
@attrs.frozen
class DtlsConnected:
    """The DTLS handshake completed with the offered certificate and keyed SRTP."""

    profile: SrtpProfile


@final
@attrs.frozen
class MediaStarted:
    """The client's first authentic RTP packet arrived."""


@final
@attrs.frozen
class SessionFailed:
    """The session is over because something went wrong; ``code`` is machine-readable.

    Codes: ``consent_expired`` (RFC 7675 §5.1), ``dtls_failed`` (handshake failed, e.g. a
    certificate that does not match the offer, or the association ended by a fatal alert),
    ``connect_timeout`` (not connected within
    :data:`~sessions.transceiver.connection.CONNECT_TIMEOUT`). The transceiver is inert
    afterwards: it sends nothing and has no timer.
    """

    reason: str
    code: str


@final
@attrs.frozen
class SessionClosed:
    """The session ended cleanly, by :meth:`Transceiver.close
    <sessions.transceiver.Transceiver.close>` or the client's close_notify."""

    reason: str


@final
@attrs.frozen
class CheckpointDue:
    """Take :meth:`Transceiver.snapshot <sessions.transceiver.Transceiver.snapshot>`, store it
    durably, then :meth:`Transceiver.confirm <sessions.transceiver.Transceiver.confirm>`."""


@final
@attrs.frozen
class ClientEvent:
    """Something the client is told on its signaling socket: the user's turns
    (``speech_started``/``speech_stopped``), the agent's replies (``agent_started``,
    ``agent_finished``, ``agent_interrupted``) and whatever the agent emits itself. ``at`` is on
    the transceiver's clock (the owner converts it to wall time)."""

    name: str
    at: float
    fields: dict[str, Any] = attrs.field(factory=dict)


SessionEvent: TypeAlias = (
    IceConnected
    | DtlsConnected
    | MediaStarted
    | SessionFailed
    | SessionClosed
    | CheckpointDue
    | ClientEvent
)
