"""Writing the answer to a WebRTC offer: its audio section accepted for an ICE-lite, DTLS
server, every other section rejected (RFC 8829 §5.3, RFC 3264 §6)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from sessions.webrtc.sdp.grammar import AUDIO_PROTO, unsupported
from sessions.webrtc.sdp.values import MAX_LOCAL_PREFERENCE, AnswerParams, AudioOffer

__all__ = ["write_answer"]

# RFC 3264 §6.1: the answer's direction is the offer's, seen from the other side.
_ANSWER_DIRECTION: Final = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
# Answer-side Opus parameters (RFC 7587 §6.1): 10 ms minimum packet time, and we can use
# in-band FEC when decoding.
_OPUS_ANSWER_FMTP: Final = "minptime=10;useinbandfec=1"
# RFC 8445 §5.1.2.1 priority inputs: host type preference; RTP is component 1.
_HOST_TYPE_PREFERENCE: Final = 126
_COMPONENT_ID: Final = 1


def _candidate_lines(candidates: Sequence[tuple[str, int]]) -> list[str]:
    """Host candidates (RFC 8839 §5.1) with RFC 8445 §5.1.2.1 priorities.

    Local preference falls by one per candidate so that the first is preferred; the
    foundation is shared by candidates with the same base address (RFC 8445 §5.1.1.3).
    """
    foundations: dict[str, str] = {}
    lines: list[str] = []
    for index, (ip, port) in enumerate(candidates):
        address = ipaddress.ip_address(ip).compressed
        foundation = foundations.setdefault(address, str(len(foundations) + 1))
        local_preference = MAX_LOCAL_PREFERENCE - index
        priority = (_HOST_TYPE_PREFERENCE << 24) + (local_preference << 8) + (256 - _COMPONENT_ID)
        lines.append(
            f"a=candidate:{foundation} {_COMPONENT_ID} udp {priority} {address} {port} typ host"
        )
    return lines


def write_answer(offer: AudioOffer, params: AnswerParams) -> str:
    """Write the answer to ``offer``: its audio section accepted, every other rejected.

    The m= sections mirror the offer's order and mids (RFC 8829 §5.3.1, RFC 3264 §6).
    Raises :class:`~sessions.webrtc.errors.SdpError` ``unsupported`` if the offer would make
    us the DTLS client, :class:`ValueError` if ``offer`` is internally inconsistent.
    """
    # RFC 8842 §5.3: the answerer picks active or passive. We are always the DTLS server,
    # so the answer says passive and the offer must let the browser be active.
    if offer.setup not in ("actpass", "active"):
        raise unsupported(f"a=setup:{offer.setup} would make Parley the DTLS client")
    kinds = dict(offer.other_mids)
    formats = {mid: (proto, fmts) for mid, proto, fmts in offer.other_formats}
    if offer.mid not in offer.m_line_order:
        raise ValueError("the audio mid is not in m_line_order")

    lines = [
        "v=0",
        # RFC 8829 §5.2.1: "-" user name, numeric session id, placeholder address.
        f"o=- {params.session_id} 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        # RFC 8839 §5.3: session-level ice-lite; we only answer connectivity checks.
        "a=ice-lite",
    ]
    if offer.bundle_mids:
        # RFC 8843 §7.3: the answer's BUNDLE group holds only the accepted mid; rejected
        # sections never appear in it. When audio is not the offerer-tagged (first) mid we
        # still answer with it alone as the answerer-tagged section: browsers accept this,
        # and since we are ICE-lite the offered addresses of the tagged section are unused.
        lines.append(f"a=group:BUNDLE {offer.mid}")
    lines.append(f"a=msid-semantic:WMS {params.msid_stream}")

    for mid in offer.m_line_order:
        if mid == offer.mid:
            lines.extend(_audio_section(offer, params))
            continue
        kind = kinds.get(mid)
        if kind is None:
            raise ValueError(f"mid {mid!r} is neither the audio mid nor in other_mids")
        proto, fmts = formats.get(mid, _default_format(kind))
        # RFC 3264 §6 / RFC 8829 §5.3.1: a rejected section has port 0 and repeats the
        # offered proto and formats; the mid keeps sections aligned (RFC 8843 §7.3).
        lines.extend(
            [
                f"m={kind} 0 {proto} {' '.join(fmts)}",
                "c=IN IP4 0.0.0.0",
                f"a=mid:{mid}",
            ]
        )
    return "\r\n".join(lines) + "\r\n"


def _default_format(kind: str) -> tuple[str, tuple[str, ...]]:
    """Proto and format for a rejected section of a hand-built offer without formats."""
    if kind == "application":
        return "UDP/DTLS/SCTP", ("webrtc-datachannel",)
    return AUDIO_PROTO, ("0",)


def _audio_section(offer: AudioOffer, params: AnswerParams) -> list[str]:
    pts = [offer.opus_pt]
    if offer.telephone_event_pt is not None:
        pts.append(offer.telephone_event_pt)
    lines = [
        # RFC 8829 §5.3.1: port 9 and 0.0.0.0 until ICE picks the real path.
        f"m=audio 9 {AUDIO_PROTO} {' '.join(map(str, pts))}",
        "c=IN IP4 0.0.0.0",
        f"a=mid:{offer.mid}",
        f"a=ice-ufrag:{params.ice_ufrag}",
        f"a=ice-pwd:{params.ice_pwd}",
        f"a=fingerprint:sha-256 {params.fingerprint_sha256.upper()}",
        "a=setup:passive",
        "a=rtcp-mux",  # RFC 5761 §5.1.1
        f"a={_ANSWER_DIRECTION.get(offer.direction, 'sendrecv')}",
        f"a=msid:{params.msid_stream} {params.msid_track}",  # RFC 8830 §3
        f"a=rtpmap:{offer.opus_pt} opus/48000/2",  # RFC 7587 §7
        f"a=fmtp:{offer.opus_pt} {_OPUS_ANSWER_FMTP}",
    ]
    if offer.telephone_event_pt is not None:
        lines.append(f"a=rtpmap:{offer.telephone_event_pt} telephone-event/48000")  # RFC 4733
    lines.append(f"a=ssrc:{params.ssrc} cname:{params.cname}")  # RFC 5576 §4.1
    lines.extend(_candidate_lines(params.candidates))
    lines.append("a=end-of-candidates")  # RFC 8840: an ICE-lite agent has nothing to trickle
    return lines
