"""Opus round trips on real speech (RFC 6716, RFC 7587), FEC and PLC, and the speech helpers."""

from __future__ import annotations

import array
import ctypes.util
import pickle
import shutil
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.audio import opus
from sessions.audio.opus import CodecError, OpusDecoder, OpusEncoder, OpusUnavailableError
from sessions.audio.speech import (
    SAMPLE_RATE,
    SpeechUnavailableError,
    correlation,
    frames,
    resample,
    rms,
    speak,
)
from sessions.webrtc.errors import RemoteInputError

TEXT = "Parley carries the voice of the caller to the agent, and the answer back again."
FRAME_BYTES = 1920  # 20 ms of 48 kHz mono int16


@pytest.fixture(scope="module")
def speech() -> bytes:
    return speak(TEXT)


@pytest.fixture(scope="module")
def packets(speech: bytes) -> list[bytes]:
    encoder = OpusEncoder()
    return [encoder.encode(frame) for frame in frames(speech)]


def squared_error(a: bytes, b: bytes) -> int:
    x = array.array("h", a)
    y = array.array("h", b)
    return sum((p - q) ** 2 for p, q in zip(x, y, strict=True))


# --- speech helpers ---------------------------------------------------------------------------


def test_speak_makes_audible_speech_of_plausible_length(speech: bytes) -> None:
    seconds = len(speech) / 2 / SAMPLE_RATE
    words = len(TEXT.split())
    # espeak-ng speaks about 175 words a minute; allow for pauses at the punctuation.
    assert 0.5 * words * 60 / 175 < seconds < 2.0 * words * 60 / 175
    assert rms(speech) > 1000
    assert rms(speak(TEXT, rate=350)) > 1000
    assert len(speak(TEXT, rate=350)) < 0.75 * len(speech)


def test_missing_espeak_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SpeechUnavailableError, match="apt-get install espeak-ng"):
        speak("hello")


def test_frames_pads_the_last_frame() -> None:
    pcm = bytes(range(256)) * 16  # 4096 bytes: two whole frames and 256 bytes
    cut = frames(pcm)
    assert [len(f) for f in cut] == [FRAME_BYTES] * 3
    assert b"".join(cut)[: len(pcm)] == pcm
    assert cut[-1][256:] == bytes(FRAME_BYTES - 256)
    assert frames(b"") == []
    with pytest.raises(ValueError):
        frames(b"\x00")


def test_resample_is_linear_and_keeps_duration() -> None:
    ramp = array.array("h", range(-22050, 22050, 2)).tobytes()  # 1 s at 22 050 Hz
    out = array.array("h", resample(ramp, 22050, 48000))
    assert len(out) == 48000
    # A straight line stays straight under linear interpolation (up to integer rounding).
    for k in (0, 1, 1000, 30000, 47000):
        assert abs(out[k] - (-22050 + 2 * k * 22050 / 48000)) <= 1


def test_correlation_finds_delay_and_rejects_unrelated(speech: bytes) -> None:
    delayed = bytes(2 * 4321) + speech
    best, lag = correlation(speech, delayed, 9600)
    assert best > 0.999
    assert lag == 4321
    best, lag = correlation(delayed, speech, 9600)
    assert (best > 0.999, lag) == (True, -4321)
    other = speak("Nothing at all like the first sentence, said much later.")
    best, _ = correlation(speech, other, 9600)
    assert best < 0.5


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("complexity", [0, 10])
def test_round_trip_keeps_the_speech(speech: bytes, complexity: int) -> None:
    encoder = OpusEncoder(complexity=complexity)
    decoder = OpusDecoder()
    decoded = []
    for frame in frames(speech):
        payload = encoder.encode(frame)
        assert 0 < len(payload) < 400
        decoded.append(decoder.decode(payload))
    assert {len(pcm) for pcm in decoded} == {FRAME_BYTES}
    best, lag = correlation(speech, b"".join(decoded), 2000)
    # The decoded audio lags by the encoder's look-ahead (312 samples, 6.5 ms, in VoIP mode).
    assert abs(lag - encoder.lookahead) <= 8
    assert best > 0.9


