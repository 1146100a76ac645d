"""A minimal WebRTC client, sans-I/O: the browser's side of one audio session, light enough that
one process holds a thousand of them (ops/bench/turns.py drives one on a virtual clock,
ops/bench/scale.py a thousand over loopback UDP).

Built from the public pieces a browser's side needs: STUN connectivity checks
(:mod:`sessions.webrtc.stun`), a pyOpenSSL DTLS client keyed into libsrtp (pylibsrtp), Opus
(:mod:`sessions.audio.opus`). It sends; of what comes back it only notes when agent RTP arrived
and its RTP timestamp (read from the clear header: nothing is decrypted).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import secrets
from typing import Any, Final, final

import pylibsrtp
from OpenSSL import SSL

from sessions.audio.opus import OpusEncoder
from sessions.webrtc import rtp, stun
from sessions.webrtc.certs import Certificate, generate_certificate
from sessions.webrtc.demux import PacketKind, classify, is_rtcp
from sessions.webrtc.dtls import SrtpKeys, SrtpProfile

__all__ = ["CLIENT_SSRC", "OPUS_PT", "Client", "answer_candidates", "certificates", "offer_sdp"]

CLIENT_UFRAG: Final = "bnch"
CLIENT_PWD: Final = "bench+password/0123456789"
CLIENT_SSRC: Final = 0x5EED_0001
OPUS_PT: Final = 111
_CANDIDATE: Final = re.compile(
    r"^a=candidate:\S+ 1 udp \d+ (\S+) (\d+) typ host", re.MULTILINE | re.IGNORECASE
)


@functools.cache
def certificates() -> tuple[Certificate, Certificate]:
    """A server's and a client's certificate, made once per process (making one is slow)."""
    return generate_certificate(), generate_certificate(common_name="bench-client")


def offer_sdp(fingerprint: str) -> str:
    """An audio-only offer shaped like a browser's (Opus only)."""
    lines = [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        f"m=audio 9 UDP/TLS/RTP/SAVPF {OPUS_PT}",
        "c=IN IP4 0.0.0.0",
        f"a=ice-ufrag:{CLIENT_UFRAG}",
        f"a=ice-pwd:{CLIENT_PWD}",
        f"a=fingerprint:sha-256 {fingerprint}",
        "a=setup:actpass",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        f"a=rtpmap:{OPUS_PT} opus/48000/2",
        f"a=fmtp:{OPUS_PT} minptime=10;useinbandfec=1",
        f"a=ssrc:{CLIENT_SSRC} cname:bench",
    ]
    return "\r\n".join(lines) + "\r\n"


def _answer_attribute(answer: str, name: str) -> str:
    match = re.search(rf"^a={name}:(.*?)\r$", answer, re.MULTILINE)
    if match is None:
        raise ValueError(f"the answer has no a={name}")
    return match.group(1)


def answer_candidates(answer: str) -> list[tuple[str, int]]:
    """The host candidates of an answer, (address, port), in its order."""
    return [(m.group(1), int(m.group(2))) for m in _CANDIDATE.finditer(answer)]


