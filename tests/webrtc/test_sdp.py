"""Tests for sessions.webrtc.sdp: offers from browser-shaped samples and aiortc, answers
accepted by aiortc, every error code, and property tests on hostile input."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiortc
import attrs
import pytest
from aiortc import sdp as aiortc_sdp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions.webrtc.errors import SdpError
from sessions.webrtc.sdp import MAX_SDP_CHARS, AnswerParams, AudioOffer, parse_offer, write_answer

SAMPLES = Path(__file__).parent / "sdp_samples"
CHROMIUM = "chromium_audio_video_data.sdp"
FIREFOX = "firefox_audio_data.sdp"
SAFARI = "safari_video_audio.sdp"

PARAMS = AnswerParams(
    ice_ufrag="pRly",
    ice_pwd="Zx8Lq2Vn7Wc4Rt1Ym6Kp3Hs9",
    fingerprint_sha256=":".join(f"{byte:02x}" for byte in range(0x10, 0x30)),
    candidates=(("127.0.0.1", 40000), ("::1", 40000), ("127.0.0.1", 40001)),
    ssrc=0xDEADBEEF,
    cname="parley-test",
    session_id=4_611_686_018_427_387_904,
)


def load(name: str) -> str:
    """A sample as a browser sends it: CRLF line endings."""
    return (SAMPLES / name).read_text(encoding="utf-8").replace("\n", "\r\n")


def sections(sdp: str) -> list[list[str]]:
    """Session part then one list of lines per m= section."""
    parts: list[list[str]] = [[]]
    for line in sdp.split("\r\n"):
        if line.startswith("m="):
            parts.append([])
        if line:
            parts[-1].append(line)
    return parts


def join(parts: list[list[str]]) -> str:
    return "".join(line + "\r\n" for part in parts for line in part)


def edit(sdp: str, pattern: str, replacement: str | None) -> str:
    """Replace (or with None, drop) every line fully matching ``pattern``."""
    out = []
    for line in sdp.split("\r\n"):
        if re.fullmatch(pattern, line):
            if replacement is None:
                continue
            line = re.sub(pattern, replacement, line)
        out.append(line)
    return "\r\n".join(out)


def answer_sections(answer: str) -> list[list[str]]:
    assert answer.endswith("\r\n")
    assert "\n" not in answer.replace("\r\n", "")
    return sections(answer)


# --------------------------------------------------------------------------------------
# Offers
# --------------------------------------------------------------------------------------


def test_chromium_offer() -> None:
    offer = parse_offer(load(CHROMIUM))
    assert offer.mid == "0"
    assert offer.ice_ufrag == "Qx7v"
    assert offer.ice_pwd == "r2BfKq9Lm0Zc4TnWy8Hd1sPe"
    assert offer.ice_options == ("trickle",)
    assert offer.fingerprint == (
        "sha-256",
        "C4:7B:E0:62:21:BE:E0:B7:D9:08:55:48:56:ED:09:8C:"
        "DA:15:0D:9E:F3:7D:03:7C:C2:19:0B:38:7E:B4:3D:80",
    )
    assert offer.setup == "actpass"
    assert offer.opus_pt == 111
    assert offer.opus_fmtp == {"minptime": "10", "useinbandfec": "1"}
    assert offer.telephone_event_pt == 110  # the /48000 one, not 126 (/8000)
    assert offer.rtcp_mux is True
    assert offer.rtcp_fb == ("transport-cc",)
    assert offer.extmaps == (
        (1, "urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
        (2, "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"),
        (3, "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"),
        (4, "urn:ietf:params:rtp-hdrext:sdes:mid"),
    )
    assert offer.ssrc == 1820135495
    assert offer.cname == "Vn3kQp8sLr2wXy6T"
    assert offer.msid == (
        "a2ec13b2-eb1d-401d-a338-8d312a9dc3c5 03fe7452-28fe-4d0e-aa70-395c8bcb775a"
    )
    assert offer.bundle_mids == ("0", "1", "2")
    assert offer.other_mids == (("1", "video"), ("2", "application"))
    assert len(offer.candidates) == 3
    assert offer.candidates[1].startswith("1093467721 1 udp 1686052607 198.51.100.23 54211")
    assert offer.m_line_order == ("0", "1", "2")
    assert offer.direction == "sendrecv"
    assert offer.other_formats == (
        ("1", "UDP/TLS/RTP/SAVPF", ("96", "97", "102", "103", "45", "46", "98", "99")),
        ("2", "UDP/DTLS/SCTP", ("webrtc-datachannel",)),
    )


def test_firefox_offer_uses_session_level_fingerprint() -> None:
    offer = parse_offer(load(FIREFOX))
    assert offer.mid == "0"
    assert offer.ice_ufrag == "8c3d91fa"
    assert offer.ice_pwd == "5f0c2a9e71b84d36a0e4c8b1f2d7e963"
    assert offer.ice_options == ("trickle",)  # session level
    assert offer.fingerprint[0] == "sha-256"  # session level
    assert offer.fingerprint[1].startswith("9E:C1:CD:75")
    assert offer.setup == "actpass"
    assert offer.opus_pt == 109
    assert offer.opus_fmtp == {"maxplaybackrate": "48000", "stereo": "1", "useinbandfec": "1"}
    assert offer.telephone_event_pt is None  # only telephone-event/8000 offered
    assert offer.rtcp_fb == ()
    assert offer.extmaps == (
        (1, "urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
        (2, "urn:ietf:params:rtp-hdrext:csrc-audio-level"),
        (3, "urn:ietf:params:rtp-hdrext:sdes:mid"),
    )
    assert offer.ssrc == 611306331
    assert offer.cname == "{5eb77b31-0f5b-4778-a98f-b4d62122fa36}"
    assert offer.msid == (
        "{12d53f93-8ada-40a3-aa01-9bbcd303149a} {33e2bc31-c788-4e0e-b021-a70cf65b989a}"
    )
    assert offer.bundle_mids == ("0", "1")
    assert offer.other_mids == (("1", "application"),)
    assert len(offer.candidates) == 2
    assert offer.m_line_order == ("0", "1")


def test_safari_offer_with_audio_second() -> None:
    offer = parse_offer(load(SAFARI))
    assert offer.mid == "1"
    assert offer.ice_ufrag == "d2Lk"
    assert offer.opus_pt == 111
    assert offer.telephone_event_pt == 110
    assert offer.ssrc == 1539774216
    assert offer.cname == "hP4mZ9tQ2wLc7RkX"
    assert offer.extmaps[0] == (14, "urn:ietf:params:rtp-hdrext:ssrc-audio-level")
    assert offer.bundle_mids == ("0", "1")
    assert offer.other_mids == (("0", "video"),)
    assert offer.candidates == ()  # gathered and trickled later
    assert offer.m_line_order == ("0", "1")


def test_bare_lf_line_endings_are_accepted() -> None:
    text = (SAMPLES / CHROMIUM).read_text(encoding="utf-8")
    assert "\r" not in text
    assert parse_offer(text) == parse_offer(load(CHROMIUM))


def test_transport_attributes_from_offerer_tagged_section() -> None:
    """A bundle-only audio section (port 0) takes ICE/DTLS attributes from the tagged one."""
    parts = sections(load(SAFARI))
    audio = parts[2]
    audio[0] = audio[0].replace("m=audio 9", "m=audio 0")
    parts[2] = [
        line
        for line in audio
        if not line.startswith(("a=ice-", "a=fingerprint", "a=setup", "a=rtcp-mux"))
    ]
    parts[2].insert(2, "a=bundle-only")
    offer = parse_offer(join(parts))
    assert offer.mid == "1"
    assert offer.ice_ufrag == "d2Lk"
    assert offer.fingerprint[1].startswith("98:97:EA")
    assert offer.setup == "actpass"


def test_fingerprint_choice_and_normalisation() -> None:
    sha1 = "20:18:c2:54:b9:bc:11:a6:17:8a:f0:2d:9f:de:85:f4:4f:da:42:f1"
    sha512 = ":".join(["ab"] * 64)
    text = edit(
        load(FIREFOX),
        r"a=fingerprint:.*",
        f"a=fingerprint:SHA-1 {sha1}\r\na=fingerprint:sha-512 {sha512}",
    )
    assert parse_offer(text).fingerprint == ("sha-512", sha512.upper())
    text = edit(load(FIREFOX), r"a=fingerprint:.*", f"a=fingerprint:SHA-1 {sha1}")
    assert parse_offer(text).fingerprint == ("sha-1", sha1.upper())


def test_offer_direction_is_mirrored() -> None:
    text = edit(load(FIREFOX), r"a=sendrecv", "a=sendonly")
    offer = parse_offer(text)
    assert offer.direction == "sendonly"
    assert "a=recvonly\r\n" in write_answer(offer, PARAMS)


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------


def test_answer_for_chromium_rejects_video_and_data() -> None:
    answer = write_answer(parse_offer(load(CHROMIUM)), PARAMS)
    session, audio, video, data = answer_sections(answer)
    assert session == [
        "v=0",
        f"o=- {PARAMS.session_id} 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=ice-lite",
        "a=group:BUNDLE 0",
        "a=msid-semantic:WMS parley",
    ]
    fingerprint = PARAMS.fingerprint_sha256.upper()
    assert audio == [
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 110",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=ice-ufrag:pRly",
        "a=ice-pwd:Zx8Lq2Vn7Wc4Rt1Ym6Kp3Hs9",
        f"a=fingerprint:sha-256 {fingerprint}",
        "a=setup:passive",
        "a=rtcp-mux",
        "a=sendrecv",
        "a=msid:parley agent",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:110 telephone-event/48000",
        f"a=ssrc:{0xDEADBEEF} cname:parley-test",
        # RFC 8445 §5.1.2.1: (2^24)*126 + (2^8)*(65535 - i) + (256 - 1)
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host",
        "a=candidate:2 1 udp 2130706175 ::1 40000 typ host",
        "a=candidate:1 1 udp 2130705919 127.0.0.1 40001 typ host",
        "a=end-of-candidates",
    ]
    assert video == [
        "m=video 0 UDP/TLS/RTP/SAVPF 96 97 102 103 45 46 98 99",
        "c=IN IP4 0.0.0.0",
        "a=mid:1",
    ]
    assert data == [
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=mid:2",
    ]
    # An independent SDP parser reads the same structure back.
    parsed = aiortc_sdp.SessionDescription.parse(answer)
    assert [(m.kind, m.port, m.rtp.muxId) for m in parsed.media] == [
        ("audio", 9, "0"),
        ("video", 0, "1"),
        ("application", 0, "2"),
    ]
    ice, dtls = parsed.media[0].ice, parsed.media[0].dtls
    assert ice is not None and ice.iceLite
    assert dtls is not None and dtls.role == "server"  # a=setup:passive: we are the DTLS server


def test_answer_mirrors_order_when_audio_is_not_first() -> None:
    answer = write_answer(parse_offer(load(SAFARI)), PARAMS)
    _, video, audio = answer_sections(answer)
    assert video[:3] == [
        "m=video 0 UDP/TLS/RTP/SAVPF 96 97 98 99 100 101 127 125",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
    ]
    assert audio[0] == "m=audio 9 UDP/TLS/RTP/SAVPF 111 110"
    assert "a=mid:1" in audio
    assert "a=group:BUNDLE 1\r\n" in answer


def test_answer_without_bundle_has_no_group() -> None:
    parts = sections(load(FIREFOX))
    parts[0] = [line for line in parts[0] if not line.startswith("a=group:")]
    offer = parse_offer(join(parts))
    assert offer.bundle_mids == ()
    assert "a=group" not in write_answer(offer, PARAMS)


def test_answer_refuses_passive_offer() -> None:
    offer = attrs.evolve(parse_offer(load(CHROMIUM)), setup="passive")
    with pytest.raises(SdpError) as info:
        write_answer(offer, PARAMS)
    assert info.value.code == "unsupported"


def test_hand_built_offer_without_formats() -> None:
    offer = attrs.evolve(parse_offer(load(CHROMIUM)), other_formats=())
    _, _, video, data = answer_sections(write_answer(offer, PARAMS))
    assert video[0] == "m=video 0 UDP/TLS/RTP/SAVPF 0"
    assert data[0] == "m=application 0 UDP/DTLS/SCTP webrtc-datachannel"
    broken = attrs.evolve(offer, m_line_order=("0", "1", "2", "3"))
    with pytest.raises(ValueError):
        write_answer(broken, PARAMS)


@pytest.mark.parametrize(
    "change",
    [
        {"ice_ufrag": "ab"},
        {"ice_pwd": "short"},
        {"fingerprint_sha256": "AB:CD"},
        {"candidates": ()},
        {"candidates": (("not-an-ip", 1),)},
        {"candidates": (("127.0.0.1", 0),)},
        {"ssrc": 2**32},
        {"cname": "has space"},
        {"session_id": 2**63},
        {"msid_track": ""},
    ],
)
def test_answer_params_are_validated(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        attrs.evolve(PARAMS, **change)


def test_aiortc_offer_and_answer_interop() -> None:
    """aiortc makes the offer; it must accept our answer as a real peer would."""

    async def exchange() -> None:
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        try:
            transceiver = pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())
            local = pc.localDescription
            assert local is not None
            offer = parse_offer(local.sdp)
            assert offer.mid == transceiver.mid == "0"
            assert offer.opus_pt == 96
            assert offer.fingerprint[0] == "sha-256"  # aiortc also offers sha-384/512
            assert offer.setup == "actpass"
            assert offer.bundle_mids == ("0",)
            assert offer.ssrc is not None and offer.cname
            assert offer.candidates  # aiortc gathers before returning
            assert offer.m_line_order == ("0",)

            answer = write_answer(offer, PARAMS)
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(answer, "answer"))
            assert pc.signalingState == "stable"
            assert transceiver.currentDirection == "sendrecv"
            ice = transceiver.receiver.transport.transport
            remote = [(c.ip, c.port, c.type) for c in ice.getRemoteCandidates()]
            assert remote == [(ip, port, "host") for ip, port in PARAMS.candidates]
        finally:
            await pc.close()

    asyncio.run(exchange())


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def drop_section(kind: str) -> Callable[[str], str]:
    def apply(sdp: str) -> str:
        return join([p for p in sections(sdp) if not p or not p[0].startswith(f"m={kind} ")])

    return apply


def set_session(line: str) -> Callable[[str], str]:
    def apply(sdp: str) -> str:
        parts = sections(sdp)
        parts[0].append(line)
        return join(parts)

    return apply


def sub(pattern: str, replacement: str | None) -> Callable[[str], str]:
    return lambda sdp: edit(sdp, pattern, replacement)


ERROR_CASES: list[tuple[str, str, Callable[[str], str]]] = [
    ("bad_sdp", "empty", lambda _: ""),
    ("bad_sdp", "not sdp", lambda _: "hello world"),
    ("bad_sdp", "wrong version", sub(r"v=0", "v=1")),
    ("bad_sdp", "no origin", sub(r"o=.*", None)),
    ("bad_sdp", "bad origin", sub(r"o=.*", "o=-")),
    ("bad_sdp", "no timing", sub(r"t=.*", None)),
    ("bad_sdp", "unknown line type", set_session("x=1")),
    ("bad_sdp", "no ice-ufrag", sub(r"a=ice-ufrag:.*", None)),
    ("bad_sdp", "no ice-pwd", sub(r"a=ice-pwd:.*", None)),
    ("bad_sdp", "short ice-ufrag", sub(r"a=ice-ufrag:.*", "a=ice-ufrag:ab")),
    ("bad_sdp", "no fingerprint", sub(r"a=fingerprint:.*", None)),
    ("bad_sdp", "garbled fingerprint", sub(r"a=fingerprint:.*", "a=fingerprint:sha-256 zz")),
    (
        "bad_sdp",
        "short fingerprint",
        sub(r"a=fingerprint:sha-256 C4:7B:(.*)", r"a=fingerprint:sha-256 \1"),
    ),
    ("bad_sdp", "no setup", sub(r"a=setup:.*", None)),
    ("bad_sdp", "bogus setup", sub(r"a=setup:.*", "a=setup:sideways")),
    ("bad_sdp", "duplicate mid", sub(r"a=mid:1", "a=mid:0")),
    ("bad_sdp", "conflicting ufrags", sub(r"(a=ice-ufrag:Qx7v)", r"\1\r\na=ice-ufrag:Other")),
    ("bad_sdp", "BUNDLE names unknown mid", sub(r"a=group:BUNDLE .*", "a=group:BUNDLE 0 9")),
    ("bad_sdp", "bad m= line", sub(r"m=audio .*", "m=audio nine UDP/TLS/RTP/SAVPF 111")),
    ("bad_sdp", "non-numeric RTP format", sub(r"(m=audio .*)", r"\1 x")),
    ("bad_sdp", "CR inside a line", sub(r"s=-", "s=a\rb")),
    ("bad_sdp", "too large", lambda sdp: sdp + "a=x:" + "y" * MAX_SDP_CHARS + "\r\n"),
    (
        "no_audio",
        "video and data only",
        lambda sdp: edit(drop_section("audio")(sdp), r"a=group:BUNDLE .*", "a=group:BUNDLE 1 2"),
    ),
    ("no_audio", "audio rejected", sub(r"m=audio 54211 (.*)", r"m=audio 0 \1")),
    ("no_common_codec", "no opus", sub(r"a=rtpmap:111 opus/48000/2", None)),
    (
        "no_common_codec",
        "mono opus",
        sub(r"a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus/48000/1"),
    ),
    (
        "no_common_codec",
        "opus not in m= line",
        sub(r"m=audio 54211 (.*) 111 (.*)", r"m=audio 54211 \1 \2"),
    ),
    ("unsupported", "setup passive", sub(r"a=setup:.*", "a=setup:passive")),
    ("unsupported", "setup holdconn", sub(r"a=setup:.*", "a=setup:holdconn")),
    ("unsupported", "no rtcp-mux", sub(r"a=rtcp-mux", None)),
    (
        "unsupported",
        "md5 fingerprint only",
        sub(r"a=fingerprint:sha-256 (.*)", r"a=fingerprint:md5 \1"),
    ),
    ("unsupported", "ICE-lite offerer", set_session("a=ice-lite")),
    (
        "unsupported",
        "plain RTP",
        sub(r"m=audio 54211 UDP/TLS/RTP/SAVPF (.*)", r"m=audio 54211 RTP/AVP \1"),
    ),
    ("unsupported", "no mid", lambda sdp: edit(edit(sdp, r"a=mid:0", None), r"a=group:.*", None)),
    (
        "unsupported",
        "bundle-only without BUNDLE",
        lambda sdp: edit(
            edit(sdp, r"m=audio 54211 (.*)", r"m=audio 0 \1\r\na=bundle-only"), r"a=group:.*", None
        ),
    ),
]


@pytest.mark.parametrize(
    ("code", "mutate"),
    [pytest.param(code, mutate, id=f"{code}-{name}") for code, name, mutate in ERROR_CASES],
)
def test_error_codes(code: str, mutate: Callable[[str], str]) -> None:
    text = mutate(load(CHROMIUM))
    assert text != load(CHROMIUM)
    with pytest.raises(SdpError) as info:
        parse_offer(text)
    assert info.value.code == code, info.value


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------

SAMPLE_LINES = [
    (SAMPLES / name).read_text(encoding="utf-8").splitlines()
    for name in (CHROMIUM, FIREFOX, SAFARI)
]


def check_parse(text: str) -> AudioOffer | None:
    """parse_offer may only succeed or raise SdpError; a success must be answerable."""
    try:
        offer = parse_offer(text)
    except SdpError as error:
        assert error.code in {"bad_sdp", "no_audio", "no_common_codec", "unsupported"}
        return None
    answer = write_answer(offer, PARAMS)
    m_lines = [line for line in answer.split("\r\n") if line.startswith("m=")]
    assert len(m_lines) == len(offer.m_line_order)
    return offer


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text(text: str) -> None:
    check_parse(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from("vosctma=:\r\n 0123456789/abcdefgABCDEF-."), max_size=300))
def test_sdp_shaped_text(text: str) -> None:
    check_parse("v=0\r\n" + text)


@st.composite
def mutated_offers(draw: st.DrawFn) -> str:
    lines = list(draw(st.sampled_from(SAMPLE_LINES)))
    operations = draw(
        st.lists(
            st.sampled_from(["drop", "duplicate", "move", "garbage", "truncate", "insert"]),
            min_size=1,
            max_size=6,
        )
    )
    for operation in operations:
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        if operation == "drop":
            del lines[index]
        elif operation == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif operation == "move":
            del lines[index]
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif operation == "garbage":
            # keep the "a=name:" or "x=" prefix, replace the value
            cut = line.find(":") + 1 or line.find("=") + 1
            lines[index] = line[:cut] + draw(st.text(max_size=30))
        elif operation == "truncate":
            lines[index] = line[: draw(st.integers(0, len(line)))]
        else:
            lines.insert(index, draw(st.text(max_size=30)))
    shuffle = draw(st.sampled_from(["none", "none", "within sections", "everything"]))
    if shuffle == "within sections":
        # Attribute order inside a section carries no meaning (RFC 8866 §5): stays valid.
        parts: list[list[str]] = [[]]
        for line in lines:
            if line.startswith("m="):
                parts.append([])
            parts[-1].append(line)
        lines = [line for part in parts for line in part[:1] + draw(st.permutations(part[1:]))]
    elif shuffle == "everything":
        lines = draw(st.permutations(lines))
    return "\r\n".join(lines) + "\r\n"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_offers())
def test_mutated_offers(text: str) -> None:
    check_parse(text)


def test_mutations_can_still_succeed() -> None:
    """Sanity check for the property above: benign mutations keep offers parseable."""
    lines = SAMPLE_LINES[0]
    assert check_parse("\r\n".join([*lines, "a=unknown-attribute:1"]) + "\r\n") is not None


def test_track_in_several_streams_keeps_first_msid() -> None:
    text = edit(load(SAFARI), r"(a=msid:9f41c2d8\S* e8d5a3f1\S*)", r"\1\r\na=msid:other e8d5a3f1")
    assert parse_offer(text).msid == (
        "9f41c2d8-7a35-4e0b-b6c1-3d82e5f0a719 e8d5a3f1-62bc-4a07-9d1e-5f3b8c2a7046"
    )
