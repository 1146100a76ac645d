"""Opus encoding and decoding of 20 ms voice frames (RFC 6716), for RTP (RFC 7587).

:class:`OpusEncoder` turns one frame of int16 PCM into one Opus packet, which is one RTP payload
(RFC 7587 §4.2). :class:`OpusDecoder` turns a payload back into PCM, and covers a lost packet
either with in-band FEC carried by the next packet (:meth:`OpusDecoder.decode_fec`, RFC 6716
§2.1.7 and RFC 7587 §3.3) or with packet loss concealment (:meth:`OpusDecoder.conceal`,
RFC 6716 §4.4).

Channels: voice is encoded mono. SDP still says ``opus/48000/2`` (RFC 7587 §7: the rtpmap
always names two channels and 48 kHz, whatever is actually sent); a mono decoder also accepts
stereo packets and downmixes them, so nothing depends on what the peer sends. The RTP clock is
48 kHz regardless of the encoder's input rate (RFC 7587 §4.1).

libopus is reached through opuslib's ctypes bindings. The library is loaded on first use, not
at import, so the jitter buffer and pacer work on machines without it; when it is missing the
constructors raise :class:`OpusUnavailableError`, which names the Debian package.

A payload the peer made up raises :class:`CodecError` (a
:class:`~sessions.webrtc.errors.RemoteInputError`: count it, conceal the frame, carry on); no
input crashes the decoder.

Session moves: libopus keeps its encoder and decoder state in native memory that cannot be
serialized (pickling a codec raises :class:`TypeError`). A session restored on another node
creates fresh codecs; the first frames after the move are then decoded without the old
predictor history, which is heard as a click at most, and Opus resynchronizes within a frame or
two. What must survive a move - SSRC, sequence number, timestamp, SRTP keys and rollover
counters - is RTP/SRTP state, kept elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Final, NoReturn, final

import attrs

from sessions.webrtc.errors import RemoteInputError

__all__ = [
    "CHANNELS",
    "CLOCK_RATE",
    "CodecError",
    "OpusDecoder",
    "OpusEncoder",
    "OpusUnavailableError",
    "VoiceCodec",
    "libopus_version",
]

#: RTP clock rate of Opus (RFC 7587 §4.1), whatever the encoder's input rate.
CLOCK_RATE: Final = 48_000
#: Channel count in the SDP rtpmap (RFC 7587 §7), whatever is actually sent.
CHANNELS: Final = 2

_RATES: Final = (8_000, 12_000, 16_000, 24_000, 48_000)  # RFC 6716 §2: the rates libopus takes
_FRAME_MS: Final = (10, 20, 40, 60)  # RFC 6716 §2.1.4 frame sizes long enough for SILK
_MAX_PACKET: Final = 1_500  # > the largest one-frame packet, 1 + 1275 bytes (RFC 6716 §3.2.1)
_MAX_DECODE_MS: Final = 120  # RFC 6716 §3.2.5: a packet holds at most 120 ms of audio
_OPUS_SIGNAL_VOICE: Final = 3001  # opus_defines.h: bias the mode decision towards SILK
_OPUS_APPLICATION_VOIP: Final = 2048  # opus_defines.h: speech intelligibility first


class OpusUnavailableError(ImportError):
    """libopus (or opuslib) is not installed: ``apt-get install libopus0``."""


class CodecError(RemoteInputError):
    """A payload from the network is not a valid Opus packet (RFC 6716 §3.4)."""


@functools.cache
def _opuslib() -> Any:
    """opuslib (which loads libopus), imported once; it has no type hints, hence ``Any``."""
    return _import_opuslib()


def _import_opuslib() -> Any:
    try:
        # opuslib raises a bare Exception from its package __init__ when libopus is missing.
        import opuslib.api.ctl
        import opuslib.api.decoder
        import opuslib.api.encoder
        import opuslib.api.info
    except Exception as exc:
        raise OpusUnavailableError(
            "libopus is not available (on Debian/Ubuntu: apt-get install libopus0; "
            f"and pip install opuslib): {exc}"
        ) from exc
    return opuslib


def libopus_version() -> str:
    """The loaded libopus's version string, e.g. ``libopus 1.3.1``."""
    text = _opuslib().api.info.get_version_string()
    return text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)