@final
class Client:
    """The browser's side, sans-I/O: ICE checks, a DTLS client (pyOpenSSL), SRTP (libsrtp)
    and Opus. It sends; of what comes back it only notes when agent RTP arrived (while
    :attr:`record` is true; :attr:`received` counts it either way)."""

    def __init__(self, answer: str, certificate: Certificate) -> None:
        self._ufrag = _answer_attribute(answer, "ice-ufrag")
        self._pwd = _answer_attribute(answer, "ice-pwd").encode()
        ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        ctx.use_certificate(certificate.cert)
        ctx.use_privatekey(certificate.private_key)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)
        ctx.set_tlsext_use_srtp(b":".join(p.openssl_name for p in SrtpProfile))
        ctx.set_options(SSL.OP_NO_QUERY_MTU)
        self._conn = SSL.Connection(ctx, None)
        self._conn.set_connect_state()
        self._conn.set_ciphertext_mtu(1200)
        self._ice_ok = False
        self._tx: Any = None
        self._ids = itertools.count(1)
        self._seq = secrets.randbelow(1 << 16)
        self._timestamp = secrets.randbits(32)
        self._encoder: OpusEncoder | None = None
        #: whether to note the agent's RTP packets in :attr:`echoes` and :attr:`timestamps`
        self.record = True
        #: (arrival time, RTP timestamp) of the agent's RTP packets
        self.echoes: list[tuple[float, int]] = []
        #: the first arrival of each RTP timestamp of the agent's
        self.timestamps: dict[int, float] = {}
        #: the agent's RTP packets received, recorded or not
        self.received = 0

    @property
    def keyed(self) -> bool:
        return self._tx is not None

    @property
    def arrivals(self) -> list[float]:
        """Arrival times of the agent's RTP packets (those recorded)."""
        return [at for at, _ in self.echoes]

    def check(self) -> bytes:
        """A connectivity check nominating the pair (also a consent refresh)."""
        request = stun.binding_request(
            next(self._ids).to_bytes(12, "big"),
            username=f"{self._ufrag}:{CLIENT_UFRAG}",
            priority=(126 << 24) | (65535 << 8) | 255,
            controlling=True,
            tie_breaker=0x0123_4567_89AB_CDEF,
            use_candidate=True,
        )
        return stun.encode(request, integrity_key=self._pwd, fingerprint=True)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Take one datagram from the server; what to send back (the DTLS handshake)."""
        kind = classify(data)
        if kind is PacketKind.STUN:
            if stun.parse(data).cls is stun.StunClass.SUCCESS:
                self._ice_ok = True
        elif kind is PacketKind.DTLS:
            self._conn.bio_write(data)
        elif kind is PacketKind.RTP_RTCP and not is_rtcp(data):
            self.received += 1
            if self.record:
                timestamp = int.from_bytes(data[4:8], "big")
                self.echoes.append((now, timestamp))
                self.timestamps.setdefault(timestamp, now)
        return self.handshake()

    def handshake(self) -> list[bytes]:
        """Drive the DTLS handshake once ICE works; the datagrams it wants sent."""
        if not self._ice_ok or self.keyed:
            return []
        with contextlib.suppress(SSL.WantReadError):
            self._conn.do_handshake()
            self._key()
        return self._outgoing()

    def dtls_timeout(self) -> float | None:
        """Seconds until the DTLS handshake wants to retransmit, if it is waiting."""
        if not self._ice_ok or self.keyed:
            return None
        timeout: float | None = self._conn.DTLSv1_get_timeout()
        return timeout

    def handle_dtls_timeout(self) -> list[bytes]:
        """Retransmit the last DTLS flight if its timer ran out; the datagrams to send."""
        if not self._ice_ok or self.keyed:
            return []
        self._conn.DTLSv1_handle_timeout()
        return self._outgoing()

    def _outgoing(self) -> list[bytes]:
        out = b""
        with contextlib.suppress(SSL.WantReadError):
            while True:
                out += self._conn.bio_read(65536)
        return [out] if out else []

    def _key(self) -> None:
        name = self._conn.get_selected_srtp_profile()
        profile = next(p for p in SrtpProfile if p.openssl_name == name)
        length = 2 * (profile.key_length + profile.salt_length)
        material = self._conn.export_keying_material(b"EXTRACTOR-dtls_srtp", length)
        keys = SrtpKeys.from_exported(profile, material)
        policy = pylibsrtp.Policy
        self._tx = pylibsrtp.Session(
            policy(
                key=keys.client_master,
                ssrc_type=policy.SSRC_ANY_OUTBOUND,
                srtp_profile=profile.protection_profile_id,
            )
        )

    def media(self, pcm: bytes) -> bytes:
        """One 20 ms frame of PCM (48 kHz mono s16), Opus-encoded, as SRTP."""
        if self._encoder is None:  # made on first use: an idle client needs none
            self._encoder = OpusEncoder()
        return self.packet(self._encoder.encode(pcm))

    def packet(self, payload: bytes) -> bytes:
        """One 20 ms frame already encoded (an Opus packet), as SRTP."""
        packet = rtp.RtpPacket(
            payload_type=OPUS_PT,
            sequence_number=self._seq,
            timestamp=self._timestamp,
            ssrc=CLIENT_SSRC,
            payload=payload,
        )
        self._seq = (self._seq + 1) & 0xFFFF
        self._timestamp = (self._timestamp + 960) & 0xFFFF_FFFF
        return bytes(self._tx.protect(rtp.serialize(packet)))
