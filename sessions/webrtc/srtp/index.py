"""RFC 3711 packet index arithmetic: the ROC/SEQ estimate and replay windows.

An SRTP packet index is ``ROC * 2**16 + SEQ`` (RFC 3711 §3.3.1): the 16-bit sequence number
on the wire plus a rollover counter that each side keeps. An SRTCP index is a 31-bit counter
sent in the clear (RFC 3711 §3.4). A replay window (RFC 3711 §3.3.2) is kept here as an
integer: bit k set means index ``highest - k`` was received.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "HALF",
    "MAX_RTP_INDEX",
    "MAX_SRTCP_INDEX",
    "WINDOW",
    "WINDOW_MASK",
    "guess_index",
    "newer",
    "replay_add",
    "replay_reason",
]

#: Half the sequence number space: the RFC 3711 §3.3.1 estimate is right for jumps below it.
HALF: Final = 1 << 15
#: RFC 3711 §3.3.1: the packet index is 48 bits.
MAX_RTP_INDEX: Final = (1 << 48) - 1
#: RFC 3711 §3.4: the SRTCP index is 31 bits.
MAX_SRTCP_INDEX: Final = (1 << 31) - 1
#: libsrtp's replay window; RFC 3711 §3.3.2 asks for at least 64.
WINDOW: Final = 128
WINDOW_MASK: Final = (1 << WINDOW) - 1


def guess_index(highest: int | None, seq: int) -> int:
    """The index of ``seq`` next to the highest one, exactly as libsrtp guesses it.

    RFC 3711 §3.3.1 picks ROC - 1, ROC or ROC + 1, whichever is nearest; libsrtp
    (``srtp_rdbx_estimate_index``) takes ROC 0 while the highest index is at most 2**15. The
    two must agree, or the index we check and record is not the one libsrtp authenticates.
    """
    if highest is None or highest <= HALF:
        return seq
    roc, s_l = highest >> 16, highest & 0xFFFF
    if s_l < HALF:
        v = roc - 1 if seq - s_l > HALF else roc
    else:
        v = roc + 1 if s_l - HALF > seq else roc
    return (v << 16) | seq


def replay_reason(highest: int | None, window: int, index: int) -> str | None:
    """Why ``index`` must be refused (RFC 3711 §3.3.2), or ``None``; bit k of ``window`` is
    index ``highest - k``."""
    if highest is None or index > highest:
        return None
    behind = highest - index
    if behind >= WINDOW:
        return "too old for the replay window"
    if window >> behind & 1:
        return "replayed"
    return None


def replay_add(highest: int | None, window: int, index: int) -> tuple[int, int]:
    """The ``(highest, window)`` after accepting ``index`` (RFC 3711 §3.3.2)."""
    if highest is None:
        return index, 1
    if index > highest:
        ahead = index - highest
        # a jump past the whole window forgets it (and never builds a 2**31-bit integer)
        return index, 1 if ahead >= WINDOW else ((window << ahead) | 1) & WINDOW_MASK
    return highest, window | (1 << (highest - index))


def newer(a: int | None, b: int | None) -> int | None:
    """The larger of two indexes, either of which may be ``None`` (none yet)."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
