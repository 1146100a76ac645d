"""The audio layer of a voice session: Opus codec, jitter buffer and 20 ms outbound pacing.

* :mod:`sessions.audio.opus` wraps libopus (RFC 6716) for 20 ms RTP payloads (RFC 7587),
  with FEC and packet loss concealment; libopus loads on first use.
* :mod:`sessions.audio.jitter` is a sans-I/O adaptive jitter buffer for received packets.
* :mod:`sessions.audio.pacer` is a sans-I/O pacer that sends one frame per 20 ms tick.
* :mod:`sessions.audio.speech` makes test speech with espeak-ng (not re-exported here: it is
  a test and benchmark helper, not part of the media path).
"""

from __future__ import annotations

from sessions.audio.jitter import Frame, FrameKind, JitterBuffer, JitterStats
from sessions.audio.opus import (
    CodecError,
    OpusDecoder,
    OpusEncoder,
    OpusUnavailableError,
    libopus_version,
)
from sessions.audio.pacer import PacedFrame, Pacer, PacerStats

__all__ = [
    "CodecError",
    "Frame",
    "FrameKind",
    "JitterBuffer",
    "JitterStats",
    "OpusDecoder",
    "OpusEncoder",
    "OpusUnavailableError",
    "PacedFrame",
    "Pacer",
    "PacerStats",
    "libopus_version",
]