def _strerror(code: int) -> str:
    try:
        text = _opuslib().api.info.strerror(code)
    except Exception:  # pragma: no cover - strerror itself never fails in practice
        return f"libopus error {code}"
    return text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)


def _no_pickle(kind: str) -> NoReturn:
    raise TypeError(
        f"{kind} state lives in libopus and cannot be serialized; a restored session "
        "creates a fresh one (RTP/SRTP state is what survives a move)"
    )


def _apply_ctl(request: str) -> Any:
    """An attrs ``on_setattr`` hook that validates and pushes a new value into libopus."""

    def hook(instance: OpusEncoder, attribute: attrs.Attribute[Any], value: Any) -> Any:
        if attribute.validator is not None:
            attribute.validator(instance, attribute, value)
        instance._ctl(request, int(value))
        return value

    return hook


def _in_range(low: int, high: int) -> Any:
    return [attrs.validators.instance_of(int), attrs.validators.ge(low), attrs.validators.le(high)]


@final
@attrs.frozen
class VoiceCodec:
    """How a session encodes what it says: the node's ``node.opus_complexity`` (0-10: libopus's
    CPU spent per frame against quality; README, Benchmarks, has the measured trade-off) and
    ``node.opus_bitrate`` (bit/s). Everything else is :class:`OpusEncoder`'s defaults."""

    complexity: int = attrs.field(default=5, validator=_in_range(0, 10))
    bitrate: int = attrs.field(default=32_000, validator=_in_range(6_000, 510_000))

    def encoder(self) -> OpusEncoder:
        """A fresh encoder set up this way."""
        return OpusEncoder(bitrate=self.bitrate, complexity=self.complexity)


