"""SRTP protection profiles and the two exception families of :mod:`sessions.webrtc.srtp`."""

from __future__ import annotations

import enum
from typing import Final

from sessions.webrtc.errors import RemoteInputError

__all__ = ["SrtpError", "SrtpIndexError", "SrtpProfile"]


class SrtpError(RemoteInputError):
    """An incoming SRTP or SRTCP packet failed authentication, was replayed, or was malformed."""


class SrtpIndexError(RuntimeError):
    """We refused to protect: the index may have been used before, is outside the session's
    reservation (confirm a newer snapshot), or the index space is used up (rekey)."""


class SrtpProfile(enum.StrEnum):
    """SRTP protection profiles, by their IANA names (RFC 5764 §4.1.2, RFC 7714 §14.2)."""

    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"
    AES128_CM_HMAC_SHA1_80 = "SRTP_AES128_CM_HMAC_SHA1_80"

    @classmethod
    def from_id(cls, profile_id: int) -> SrtpProfile:
        """The profile with the two-byte SRTPProtectionProfile value ``profile_id``."""
        for profile in cls:
            if profile.protection_profile_id == profile_id:
                return profile
        raise ValueError(f"unknown SRTP protection profile 0x{profile_id:04x}")

    @property
    def protection_profile_id(self) -> int:
        """The two-byte SRTPProtectionProfile value, also pylibsrtp's profile constant."""
        return _PARAMS[self][0]

    @property
    def key_length(self) -> int:
        """Master key length in bytes."""
        return 16

    @property
    def salt_length(self) -> int:
        """Master salt length in bytes."""
        return _PARAMS[self][1]

    @property
    def master_length(self) -> int:
        """Length of key then salt, the form libsrtp and :class:`SrtpState` take."""
        return self.key_length + self.salt_length

    @property
    def is_aead(self) -> bool:
        """Whether the profile is an AEAD one (RFC 7714) rather than AES-CM with HMAC-SHA1."""
        return self is SrtpProfile.AEAD_AES_128_GCM

    @property
    def tag_length(self) -> int:
        """Authentication tag length in bytes, the same for SRTP and SRTCP."""
        return _PARAMS[self][2]


# (SRTPProtectionProfile, salt length, tag length): RFC 5764 §4.1.2 (112-bit salt, 80-bit
# HMAC tag for RTP and RTCP alike) and RFC 7714 §12 (96-bit salt, 128-bit GCM tag).
_PARAMS: Final[dict[SrtpProfile, tuple[int, int, int]]] = {
    SrtpProfile.AEAD_AES_128_GCM: (0x0007, 12, 16),
    SrtpProfile.AES128_CM_HMAC_SHA1_80: (0x0001, 14, 10),
}
