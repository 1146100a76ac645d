"""What a DTLS-SRTP handshake yields: the negotiated protection profile and the SRTP master
keys and salts for both directions (RFC 5764 §4.1.2, §4.2; RFC 7714 §12, §14.2)."""

from __future__ import annotations

import enum
from typing import Final, final

import attrs

__all__ = ["BY_OPENSSL_NAME", "SrtpKeys", "SrtpProfile"]


class SrtpProfile(enum.StrEnum):
    """SRTP protection profiles we negotiate, by their IANA names (RFC 5764 §4.1.2)."""

    #: RFC 7714 §14.2; preferred
    AEAD_AES_128_GCM = "SRTP_AEAD_AES_128_GCM"
    #: RFC 5764 §4.1.2; every WebRTC endpoint implements it (RFC 8827 §6.5)
    AES128_CM_HMAC_SHA1_80 = "SRTP_AES128_CM_HMAC_SHA1_80"

    @property
    def protection_profile_id(self) -> int:
        """The two-byte SRTPProtectionProfile value, also libsrtp's and pylibsrtp's id."""
        return _PROFILE_PARAMETERS[self][0]

    @property
    def key_length(self) -> int:
        """Master key length in bytes."""
        return _PROFILE_PARAMETERS[self][1]

    @property
    def salt_length(self) -> int:
        """Master salt length in bytes."""
        return _PROFILE_PARAMETERS[self][2]

    @property
    def openssl_name(self) -> bytes:
        """The name OpenSSL uses in ``SSL_CTX_set_tlsext_use_srtp``."""
        return _PROFILE_PARAMETERS[self][3]


# (profile id, key length, salt length, OpenSSL name): RFC 5764 §4.1.2 gives
# AES128_CM_HMAC_SHA1_80 a 128-bit key and 112-bit salt; RFC 7714 §12 gives AEAD_AES_128_GCM
# a 128-bit key and a 96-bit salt.
_PROFILE_PARAMETERS: Final[dict[SrtpProfile, tuple[int, int, int, bytes]]] = {
    SrtpProfile.AEAD_AES_128_GCM: (0x0007, 16, 12, b"SRTP_AEAD_AES_128_GCM"),
    SrtpProfile.AES128_CM_HMAC_SHA1_80: (0x0001, 16, 14, b"SRTP_AES128_CM_SHA1_80"),
}
#: The profile for each name ``SSL_get_selected_srtp_profile`` may report.
BY_OPENSSL_NAME: Final = {params[3]: profile for profile, params in _PROFILE_PARAMETERS.items()}


def _check_key(instance: SrtpKeys, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    want = (
        instance.profile.salt_length
        if attribute.name.endswith("salt")
        else instance.profile.key_length
    )
    if len(value) != want:
        # the message names lengths only: key material must never reach a log
        raise ValueError(f"{attribute.name} must be {want} bytes, got {len(value)}")


@final
@attrs.frozen(repr=False)
class SrtpKeys:
    """SRTP master keys and salts for both directions (RFC 5764 §4.2).

    The client is the remote peer: it protects with the client key and salt and we
    unprotect with them; we protect with the server ones. The repr (and str) never show key
    material, so an event or a key set can be logged as is.
    """

    profile: SrtpProfile
    client_key: bytes = attrs.field(validator=_check_key)
    client_salt: bytes = attrs.field(validator=_check_key)
    server_key: bytes = attrs.field(validator=_check_key)
    server_salt: bytes = attrs.field(validator=_check_key)

    @classmethod
    def from_exported(cls, profile: SrtpProfile, material: bytes) -> SrtpKeys:
        """Split exporter output laid out as RFC 5764 §4.2 says: client_write_SRTP_master_key,
        server_write_SRTP_master_key, client_write_SRTP_master_salt,
        server_write_SRTP_master_salt."""
        k, s = profile.key_length, profile.salt_length
        if len(material) != 2 * (k + s):
            raise ValueError(f"need {2 * (k + s)} bytes of keying material, got {len(material)}")
        return cls(
            profile=profile,
            client_key=material[:k],
            server_key=material[k : 2 * k],
            client_salt=material[2 * k : 2 * k + s],
            server_salt=material[2 * k + s :],
        )

    @property
    def client_master(self) -> bytes:
        """Client key then salt: libsrtp's key format, for unprotecting what the peer sends."""
        return self.client_key + self.client_salt

    @property
    def server_master(self) -> bytes:
        """Server key then salt: libsrtp's key format, for protecting what we send."""
        return self.server_key + self.server_salt

    def __repr__(self) -> str:
        return f"SrtpKeys(profile={self.profile.value}, keys=<redacted>)"

    __str__ = __repr__