def test_stereo_packets_decode_to_mono(speech: bytes) -> None:
    # RFC 7587 §7: the SDP always says 2 channels; a peer may really send stereo.
    encoder = OpusEncoder(channels=2)
    mono = array.array("h", frames(speech)[20])
    stereo = array.array("h", bytes(2 * FRAME_BYTES))
    stereo[0::2] = mono
    stereo[1::2] = mono
    payload = encoder.encode(stereo.tobytes())
    assert len(OpusDecoder().decode(payload)) == FRAME_BYTES
    assert len(OpusDecoder(channels=2).decode(payload)) == 2 * FRAME_BYTES


def test_settings_apply_at_once(speech: bytes) -> None:
    encoder = OpusEncoder(bitrate=48_000)
    loud = frames(speech)[10:60]
    high = sum(len(encoder.encode(f)) for f in loud)
    encoder.bitrate = 8_000
    low = sum(len(encoder.encode(f)) for f in loud)
    assert low < high / 2
    encoder.complexity = 0
    encoder.fec = False
    encoder.expected_loss = 0
    with pytest.raises(ValueError):
        encoder.bitrate = 1_000
    with pytest.raises(ValueError):
        encoder.complexity = 11
    with pytest.raises(AttributeError):
        encoder.channels = 2
    with pytest.raises(ValueError):
        OpusEncoder(sample_rate=44_100)
    with pytest.raises(ValueError, match="1920 bytes"):
        encoder.encode(bytes(1000))


def test_dtx_shrinks_silence_to_one_byte() -> None:
    encoder = OpusEncoder(dtx=True)
    sizes = [len(encoder.encode(bytes(FRAME_BYTES))) for _ in range(30)]
    assert sizes[-1] <= 2


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"\x03", b"\x03\x00", b"\xff\xff\xff", b"\x01" * 2000])
def test_corrupt_payload_raises_codec_error(payload: bytes) -> None:
    decoder = OpusDecoder()
    with pytest.raises(CodecError) as caught:
        decoder.decode(payload)
    assert isinstance(caught.value, RemoteInputError)
    with pytest.raises(CodecError):
        decoder.decode_fec(payload)
    # The decoder is unharmed.
    assert len(decoder.decode(OpusEncoder().encode(bytes(FRAME_BYTES)))) == FRAME_BYTES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_any_payload_decodes_or_raises_codec_error(payload: bytes) -> None:
    decoder = OpusDecoder()
    try:
        pcm = decoder.decode(payload)
    except CodecError:
        return
    # At most 120 ms (RFC 6716 §3.2.5) of whole int16 samples.
    assert len(pcm) % 2 == 0
    assert len(pcm) <= 2 * 5760
    assert len(decoder.decode_fec(payload)) == FRAME_BYTES


def test_missing_libopus_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "opuslib" or m.startswith("opuslib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(OpusUnavailableError, match="apt-get install libopus0"):
        opus._import_opuslib()
    assert issubclass(OpusUnavailableError, ImportError)


def test_codec_state_cannot_be_pickled() -> None:
    for codec in (OpusEncoder(), OpusDecoder()):
        with pytest.raises(TypeError, match="fresh one"):
            pickle.dumps(codec)


# --- loss -------------------------------------------------------------------------------------


def test_conceal_and_fec_produce_one_frame(packets: list[bytes]) -> None:
    decoder = OpusDecoder()
    for payload in packets[:10]:
        decoder.decode(payload)
    for _ in range(5):  # PLC keeps going, fading out
        assert len(decoder.conceal()) == FRAME_BYTES
    assert len(decoder.decode_fec(packets[11])) == FRAME_BYTES
    assert len(decoder.decode(packets[11])) == FRAME_BYTES
    assert len(OpusDecoder().conceal()) == FRAME_BYTES  # even before any packet


def test_fec_recovers_a_lost_frame_better_than_plc(packets: list[bytes]) -> None:
    reference = OpusDecoder()
    clean = [reference.decode(p) for p in packets]
    voiced = [k for k in range(5, len(packets) - 2) if rms(clean[k]) > 3000][::6]
    assert len(voiced) >= 5
    fec_error = plc_error = 0
    for k in voiced:
        with_fec = OpusDecoder()
        with_plc = OpusDecoder()
        for payload in packets[:k]:
            with_fec.decode(payload)
            with_plc.decode(payload)
        # Packet k is lost; k + 1 carries k's LBRR copy (RFC 6716 §4.2.5, RFC 7587 §3.3).
        fec_error += squared_error(with_fec.decode_fec(packets[k + 1]), clean[k])
        plc_error += squared_error(with_plc.conceal(), clean[k])
    assert fec_error < 0.3 * plc_error