@final
@attrs.define(eq=False)
class OpusEncoder:
    """Encodes one frame of int16 PCM at a time into one Opus packet (RFC 6716).

    ``sample_rate``, ``channels`` and ``frame_ms`` are fixed at construction; ``bitrate``
    (bit/s), ``complexity`` (0-10, CPU against quality), ``fec`` (in-band forward error
    correction, RFC 6716 §2.1.7), ``expected_loss`` (percent; how much redundancy FEC spends,
    libopus emits none at 0) and ``dtx`` (discontinuous transmission: during silence packets
    shrink to 1-2 bytes, which a sender may skip, RFC 7587 §3.1.3) can be changed at any time
    by assignment, which takes effect from the next frame.

    The encoder runs in libopus's VoIP mode with the voice signal hint, which favours the SILK
    and hybrid modes; only they carry FEC.
    """

    sample_rate: int = attrs.field(
        default=48_000, validator=attrs.validators.in_(_RATES), on_setattr=attrs.setters.frozen
    )
    channels: int = attrs.field(
        default=1, validator=attrs.validators.in_((1, 2)), on_setattr=attrs.setters.frozen
    )
    frame_ms: int = attrs.field(
        default=20, validator=attrs.validators.in_(_FRAME_MS), on_setattr=attrs.setters.frozen
    )
    bitrate: int = attrs.field(
        default=32_000, validator=_in_range(6_000, 510_000), on_setattr=_apply_ctl("set_bitrate")
    )
    complexity: int = attrs.field(
        default=5, validator=_in_range(0, 10), on_setattr=_apply_ctl("set_complexity")
    )
    fec: bool = attrs.field(
        default=True,
        validator=attrs.validators.instance_of(bool),
        on_setattr=_apply_ctl("set_inband_fec"),
    )
    dtx: bool = attrs.field(
        default=False,
        validator=attrs.validators.instance_of(bool),
        on_setattr=_apply_ctl("set_dtx"),
    )
    expected_loss: int = attrs.field(
        default=10, validator=_in_range(0, 100), on_setattr=_apply_ctl("set_packet_loss_perc")
    )
    _state: Any = attrs.field(init=False, repr=False, default=None)
    _out: ctypes.Array[ctypes.c_char] = attrs.field(
        init=False, repr=False, factory=lambda: ctypes.create_string_buffer(_MAX_PACKET)
    )

    def __attrs_post_init__(self) -> None:
        lib = _opuslib()
        try:
            self._state = lib.api.encoder.create_state(
                self.sample_rate, self.channels, _OPUS_APPLICATION_VOIP
            )
        except lib.OpusError as exc:  # pragma: no cover - arguments were validated
            raise RuntimeError(f"opus_encoder_create failed: {exc}") from exc
        self._ctl("set_signal", _OPUS_SIGNAL_VOICE)
        self._ctl("set_bitrate", self.bitrate)
        self._ctl("set_complexity", self.complexity)
        self._ctl("set_inband_fec", int(self.fec))
        self._ctl("set_packet_loss_perc", self.expected_loss)
        self._ctl("set_dtx", int(self.dtx))

    def __del__(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            _opuslib().api.encoder.destroy(state)

    def __getstate__(self) -> NoReturn:
        _no_pickle("Opus encoder")

    def _ctl(self, request: str, value: int) -> None:
        if self._state is None:
            return  # still being constructed: __attrs_post_init__ applies every setting
        lib = _opuslib()
        try:
            lib.api.encoder.encoder_ctl(self._state, getattr(lib.api.ctl, request), value)
        except lib.OpusError as exc:
            raise ValueError(f"libopus rejected {request}({value}): {exc}") from exc

    @property
    def frame_samples(self) -> int:
        """Samples per channel in one frame (960 for 20 ms at 48 kHz)."""
        return self.sample_rate * self.frame_ms // 1000

    @property
    def frame_bytes(self) -> int:
        """Size of the PCM :meth:`encode` takes (1920 bytes for 20 ms mono at 48 kHz)."""
        return 2 * self.channels * self.frame_samples

    @property
    def rtp_timestamp_increment(self) -> int:
        """RTP timestamp units per packet: 960 for 20 ms (RFC 7587 §4.1, 48 kHz clock)."""
        return CLOCK_RATE * self.frame_ms // 1000

    @property
    def lookahead(self) -> int:
        """Encoder delay in samples (312 at 48 kHz in VoIP mode): decoded audio lags by this."""
        lib = _opuslib()
        return int(lib.api.encoder.encoder_ctl(self._state, lib.api.ctl.get_lookahead))

    def encode(self, pcm16: bytes) -> bytes:
        """Encode exactly one frame of int16 little-endian PCM (interleaved if stereo).

        Returns one Opus packet, the whole RTP payload (RFC 7587 §4.2). A wrong length is a
        local programming error and raises :class:`ValueError`.
        """
        if len(pcm16) != self.frame_bytes:
            raise ValueError(
                f"an Opus frame of {self.frame_ms} ms is {self.frame_bytes} bytes of int16 PCM, "
                f"got {len(pcm16)}"
            )
        lib = _opuslib()
        size = lib.api.encoder.libopus_encode(
            self._state,
            ctypes.cast(ctypes.c_char_p(pcm16), ctypes.POINTER(ctypes.c_int16)),
            self.frame_samples,
            self._out,
            _MAX_PACKET,
        )
        if size < 0:  # pragma: no cover - only for invalid arguments, which are checked above
            raise RuntimeError(f"opus_encode failed: {_strerror(size)}")
        return self._out.raw[:size]


@final
@attrs.define(eq=False)
class OpusDecoder:
    """Decodes Opus packets (RFC 6716) to int16 PCM, and covers lost ones.

    ``frame_ms`` is the duration of one lost packet, which :meth:`conceal` and
    :meth:`decode_fec` must produce exactly (libopus needs it for PLC and FEC); 20 ms is what
    Parley negotiates (``a=ptime:20``). :meth:`decode` itself returns whatever duration the
    packet holds, up to 120 ms.
    """

    channels: int = attrs.field(
        default=1, validator=attrs.validators.in_((1, 2)), on_setattr=attrs.setters.frozen
    )
    sample_rate: int = attrs.field(
        default=48_000, validator=attrs.validators.in_(_RATES), on_setattr=attrs.setters.frozen
    )
    frame_ms: int = attrs.field(
        default=20, validator=attrs.validators.in_(_FRAME_MS), on_setattr=attrs.setters.frozen
    )
    _state: Any = attrs.field(init=False, repr=False, default=None)
    _pcm: Any = attrs.field(init=False, repr=False, default=None)
    _pcm_ptr: Any = attrs.field(init=False, repr=False, default=None)

    def __attrs_post_init__(self) -> None:
        lib = _opuslib()
        try:
            self._state = lib.api.decoder.create_state(self.sample_rate, self.channels)
        except lib.OpusError as exc:  # pragma: no cover - arguments were validated
            raise RuntimeError(f"opus_decoder_create failed: {exc}") from exc
        # One output buffer reused for every packet: copying it out with string_at is several
        # times cheaper than opuslib's per-sample list, and a decode is ~20-30 us.
        self._pcm = (ctypes.c_int16 * (self._max_samples * self.channels))()
        self._pcm_ptr = ctypes.cast(self._pcm, ctypes.POINTER(ctypes.c_int16))

    def __del__(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            _opuslib().api.decoder.destroy(state)

    def __getstate__(self) -> NoReturn:
        _no_pickle("Opus decoder")

    @property
    def _max_samples(self) -> int:
        return self.sample_rate * _MAX_DECODE_MS // 1000

    @property
    def frame_samples(self) -> int:
        """Samples per channel that :meth:`conceal` and :meth:`decode_fec` return."""
        return self.sample_rate * self.frame_ms // 1000

    def decode(self, payload: bytes) -> bytes:
        """Decode one RTP payload (one Opus packet) to int16 PCM.

        Raises :class:`CodecError` when the payload is empty or not a valid Opus packet
        (RFC 6716 §3.4); the caller should count it and :meth:`conceal` instead.
        """
        if not payload:
            # RFC 6716 §3.4 [R1]: a packet is at least one byte. libopus would take an empty
            # buffer as a request for PLC, which is a decision for the caller to make.
            raise CodecError("empty Opus payload")
        return self._run(payload, self._max_samples, fec=False)

    def conceal(self) -> bytes:
        """PCM for one lost frame by packet loss concealment (RFC 6716 §4.4).

        Repeated calls fade towards silence. Never fails.
        """
        return self._run(None, self.frame_samples, fec=False)

    def decode_fec(self, next_payload: bytes) -> bytes:
        """Recover the frame lost just before ``next_payload`` from its in-band FEC.

        ``next_payload`` is the packet that follows the lost one (RFC 7587 §3.3); it must still
        be decoded normally with :meth:`decode` afterwards. If it carries no FEC data (the
        sender disabled FEC, used CELT-only mode, or expected no loss) libopus conceals
        instead, so the result is always one frame. Raises :class:`CodecError` if the payload
        is invalid.
        """
        if not next_payload:
            raise CodecError("empty Opus payload")
        return self._run(next_payload, self.frame_samples, fec=True)

    def reset(self) -> None:
        """Forget the decoding history, as at a new stream (new SSRC, or after a reset)."""
        lib = _opuslib()
        lib.api.decoder.decoder_ctl(self._state, lib.api.ctl.reset_state)

    def _run(self, payload: bytes | None, samples: int, *, fec: bool) -> bytes:
        lib = _opuslib()
        count = lib.api.decoder.libopus_decode(
            self._state,
            payload,
            0 if payload is None else len(payload),
            self._pcm_ptr,
            samples,
            int(fec),
        )
        if count < 0:
            raise CodecError(f"invalid Opus packet: {_strerror(count)}")
        return ctypes.string_at(self._pcm, 2 * self.channels * count)
