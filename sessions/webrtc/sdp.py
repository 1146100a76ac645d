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
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final, final

import attrs

from sessions.webrtc.errors import SdpError

__all__ = [
    "MAX_SDP_CHARS",
    "AnswerParams",
    "AudioOffer",
    "parse_offer",
    "write_answer",
]

#: Offers longer than this are refused before parsing (a many-transceiver browser offer
#: is a few tens of KiB; this only bounds the work a peer can make us do).
MAX_SDP_CHARS: Final = 256 * 1024

# The only RTP profile we speak: DTLS-SRTP with feedback (RFC 8829 §5.1.2, RFC 5764 §8).
_AUDIO_PROTO: Final = "UDP/TLS/RTP/SAVPF"

# Hashes we can verify a DTLS certificate with, in order of preference, and their digest
# sizes in bytes (RFC 8122 §5; RFC 8842 §5 requires at least one fingerprint line).
_FINGERPRINT_HASHES: Final[dict[str, int]] = {
    "sha-256": 32,
    "sha-384": 48,
    "sha-512": 64,
    "sha-1": 20,
}

# RFC 8866 §9 grammar pieces; re.ASCII so that \d or case folding never admits non-ASCII.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+", re.ASCII)
_PROTO_RE: Final = re.compile(
    r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+(?:/[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)*", re.ASCII
)
_LINE_RE: Final = re.compile(r"([a-z])=(.*)", re.ASCII | re.DOTALL)
_PORT_RE: Final = re.compile(r"([0-9]{1,5})(?:/([0-9]{1,5}))?", re.ASCII)
_ORIGIN_RE: Final = re.compile(r"\S+ [0-9]{1,20} [0-9]{1,20} \S+ \S+ \S+", re.ASCII)
# RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4..256, pwd 22..256 chars.
_ICE_UFRAG_RE: Final = re.compile(r"[A-Za-z0-9+/]{4,256}", re.ASCII)
_ICE_PWD_RE: Final = re.compile(r"[A-Za-z0-9+/]{22,256}", re.ASCII)
# RFC 8122 §5: fingerprint = 2UHEX *(":" 2UHEX); lower case is tolerated on input.
_FINGERPRINT_RE: Final = re.compile(
    r"([!#$%&'*+\-.0-9A-Za-z^_`{|}~]+) +([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*)", re.ASCII
)
_RTPMAP_RE: Final = re.compile(
    r"([0-9]{1,3}) +([^/ ]+)/([0-9]{1,10})(?:/([0-9]{1,10}))? *", re.ASCII
)
_FMTP_RE: Final = re.compile(r"([0-9]{1,3})(?: +(.*))?", re.ASCII | re.DOTALL)
_RTCP_FB_RE: Final = re.compile(r"(\*|[0-9]{1,3}) +(\S.*)", re.ASCII | re.DOTALL)
_EXTMAP_RE: Final = re.compile(
    r"([0-9]{1,5})(?:/(?:sendrecv|sendonly|recvonly|inactive))? +(\S+)(?: .*)?",
    re.ASCII | re.DOTALL,
)
_SSRC_RE: Final = re.compile(r"([0-9]{1,10}) +([^:]+)(?::(.*))?", re.ASCII | re.DOTALL)

# RFC 8866 §5 fixes which line types exist and where; anything else is refused (§5 allows
# a parser to reject a description containing a type letter it does not understand).
_SESSION_TYPES: Final = frozenset("vosiuepcbtrzka")
_MEDIA_TYPES: Final = frozenset("icbka")
_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")
# RFC 3264 §6.1: the answer's direction is the offer's, seen from the other side.
_ANSWER_DIRECTION: Final = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
_MAX_SSRC: Final = 0xFFFF_FFFF
# JSEP (RFC 8829 §5.2.1): sess-id fits a signed 64-bit integer and is below 2**63 - 1.
_MAX_SESSION_ID: Final = 2**63 - 2
# Answer-side Opus parameters (RFC 7587 §6.1): 10 ms minimum packet time, and we can use
# in-band FEC when decoding.
_OPUS_ANSWER_FMTP: Final = "minptime=10;useinbandfec=1"
# RFC 8445 §5.1.2.1 priority inputs: host type preference; RTP is component 1.
_HOST_TYPE_PREFERENCE: Final = 126
_COMPONENT_ID: Final = 1
_MAX_LOCAL_PREFERENCE: Final = 65535


def _bad(message: str) -> SdpError:
    return SdpError("bad_sdp", message)


def _unsupported(message: str) -> SdpError:
    return SdpError("unsupported", message)


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


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
    if not _ICE_UFRAG_RE.fullmatch(value):
        raise ValueError(f"ICE ufrag must be 4-256 ice-chars (RFC 8839 §5.4): {value!r}")


def _check_pwd(_: object, __: object, value: str) -> None:
    if not _ICE_PWD_RE.fullmatch(value):
        raise ValueError("ICE password must be 22-256 ice-chars (RFC 8839 §5.4)")


def _check_sha256(_: object, __: object, value: str) -> None:
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}", value, re.ASCII):
        raise ValueError(f"not a colon-separated SHA-256 fingerprint: {value!r}")


