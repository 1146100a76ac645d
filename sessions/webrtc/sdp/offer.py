"""Reading a WebRTC offer: the one audio section we answer and its transport (see
:mod:`sessions.webrtc.sdp` for the error codes)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

from sessions.webrtc.errors import SdpError
from sessions.webrtc.sdp.grammar import (
    AUDIO_PROTO,
    ICE_PWD_RE,
    ICE_UFRAG_RE,
    MAX_SSRC,
    TOKEN_RE,
    bad,
    unsupported,
)
from sessions.webrtc.sdp.lexer import Section, lex
from sessions.webrtc.sdp.values import AudioOffer

__all__ = ["parse_offer"]

# Hashes we can verify a DTLS certificate with, in order of preference, and their digest
# sizes in bytes (RFC 8122 §5; RFC 8842 §5 requires at least one fingerprint line).
_FINGERPRINT_HASHES: Final[dict[str, int]] = {
    "sha-256": 32,
    "sha-384": 48,
    "sha-512": 64,
    "sha-1": 20,
}
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

_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")


def parse_offer(sdp: str) -> AudioOffer:
    """Parse a WebRTC offer and extract what an audio-only ICE-lite answerer needs.

    Raises :class:`~sessions.webrtc.errors.SdpError` (see :mod:`sessions.webrtc.sdp` for codes).
    """
    session, media = lex(sdp)

    # RFC 8829 §5.2.1: every m= section of a JSEP offer carries a unique a=mid.
    mids: list[str] = []
    for section in media:
        mid = section.single("mid")
        if mid is None:
            raise unsupported("every m= section needs an a=mid (RFC 8829 §5.2.1)")
        if not TOKEN_RE.fullmatch(mid):
            raise bad(f"malformed a=mid: {mid[:40]!r}")
        if mid in mids:
            raise bad(f"duplicate a=mid:{mid} (RFC 5888 §4)")
        mids.append(mid)

    bundle_of = _bundle_groups(session, mids)
    audio_index = _choose_audio(media, mids, bundle_of)
    audio = media[audio_index]
    audio_mid = mids[audio_index]
    bundle = bundle_of.get(audio_mid, ())

    # RFC 8445 §6.1.1 / RFC 8839 §5.3: two ICE-lite agents cannot run connectivity checks.
    if session.has("ice-lite"):
        raise unsupported("the offerer is ICE-lite; Parley is ICE-lite too")

    # Where transport-level attributes may live (RFC 8843 §7, RFC 8839 §5.4, RFC 8122 §5).
    media_chain: list[Section] = [audio]
    if bundle and bundle[0] != audio_mid:
        media_chain.append(media[mids.index(bundle[0])])
    chain = [*media_chain, session]

    ice_ufrag = _first_single(chain, "ice-ufrag")
    ice_pwd = _first_single(chain, "ice-pwd")
    if ice_ufrag is None or ice_pwd is None:
        raise bad("missing a=ice-ufrag or a=ice-pwd (RFC 8839 §5.4)")
    if not ICE_UFRAG_RE.fullmatch(ice_ufrag) or not ICE_PWD_RE.fullmatch(ice_pwd):
        raise bad("malformed a=ice-ufrag or a=ice-pwd (RFC 8839 §5.4)")
    ice_options = _ice_options(chain)
    fingerprint = _fingerprint(chain)
    setup = _setup(chain)

    # RFC 8829 §5.1.1 / RFC 5761 §5.1.1: we only receive RTCP on the RTP port.
    if not any(section.has("rtcp-mux") for section in media_chain):
        raise unsupported("the audio section does not offer a=rtcp-mux (RFC 5761)")

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


def _bundle_groups(session: Section, mids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Map each bundled mid to its BUNDLE group (RFC 8843 §7, RFC 5888 §5)."""
    groups: dict[str, tuple[str, ...]] = {}
    for value in session.values("group"):
        semantics, *members = [part for part in value.split(" ") if part] or [""]
        if semantics.upper() != "BUNDLE" or not members:
            continue  # other semantics (LS, FID, ...) do not concern us
        for mid in members:
            if mid not in mids:
                raise bad(f"a=group:BUNDLE names unknown mid {mid[:40]!r} (RFC 5888 §5)")
            if mid in groups:
                raise bad(f"mid {mid[:40]!r} is in two BUNDLE groups (RFC 8843 §7)")
            groups[mid] = tuple(members)
    return groups


