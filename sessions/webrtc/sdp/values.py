"""The values of the SDP layer: :class:`AudioOffer`, what
:func:`~sessions.webrtc.sdp.parse_offer` reads from an offer, and :class:`AnswerParams`, our
side of the answer :func:`~sessions.webrtc.sdp.write_answer` writes."""

from __future__ import annotations

import ipaddress
import re
from typing import Final, final

import attrs

from sessions.webrtc.sdp.grammar import ICE_PWD_RE, ICE_UFRAG_RE, MAX_SSRC, TOKEN_RE

__all__ = ["MAX_LOCAL_PREFERENCE", "AnswerParams", "AudioOffer"]

# JSEP (RFC 8829 §5.2.1): sess-id fits a signed 64-bit integer and is below 2**63 - 1.
_MAX_SESSION_ID: Final = 2**63 - 2
#: RFC 8445 §5.1.2.1: the local preference of a candidate is 16 bits; one per candidate.
MAX_LOCAL_PREFERENCE: Final = 65535


@final
@attrs.frozen
class AudioOffer:
    """What Parley needs from a WebRTC offer: the chosen audio section and its transport.

    Transport attributes (ICE credentials, fingerprint, setup, ice-options) are taken from
    the audio section, else from the offerer-tagged section of its BUNDLE group (RFC 8843
    §7 lets bundled sections carry them only once), else from the session level.

    ``opus_fmtp`` is a plain dict: treat it as read-only (this makes the value unhashable).
    """

    #: ``a=mid`` of the accepted audio section (RFC 5888 §4)
    mid: str
    ice_ufrag: str
    ice_pwd: str
    #: ``a=ice-options`` tokens, e.g. ``("trickle",)`` (RFC 8839 §5.6)
    ice_options: tuple[str, ...]
    #: (hash name in lower case, upper-case colon-separated hex); sha-256 preferred
    fingerprint: tuple[str, str]
    #: offered DTLS role (RFC 4145 §4, RFC 8842 §5.2): ``actpass`` or ``active``;
    #: :func:`parse_offer` refuses ``passive``, :func:`write_answer` refuses it too
    setup: str
    opus_pt: int
    #: Opus format parameters with lower-cased names, e.g. ``{"useinbandfec": "1"}``
    opus_fmtp: dict[str, str]
    #: payload type of telephone-event/48000 (RFC 4733), if offered
    telephone_event_pt: int | None
    rtcp_mux: bool
    #: ``a=rtcp-fb`` values that apply to Opus (its payload type or ``*``)
    rtcp_fb: tuple[str, ...]
    #: (id, URI) of offered RTP header extensions (RFC 8285 §5)
    extmaps: tuple[tuple[int, str], ...]
    ssrc: int | None
    cname: str | None
    #: raw ``a=msid`` value, "<stream id> <track id>" (RFC 8830 §3)
    msid: str | None
    #: the mids of the BUNDLE group holding the audio section, () if not bundled
    bundle_mids: tuple[str, ...]
    #: (mid, media kind) of every other section; the answer rejects them all
    other_mids: tuple[tuple[str, str], ...]
    #: raw ``a=candidate`` values (we are ICE-lite and never send checks; diagnostics)
    candidates: tuple[str, ...]
    #: every mid in offer order; the answer mirrors it (RFC 8829 §5.3.1, RFC 3264 §6)
    m_line_order: tuple[str, ...]
    #: offered direction of the audio section (RFC 8866 §6.7, default sendrecv)
    direction: str = "sendrecv"
    #: (mid, proto, fmt list) of each rejected section, echoed in the answer (RFC 3264 §6)
    other_formats: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def _check_ufrag(_: object, __: object, value: str) -> None:
    if not ICE_UFRAG_RE.fullmatch(value):
        raise ValueError(f"ICE ufrag must be 4-256 ice-chars (RFC 8839 §5.4): {value!r}")


def _check_pwd(_: object, __: object, value: str) -> None:
    if not ICE_PWD_RE.fullmatch(value):
        raise ValueError("ICE password must be 22-256 ice-chars (RFC 8839 §5.4)")


def _check_sha256(_: object, __: object, value: str) -> None:
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}", value, re.ASCII):
        raise ValueError(f"not a colon-separated SHA-256 fingerprint: {value!r}")


def _check_candidates(_: object, __: object, value: tuple[tuple[str, int], ...]) -> None:
    if not value:
        raise ValueError("an ICE-lite answer needs at least one host candidate")
    if len(value) > MAX_LOCAL_PREFERENCE:
        raise ValueError("too many candidates")
    for ip, port in value:
        ipaddress.ip_address(ip)  # raises ValueError
        if not 1 <= port <= 65535:
            raise ValueError(f"candidate port out of range: {port}")


def _check_ssrc(_: object, __: object, value: int) -> None:
    if not 0 <= value <= MAX_SSRC:
        raise ValueError(f"SSRC out of range: {value}")


def _check_session_id(_: object, __: object, value: int) -> None:
    if not 0 <= value <= _MAX_SESSION_ID:
        raise ValueError(f"session id out of range (RFC 8829 §5.2.1): {value}")


def _check_token(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # msid-id is 1*64 token-char (RFC 8830 §3); we hold the CNAME to the same rule so it
    # can never break an a=ssrc line.
    if len(value) > 64 or not TOKEN_RE.fullmatch(value):
        raise ValueError(f"{attribute.name} must be 1-64 SDP token characters: {value!r}")


@final
@attrs.frozen
class AnswerParams:
    """Our side of the answer. Validated on construction (:class:`ValueError`)."""

    ice_ufrag: str = attrs.field(validator=_check_ufrag)
    ice_pwd: str = attrs.field(validator=_check_pwd)
    #: SHA-256 fingerprint of our DTLS certificate, "AB:CD:..." (case is normalised)
    fingerprint_sha256: str = attrs.field(validator=_check_sha256)
    #: (ip, port) UDP host candidates, IPv4 or IPv6, most preferred first
    candidates: tuple[tuple[str, int], ...] = attrs.field(validator=_check_candidates)
    ssrc: int = attrs.field(validator=_check_ssrc)
    cname: str = attrs.field(validator=_check_token)
    session_id: int = attrs.field(validator=_check_session_id)
    msid_stream: str = attrs.field(default="parley", validator=_check_token)
    msid_track: str = attrs.field(default="agent", validator=_check_token)