def _check_candidates(_: object, __: object, value: tuple[tuple[str, int], ...]) -> None:
    if not value:
        raise ValueError("an ICE-lite answer needs at least one host candidate")
    if len(value) > _MAX_LOCAL_PREFERENCE:
        raise ValueError("too many candidates")
    for ip, port in value:
        ipaddress.ip_address(ip)  # raises ValueError
        if not 1 <= port <= 65535:
            raise ValueError(f"candidate port out of range: {port}")


def _check_ssrc(_: object, __: object, value: int) -> None:
    if not 0 <= value <= _MAX_SSRC:
        raise ValueError(f"SSRC out of range: {value}")


def _check_session_id(_: object, __: object, value: int) -> None:
    if not 0 <= value <= _MAX_SESSION_ID:
        raise ValueError(f"session id out of range (RFC 8829 §5.2.1): {value}")


def _check_token(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    # msid-id is 1*64 token-char (RFC 8830 §3); we hold the CNAME to the same rule so it
    # can never break an a=ssrc line.
    if len(value) > 64 or not _TOKEN_RE.fullmatch(value):
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


# --------------------------------------------------------------------------------------
# Lexing (RFC 8866 §5)
# --------------------------------------------------------------------------------------


@final
@attrs.frozen
class _Section:
    """One session- or media-level block of lines. ``kind`` is None for the session."""

    kind: str | None
    port: int
    proto: str
    fmts: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]
    other_lines: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.attributes if key == name]

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.attributes)

    def single(self, name: str) -> str | None:
        """Value of an attribute that may appear at most once; repeats must agree."""
        values = set(self.values(name))
        if len(values) > 1:
            raise _bad(f"conflicting a={name} lines")
        return values.pop() if values else None


def _lex(sdp: str) -> tuple[_Section, list[_Section]]:
    """Split an SDP text into its session part and media sections, checking syntax."""
    if len(sdp) > MAX_SDP_CHARS:
        raise _bad("session description too large")
    # RFC 8866 §5: lines end with CRLF, but parsers should accept a bare LF too.
    lines = sdp.split("\n")
    while lines and lines[-1] in ("", "\r"):
        lines.pop()
    if not lines:
        raise _bad("empty session description")
    if lines[0].removesuffix("\r") != "v=0":
        raise _bad("a session description starts with v=0 (RFC 8866 §5.1)")

    blocks: list[tuple[str | None, str, list[tuple[str, str]]]] = [(None, "", [])]
    for raw in lines:
        line = raw.removesuffix("\r")
        if "\r" in line or "\x00" in line:
            raise _bad("CR or NUL inside an SDP line")
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise _bad(f"not a <type>=<value> line: {line[:80]!r}")
        kind, value = match.group(1), match.group(2)
        if kind == "m":
            blocks.append(("m", value, []))
            continue
        allowed = _SESSION_TYPES if blocks[-1][0] is None else _MEDIA_TYPES
        if kind not in allowed:
            raise _bad(f"unexpected {kind}= line (RFC 8866 §5)")
        blocks[-1][2].append((kind, value))

    session = _section(None, "", blocks[0][2])
    for kind in "ost":
        if not any(k == kind for k, _ in session.other_lines):
            raise _bad(f"missing {kind}= line (RFC 8866 §5)")
    for kind in "vos":
        if sum(k == kind for k, _ in session.other_lines) > 1:
            raise _bad(f"repeated {kind}= line (RFC 8866 §5)")
    origin = next(v for k, v in session.other_lines if k == "o")
    if not _ORIGIN_RE.fullmatch(origin):
        raise _bad("malformed o= line (RFC 8866 §5.2)")
    return session, [_section("m", m_value, body) for _, m_value, body in blocks[1:]]