def _choose_audio(
    media: Sequence[Section], mids: Sequence[str], bundle_of: dict[str, tuple[str, ...]]
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
        if section.proto != AUDIO_PROTO:
            continue
        saw_profile = True
        if _opus_pt(section, _rtpmap(section)) is not None:
            return index
    if saw_profile:
        raise SdpError("no_common_codec", "the audio section lacks opus/48000/2 (RFC 7587 §7)")
    if saw_bundle_only:
        raise unsupported("bundle-only audio outside any BUNDLE group (RFC 8843 §6)")
    if saw_audio:
        # Either every audio section is rejected, or none uses DTLS-SRTP.
        if any(s.kind == "audio" and s.port != 0 for s in media):
            raise unsupported(f"audio must use {AUDIO_PROTO} (RFC 8829 §5.1.2)")
        raise SdpError("no_audio", "the audio m= section is rejected (port 0)")
    raise SdpError("no_audio", "the offer has no audio m= section")


def _first_single(chain: Iterable[Section], name: str) -> str | None:
    for section in chain:
        value = section.single(name)
        if value is not None:
            return value.strip()
    return None


def _ice_options(chain: Iterable[Section]) -> tuple[str, ...]:
    for section in chain:
        if section.has("ice-options"):
            tokens = " ".join(section.values("ice-options")).split()
            return tuple(dict.fromkeys(tokens))
    return ()


def _fingerprint(chain: Iterable[Section]) -> tuple[str, str]:
    """Pick one certificate fingerprint (RFC 8122 §5, RFC 8842 §5).

    Media-level lines replace session-level ones. A line with a supported hash but the
    wrong digest length is malformed; hashes we cannot verify are skipped.
    """
    lines = next((s.values("fingerprint") for s in chain if s.has("fingerprint")), None)
    if not lines:
        raise bad("missing a=fingerprint (RFC 8842 §5)")
    found: dict[str, str] = {}
    for line in lines:
        match = _FINGERPRINT_RE.fullmatch(line.strip())
        if match is None:
            raise bad(f"malformed a=fingerprint: {line[:120]!r}")
        name, digest = match.group(1).lower(), match.group(2).upper()
        size = _FINGERPRINT_HASHES.get(name)
        if size is None:
            continue
        if len(digest) != 3 * size - 1:
            raise bad(f"a=fingerprint {name} has the wrong length")
        found.setdefault(name, digest)
    for name in _FINGERPRINT_HASHES:
        if name in found:
            return name, found[name]
    raise unsupported("no a=fingerprint with sha-256, sha-384, sha-512 or sha-1")


def _setup(chain: Iterable[Section]) -> str:
    """Offered DTLS role (RFC 4145 §4, RFC 8842 §5.2); we must end up DTLS server."""
    value = _first_single(chain, "setup")
    if value is None:
        raise bad("missing a=setup (RFC 8842 §5)")
    value = value.lower()
    if value not in ("actpass", "active", "passive", "holdconn"):
        raise bad(f"malformed a=setup: {value[:40]!r}")
    if value in ("passive", "holdconn"):
        raise unsupported(f"a=setup:{value}: Parley must be the DTLS server (RFC 8842 §5.3)")
    return value


def _payload_types(section: Section) -> list[int]:
    """The m= line formats as RTP payload types (RFC 8866 §5.14, RFC 3551 §6)."""
    types: list[int] = []
    for fmt in section.fmts:
        if not fmt.isascii() or not fmt.isdigit() or len(fmt) > 3 or int(fmt) > 127:
            raise bad(f"RTP format is not a payload type: {fmt[:20]!r}")
        types.append(int(fmt))
    return types


def _rtpmap(section: Section) -> dict[int, tuple[str, int, str]]:
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


def _opus_pt(section: Section, rtpmap: dict[int, tuple[str, int, str]]) -> int | None:
    """First payload type mapped to opus/48000/2 (RFC 7587 §7), in offer preference."""
    for pt in _payload_types(section):
        if rtpmap.get(pt) == ("opus", 48000, "2"):
            return pt
    return None


def _fmtp(section: Section, pt: int) -> dict[str, str]:
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


def _rtcp_fb(section: Section, pt: int) -> tuple[str, ...]:
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


def _extmaps(audio: Section, session: Section) -> tuple[tuple[int, str], ...]:
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


def _ssrc(section: Section) -> tuple[int | None, str | None, str | None]:
    """First offered SSRC with its cname and legacy msid (RFC 5576 §4.1)."""
    ssrc: int | None = None
    cname: str | None = None
    msid: str | None = None
    for value in section.values("ssrc"):
        match = _SSRC_RE.fullmatch(value.strip())
        if match is None or int(match.group(1)) > MAX_SSRC:
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


def _direction(audio: Section, session: Section) -> str:
    """Media direction (RFC 8866 §6.7): media level, else session level, else sendrecv."""
    for section in (audio, session):
        present = {name for name, _ in section.attributes if name in _DIRECTIONS}
        if len(present) > 1:
            raise bad("conflicting direction attributes")
        if present:
            return present.pop()
    return "sendrecv"
