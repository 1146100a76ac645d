"""What the SDP lexer, the offer parser and the answer writer share: grammar pieces and the
two error codes an offer's form earns (see :mod:`sessions.webrtc.sdp`)."""

from __future__ import annotations

import re
from typing import Final

from sessions.webrtc.errors import SdpError

__all__ = [
    "AUDIO_PROTO",
    "ICE_PWD_RE",
    "ICE_UFRAG_RE",
    "MAX_SSRC",
    "TOKEN_RE",
    "bad",
    "unsupported",
]

# The only RTP profile we speak: DTLS-SRTP with feedback (RFC 8829 §5.1.2, RFC 5764 §8).
AUDIO_PROTO: Final = "UDP/TLS/RTP/SAVPF"
# RFC 8866 §9 grammar pieces; re.ASCII so that \d or case folding never admits non-ASCII.
TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+", re.ASCII)
# RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4..256, pwd 22..256 chars.
ICE_UFRAG_RE: Final = re.compile(r"[A-Za-z0-9+/]{4,256}", re.ASCII)
ICE_PWD_RE: Final = re.compile(r"[A-Za-z0-9+/]{22,256}", re.ASCII)
# RFC 3550 §5.1: an SSRC is 32 bits.
MAX_SSRC: Final = 0xFFFF_FFFF


def bad(message: str) -> SdpError:
    """An ``SdpError`` with code ``bad_sdp``: unparseable, or a required line is missing."""
    return SdpError("bad_sdp", message)


def unsupported(message: str) -> SdpError:
    """An ``SdpError`` with code ``unsupported``: well-formed, but beyond what we implement."""
    return SdpError("unsupported", message)