def _section(kind: str | None, m_value: str, body: list[tuple[str, str]]) -> _Section:
    attributes: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    for line_type, value in body:
        if line_type != "a":
            others.append((line_type, value))
            continue
        # RFC 8866 §5.13: a=<attribute-name>[:<attribute-value>]
        name, _, attr_value = value.partition(":")
        if not _TOKEN_RE.fullmatch(name):
            raise _bad(f"malformed attribute name: {name[:40]!r}")
        attributes.append((name, attr_value))
    if kind is None:
        return _Section(None, 0, "", (), tuple(attributes), tuple(others))

    # RFC 8866 §5.14: m=<media> <port>[/<number of ports>] <proto> <fmt> ...
    fields = [field for field in m_value.split(" ") if field]
    if len(fields) < 4:
        raise _bad(f"malformed m= line: {m_value[:80]!r}")
    media, port_text, proto, *fmts = fields
    port_match = _PORT_RE.fullmatch(port_text)
    if (
        not _TOKEN_RE.fullmatch(media)
        or port_match is None
        or int(port_match.group(1)) > 65535
        or not _PROTO_RE.fullmatch(proto)
        or not all(_TOKEN_RE.fullmatch(fmt) for fmt in fmts)
    ):
        raise _bad(f"malformed m= line: {m_value[:80]!r}")
    return _Section(
        media.lower(),
        int(port_match.group(1)),
        proto,
        tuple(fmts),
        tuple(attributes),
        tuple(others),
    )


# --------------------------------------------------------------------------------------
# Offer
# --------------------------------------------------------------------------------------


