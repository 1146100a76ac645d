"""SDP offer parsing and answer writing for an ICE-lite, audio-only WebRTC endpoint.

Parley answers offers from unmodified browsers (and aiortc). From an offer it needs only
the transport parameters of one audio ``m=`` section and the Opus payload type; every
other ``m=`` section (video, data channel, extra audio) is rejected in the answer.

The module is pure: no I/O, no clocks, no randomness. Callers pass identifiers (session
id, SSRC, ICE credentials) in :class:`AnswerParams`.

Errors caused by the remote offer raise :class:`~sessions.webrtc.errors.SdpError` with a
``code`` reused as the signaling error code:

``bad_sdp``
    unparseable text, or a required line (ice-ufrag, ice-pwd, fingerprint, setup) is
    missing or malformed.
``no_audio``
    no audio ``m=`` section, or every audio section is rejected (port 0).
``no_common_codec``
    the audio section does not offer opus/48000/2.
``unsupported``
    well-formed, but outside what we implement: no rtcp-mux, a DTLS role that would make
    us the DTLS client, only fingerprints of unsupported hashes, no ``a=mid``, a
    non-DTLS-SRTP profile, an ICE-lite offerer, a bundle-only section outside BUNDLE.

Invalid :class:`AnswerParams` are a local programming error and raise :class:`ValueError`.

The package, bottom up: :mod:`~sessions.webrtc.sdp.grammar` (shared grammar and errors),
:mod:`~sessions.webrtc.sdp.values` (:class:`AudioOffer`, :class:`AnswerParams`),
:mod:`~sessions.webrtc.sdp.lexer` (RFC 8866 §5 syntax), :mod:`~sessions.webrtc.sdp.offer`
(parsing) and :mod:`~sessions.webrtc.sdp.answer` (writing).
"""

from __future__ import annotations

from sessions.webrtc.sdp.answer import write_answer
from sessions.webrtc.sdp.lexer import MAX_SDP_CHARS
from sessions.webrtc.sdp.offer import parse_offer
from sessions.webrtc.sdp.values import AnswerParams, AudioOffer

__all__ = [
    "MAX_SDP_CHARS",
    "AnswerParams",
    "AudioOffer",
    "parse_offer",
    "write_answer",
]
