"""SRTCP protection at an index we choose (RFC 3711 §3.4, §4; RFC 7714 §9, §11).

libsrtp numbers SRTCP packets 1, 2, 3... from its own counter and has no way to start
elsewhere, so a restored libsrtp would reuse every index the previous owner used. Here we
derive the SRTCP session keys ourselves and write E flag, 31-bit index and tag; the tests check
the output byte for byte against libsrtp. Inbound SRTCP still goes through libsrtp: this module
only reads its index (:func:`index_of`) for our own replay window.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final, final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sessions.webrtc.srtp.index import MAX_SRTCP_INDEX
from sessions.webrtc.srtp.profile import SrtpProfile

__all__ = ["SrtcpProtector", "derive", "index_of"]

# RFC 3711 §3.4: the E flag is the top bit of the word that carries the SRTCP index.
_E_FLAG: Final = 1 << 31
# RFC 3711 §4.3.2: SRTCP encryption key, authentication key and salt labels.
_LABEL_SRTCP_KEY: Final = 0x03
_LABEL_SRTCP_AUTH: Final = 0x04
_LABEL_SRTCP_SALT: Final = 0x05
_HMAC_KEY_LENGTH: Final = 20  # RFC 3711 §4.2.1: HMAC-SHA1 session key, 160 bits
_U32: Final = struct.Struct("!I")


def derive(master: bytes, key_length: int, label: int, length: int) -> bytes:
    """One session key from a master key and salt (RFC 3711 §4.3.1, AES-CM PRF of §4.3.3).

    The key derivation rate is 0 (what DTLS-SRTP uses), so ``r = 0`` and x = label * 2**48
    XOR master salt. RFC 7714 §11 (erratum 4938): a 96-bit GCM salt is first multiplied by
    2**16, i.e. padded with two zero bytes, to make the 112 bits the PRF takes.
    """
    key, salt = master[:key_length], master[key_length:]
    x = int.from_bytes(salt.ljust(14, b"\0"), "big") ^ (label << 48)
    prf = Cipher(algorithms.AES(key), modes.CTR((x << 16).to_bytes(16, "big"))).encryptor()
    return prf.update(bytes(length))


def index_of(profile: SrtpProfile, packet: bytes) -> int:
    """The 31-bit SRTCP index of ``packet``, which the caller has checked is long enough.

    RFC 3711 §3.4: the E flag and index precede the tag; RFC 7714 §9: they end the packet.
    """
    tag = profile.tag_length
    at = len(packet) - 4 if profile.is_aead else len(packet) - 4 - tag
    index: int = _U32.unpack_from(packet, at)[0] & MAX_SRTCP_INDEX
    return index


@final
class SrtcpProtector:
    """Protects RTCP compound packets at an index we choose (libsrtp only counts its own)."""

    __slots__ = ("_aead", "_auth", "_key", "_salt")

    def __init__(self, profile: SrtpProfile, master: bytes) -> None:
        k = profile.key_length
        self._key = derive(master, k, _LABEL_SRTCP_KEY, k)
        self._salt = int.from_bytes(
            derive(master, k, _LABEL_SRTCP_SALT, profile.salt_length), "big"
        )
        self._aead = AESGCM(self._key) if profile.is_aead else None
        self._auth = (
            b"" if profile.is_aead else derive(master, k, _LABEL_SRTCP_AUTH, _HMAC_KEY_LENGTH)
        )

    def protect(self, packet: bytes, index: int) -> bytes:
        """SRTCP for ``packet`` (at least the 8-byte first header) with SRTCP index ``index``;
        always encrypted (E flag set, RFC 3711 §3.4)."""
        ssrc = _U32.unpack_from(packet, 4)[0]
        trailer = _U32.pack(_E_FLAG | index)
        header, body = packet[:8], packet[8:]
        if self._aead is not None:
            # RFC 7714 §9.1: IV = (0x0000 || SSRC || 0x0000 || 0 || index) XOR salt; §9.2:
            # the AAD is the first header and the E flag with the index; the tag follows the
            # ciphertext and the index follows the tag.
            iv = ((ssrc << 48) ^ index ^ self._salt).to_bytes(12, "big")
            return header + self._aead.encrypt(iv, body, header + trailer) + trailer
        # RFC 3711 §4.1.1 with the SRTCP index as i: IV = (k_s * 2**16) XOR (SSRC * 2**64)
        # XOR (i * 2**16); everything after the first 8 bytes is encrypted (§3.4).
        iv = ((self._salt << 16) ^ (ssrc << 64) ^ (index << 16)).to_bytes(16, "big")
        cipher = Cipher(algorithms.AES(self._key), modes.CTR(iv)).encryptor()
        authenticated = header + cipher.update(body) + trailer
        # RFC 3711 §4.2.1: HMAC-SHA1 over the authenticated portion, cut to 80 bits.
        tag = hmac.new(self._auth, authenticated, hashlib.sha1).digest()[:10]
        return authenticated + tag