def parse_offer(sdp: str) -> AudioOffer:
    """Parse a WebRTC offer and extract what an audio-only ICE-lite answerer needs.

    Raises :class:`~sessions.webrtc.errors.SdpError` (see the module docstring for codes).
    """
    session, media = _lex(sdp)

    # RFC 8829 §5.2.1: every m= section of a JSEP offer carries a unique a=mid.
    mids: list[str] = []
    for section in media:
        mid = section.single("mid")
        if mid is None:
            raise _unsupported("every m= section needs an a=mid (RFC 8829 §5.2.1)")
        if not _TOKEN_RE.fullmatch(mid):
            raise _bad(f"malformed a=mid: {mid[:40]!r}")
        if mid in mids:
            raise _bad(f"duplicate a=mid:{mid} (RFC 5888 §4)")
        mids.append(mid)

    bundle_of = _bundle_groups(session, mids)
    audio_index = _choose_audio(media, mids, bundle_of)
    audio = media[audio_index]
    audio_mid = mids[audio_index]
    bundle = bundle_of.get(audio_mid, ())

    # RFC 8445 §6.1.1 / RFC 8839 §5.3: two ICE-lite agents cannot run connectivity checks.
    if session.has("ice-lite"):
        raise _unsupported("the offerer is ICE-lite; Parley is ICE-lite too")

    # Where transport-level attributes may live (RFC 8843 §7, RFC 8839 §5.4, RFC 8122 §5).
    media_chain: list[_Section] = [audio]
    if bundle and bundle[0] != audio_mid:
        media_chain.append(media[mids.index(bundle[0])])
    chain = [*media_chain, session]

    ice_ufrag = _first_single(chain, "ice-ufrag")
    ice_pwd = _first_single(chain, "ice-pwd")
    if ice_ufrag is None or ice_pwd is None:
        raise _bad("missing a=ice-ufrag or a=ice-pwd (RFC 8839 §5.4)")
    if not _ICE_UFRAG_RE.fullmatch(ice_ufrag) or not _ICE_PWD_RE.fullmatch(ice_pwd):
        raise _bad("malformed a=ice-ufrag or a=ice-pwd (RFC 8839 §5.4)")
    ice_options = _ice_options(chain)
    fingerprint = _fingerprint(chain)
    setup = _setup(chain)

    # RFC 8829 §5.1.1 / RFC 5761 §5.1.1: we only receive RTCP on the RTP port.
    if not any(section.has("rtcp-mux") for section in media_chain):
        raise _unsupported("the audio section does not offer a=rtcp-mux (RFC 5761)")

    rtpmap = _rtpmap(audio)
    opus_pt = _opus_pt(audio, rtpmap)
    if opus_pt is None:  # _choose_audio already checked; keeps the type checker happy
        raise SdpError("no_common_codec", "opus/48000/2 not offered (RFC 7587 §7)")
    telephone_event_pt = next(
        (
            pt
            for pt in _payload_types(audio)
            if rtpmap.get(pt, ("", 0, ""))[:2] == ("telephone-event", 48000)
        ),
        None,
    )
    ssrc, cname, ssrc_msid = _ssrc(audio)
    # RFC 8830 §3: a track may be in several streams (several a=msid lines); keep the first.
    msid = next((" ".join(v.split()) for v in audio.values("msid") if v.strip()), ssrc_msid)

    rejected = [(i, section) for i, section in enumerate(media) if i != audio_index]
    return AudioOffer(
        mid=audio_mid,
        ice_ufrag=ice_ufrag,
        ice_pwd=ice_pwd,
        ice_options=ice_options,
        fingerprint=fingerprint,
        setup=setup,
        opus_pt=opus_pt,
        opus_fmtp=_fmtp(audio, opus_pt),
        telephone_event_pt=telephone_event_pt,
        rtcp_mux=True,
        rtcp_fb=_rtcp_fb(audio, opus_pt),
        extmaps=_extmaps(audio, session),
        ssrc=ssrc,
        cname=cname,
        msid=msid,
        bundle_mids=bundle,
        other_mids=tuple((mids[i], section.kind or "") for i, section in rejected),
        candidates=tuple(
            value.strip()
            for value in next(
                (s.values("candidate") for s in media_chain if s.has("candidate")), []
            )
        ),
        m_line_order=tuple(mids),
        direction=_direction(audio, session),
        other_formats=tuple((mids[i], section.proto, section.fmts) for i, section in rejected),
    )


def _bundle_groups(session: _Section, mids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Map each bundled mid to its BUNDLE group (RFC 8843 §7, RFC 5888 §5)."""
    groups: dict[str, tuple[str, ...]] = {}
    for value in session.values("group"):
        semantics, *members = [part for part in value.split(" ") if part] or [""]
        if semantics.upper() != "BUNDLE" or not members:
            continue  # other semantics (LS, FID, ...) do not concern us
        for mid in members:
            if mid not in mids:
                raise _bad(f"a=group:BUNDLE names unknown mid {mid[:40]!r} (RFC 5888 §5)")
            if mid in groups:
                raise _bad(f"mid {mid[:40]!r} is in two BUNDLE groups (RFC 8843 §7)")
            groups[mid] = tuple(members)
    return groups


def _choose_audio(
    media: Sequence[_Section], mids: Sequence[str], bundle_of: dict[str, tuple[str, ...]]
) -> int:
    """Index of the first usable audio section; raise the most specific error if none."""
    saw_audio = saw_bundle_only = saw_profile = False
    for index, section in enumerate(media):
        if section.kind != "audio":
            continue
        saw_audio = True
        # RFC 3264 §8.2: port 0 rejects a stream, unless RFC 8843 §6 bundle-only applies.
        if section.port == 0:
            if not section.has("bundle-only"):
                continue
            if mids[index] not in bundle_of:
                saw_bundle_only = True
                continue
        if section.proto != _AUDIO_PROTO:
            continue
        saw_profile = True
        if _opus_pt(section, _rtpmap(section)) is not None:
            return index
    if saw_profile:
        raise SdpError("no_common_codec", "the audio section lacks opus/48000/2 (RFC 7587 §7)")
    if saw_bundle_only:
        raise _unsupported("bundle-only audio outside any BUNDLE group (RFC 8843 §6)")
    if saw_audio:
        # Either every audio section is rejected, or none uses DTLS-SRTP.
        if any(s.kind == "audio" and s.port != 0 for s in media):
            raise _unsupported(f"audio must use {_AUDIO_PROTO} (RFC 8829 §5.1.2)")
        raise SdpError("no_audio", "the audio m= section is rejected (port 0)")
    raise SdpError("no_audio", "the offer has no audio m= section")


def _first_single(chain: Iterable[_Section], name: str) -> str | None:
    for section in chain:
        value = section.single(name)
        if value is not None:
            return value.strip()
    return None


def _ice_options(chain: Iterable[_Section]) -> tuple[str, ...]:
    for section in chain:
        if section.has("ice-options"):
            tokens = " ".join(section.values("ice-options")).split()
            return tuple(dict.fromkeys(tokens))
    return ()


def _fingerprint(chain: Iterable[_Section]) -> tuple[str, str]:
    """Pick one certificate fingerprint (RFC 8122 §5, RFC 8842 §5).

    Media-level lines replace session-level ones. A line with a supported hash but the
    wrong digest length is malformed; hashes we cannot verify are skipped.
    """
    lines = next((s.values("fingerprint") for s in chain if s.has("fingerprint")), None)
    if not lines:
        raise _bad("missing a=fingerprint (RFC 8842 §5)")
    found: dict[str, str] = {}
    for line in lines:
        match = _FINGERPRINT_RE.fullmatch(line.strip())
        if match is None:
            raise _bad(f"malformed a=fingerprint: {line[:120]!r}")
        name, digest = match.group(1).lower(), match.group(2).upper()
        size = _FINGERPRINT_HASHES.get(name)
        if size is None:
            continue
        if len(digest) != 3 * size - 1:
            raise _bad(f"a=fingerprint {name} has the wrong length")
        found.setdefault(name, digest)
    for name in _FINGERPRINT_HASHES:
        if name in found:
            return name, found[name]
    raise _unsupported("no a=fingerprint with sha-256, sha-384, sha-512 or sha-1")


def _setup(chain: Iterable[_Section]) -> str:
    """Offered DTLS role (RFC 4145 §4, RFC 8842 §5.2); we must end up DTLS server."""
    value = _first_single(chain, "setup")
    if value is None:
        raise _bad("missing a=setup (RFC 8842 §5)")
    value = value.lower()
    if value not in ("actpass", "active", "passive", "holdconn"):
        raise _bad(f"malformed a=setup: {value[:40]!r}")
    if value in ("passive", "holdconn"):
        raise _unsupported(f"a=setup:{value}: Parley must be the DTLS server (RFC 8842 §5.3)")
    return value


def _payload_types(section: _Section) -> list[int]:
    """The m= line formats as RTP payload types (RFC 8866 §5.14, RFC 3551 §6)."""
    types: list[int] = []
    for fmt in section.fmts:
        if not fmt.isascii() or not fmt.isdigit() or len(fmt) > 3 or int(fmt) > 127:
            raise _bad(f"RTP format is not a payload type: {fmt[:20]!r}")
        types.append(int(fmt))
    return types


def _rtpmap(section: _Section) -> dict[int, tuple[str, int, str]]:
    """pt -> (lower-cased encoding name, clock rate, channels or "") (RFC 8866 §6.6).

    Malformed or repeated lines are skipped: only the Opus mapping matters to us.
    """
    mapping: dict[int, tuple[str, int, str]] = {}
    for value in section.values("rtpmap"):
        match = _RTPMAP_RE.fullmatch(value)
        if match is None:
            continue
        pt = int(match.group(1))
        mapping.setdefault(pt, (match.group(2).lower(), int(match.group(3)), match.group(4) or ""))
    return mapping


def _opus_pt(section: _Section, rtpmap: dict[int, tuple[str, int, str]]) -> int | None:
    """First payload type mapped to opus/48000/2 (RFC 7587 §7), in offer preference."""
    for pt in _payload_types(section):
        if rtpmap.get(pt) == ("opus", 48000, "2"):
            return pt
    return None


def _fmtp(section: _Section, pt: int) -> dict[str, str]:
    """Format parameters for ``pt`` as a dict with lower-cased names (RFC 7587 §6.1)."""
    params: dict[str, str] = {}
    for value in section.values("fmtp"):
        match = _FMTP_RE.fullmatch(value)
        if match is None or int(match.group(1)) != pt:
            continue
        for item in (match.group(2) or "").split(";"):
            key, sep, param = item.partition("=")
            key = key.strip().lower()
            if sep and key:
                params.setdefault(key, param.strip())
    return params


def _rtcp_fb(section: _Section, pt: int) -> tuple[str, ...]:
    """``a=rtcp-fb`` values for ``pt`` or the ``*`` wildcard (RFC 4585 §4.2)."""
    found: list[str] = []
    for value in section.values("rtcp-fb"):
        match = _RTCP_FB_RE.fullmatch(value)
        if match is None:
            continue
        target = match.group(1)
        if target == "*" or int(target) == pt:
            found.append(" ".join(match.group(2).split()))
    return tuple(dict.fromkeys(found))


def _extmaps(audio: _Section, session: _Section) -> tuple[tuple[int, str], ...]:
    """Offered header extensions (RFC 8285 §5); media-level ids win over session-level."""
    extmaps: dict[int, str] = {}
    for section in (audio, session):
        for value in section.values("extmap"):
            match = _EXTMAP_RE.fullmatch(value.strip())
            if match is None:
                continue
            ext_id = int(match.group(1))
            if 1 <= ext_id <= 255:
                extmaps.setdefault(ext_id, match.group(2))
    return tuple(extmaps.items())


def _ssrc(section: _Section) -> tuple[int | None, str | None, str | None]:
    """First offered SSRC with its cname and legacy msid (RFC 5576 §4.1)."""
    ssrc: int | None = None
    cname: str | None = None
    msid: str | None = None
    for value in section.values("ssrc"):
        match = _SSRC_RE.fullmatch(value.strip())
        if match is None or int(match.group(1)) > _MAX_SSRC:
            continue
        if ssrc is None:
            ssrc = int(match.group(1))
        if int(match.group(1)) != ssrc:
            continue
        name, attr_value = match.group(2).strip().lower(), (match.group(3) or "").strip()
        if name == "cname" and cname is None and attr_value:
            cname = attr_value
        elif name == "msid" and msid is None and attr_value:
            msid = " ".join(attr_value.split())
    return ssrc, cname, msid


def _direction(audio: _Section, session: _Section) -> str:
    """Media direction (RFC 8866 §6.7): media level, else session level, else sendrecv."""
    for section in (audio, session):
        present = {name for name, _ in section.attributes if name in _DIRECTIONS}
        if len(present) > 1:
            raise _bad("conflicting direction attributes")
        if present:
            return present.pop()
    return "sendrecv"


# --------------------------------------------------------------------------------------
# Answer
# --------------------------------------------------------------------------------------


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
        local_preference = _MAX_LOCAL_PREFERENCE - index
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
        raise _unsupported(f"a=setup:{offer.setup} would make Parley the DTLS client")
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
    return _AUDIO_PROTO, ("0",)


def _audio_section(offer: AudioOffer, params: AnswerParams) -> list[str]:
    pts = [offer.opus_pt]
    if offer.telephone_event_pt is not None:
        pts.append(offer.telephone_event_pt)
    lines = [
        # RFC 8829 §5.3.1: port 9 and 0.0.0.0 until ICE picks the real path.
        f"m=audio 9 {_AUDIO_PROTO} {' '.join(map(str, pts))}",
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
