"""Barge-in reaction and false barge-ins on echo, noise and backchannels, echo estimator on/off.

Part of ``python -m ops.bench.turns`` (printed after the turn figures, in the same run), and the
harness of ``tests/sessions/test_barge.py``. The session's real
:class:`~sessions.transceiver.voice.VoiceLoop` with the turn-echo agent talks to a client on a
virtual clock, with real Opus both ways and ``delay`` each way, and no WebRTC around it (that is
measured by the turns figures): the client's microphone is a script of frames (espeak-ng
speech, bursts, silence) plus, when the client has an :class:`EchoPath`, the agent's audio it
played, mixed back attenuated, delayed and low-passed, as a phone on speaker does.

Scenarios, each run with the echo estimator on and off (``TurnConfig.echo_aware``):

* **barge-in**: the user talks over the reply; reaction = first voiced frame played out at the
  node -> first ducked (faded) agent frame sent, p50 and p99; and, clean, the issue's figure:
  that frame's arrival at the node -> the first ducked frame's arrival at the client (the
  jitter buffer and the downlink included);
* **echo**: a speakerphone user (echo -10 dB, 60-200 ms, low-passed) asks, stays silent while
  the reply plays: every duck and every interruption is false;
* **noise**: coughs (150 ms bursts) and clicks during replies, over steady noise: false
  interruptions (ducks are expected, and resumed);
* **backchannels**: "mm-hm" and "yeah" during replies: false interruptions.

False barge-ins are counted per minute of agent speech.
"""

from __future__ import annotations

import array
import collections
import functools
import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import Final, final

import attrs

from sessions.agents import TurnEchoAgent
from sessions.audio import speech
from sessions.audio.opus import OpusDecoder, OpusEncoder
from sessions.audio.vad import FRAME_BYTES
from sessions.transceiver.voice import VoiceLoop
from sessions.turns import SpeechClassifier, TurnConfig

__all__ = ["EchoPath", "LoopCall", "backchannel", "burst", "said"]

FRAME: Final = 0.020
RATE: Final = 48_000
SILENCE: Final = bytes(FRAME_BYTES)


@final
@attrs.frozen
class EchoPath:
    """The client plays the agent and its microphone picks it up: ``gain_db`` (negative),
    ``delay_ms`` after the client received it, through a low-pass at ``lowpass_hz``."""

    gain_db: float = -10.0
    delay_ms: float = 120.0
    lowpass_hz: float = 2000.0


def _samples(pcm: bytes) -> memoryview:
    return memoryview(pcm).cast("h")


def _pack(samples: list[float] | list[int]) -> bytes:
    return array.array("h", [max(-32768, min(32767, round(s))) for s in samples]).tobytes()


def mix(a: bytes, b: bytes) -> bytes:
    """Two frames added (clipped)."""
    return _pack([x + y for x, y in zip(_samples(a), _samples(b), strict=True)])


@final
class LoopCall:
    """A voice loop and a scripted client on one virtual clock (see the module docstring)."""

    def __init__(
        self,
        *,
        config: TurnConfig | None = None,
        echo: EchoPath | None = None,
        delay: float = 0.020,
        noise_dbfs: float | None = None,
        seed: int = 1,
        vad: SpeechClassifier | None = None,
    ) -> None:
        self.config = TurnConfig() if config is None else config
        self.agent = TurnEchoAgent()
        self.loop = VoiceLoop(
            agent=self.agent, may_send=True, timestamp=0, turn_config=self.config, vad=vad
        )
        self.loop.start(0.0)
        self.now = 0.0
        self._delay = delay
        self._echo = echo
        rng = random.Random(seed)
        sigma = 0.0 if noise_dbfs is None else 32768.0 * 10 ** (noise_dbfs / 20)
        # A second of white noise, looped: plenty, and cheap in pure Python.
        self._noise = [
            _pack([rng.gauss(0.0, sigma) for _ in range(FRAME_BYTES // 2)])
            for _ in range(50 if sigma else 0)
        ]
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._encoder = OpusEncoder()
        self._decoder = OpusDecoder()
        self._seq = 0
        self._tape: collections.deque[bytes] = collections.deque()
        #: the client's loudspeaker: sample index (48 kHz, from t=0) -> agent audio
        self._speaker = array.array("h")
        self._lp = 0.0
        self._lp2 = 0.0
        #: client events from the loop: (time, name, fields)
        self.events: list[tuple[float, str, dict[str, object]]] = []
        #: agent frames sent by the node: (time, PCM decoded at the client)
        self.received: list[tuple[float, bytes]] = []
        #: what the client's microphone sent: (time, frame)
        self.mic: list[tuple[float, bytes]] = []
        #: when the node sent each agent frame
        self.sent: list[float] = []
        #: when the client received each RTP timestamp of the agent's (first arrival)
        self.arrived: dict[int, float] = {}
        self._tick(0)

    # plumbing

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), action))

    def say(self, frames: list[bytes], when: float | None = None) -> float:
        """Queue ``frames`` for the microphone from ``when`` (default: now); when they end."""
        start = self.now if when is None else when
        self.at(start, lambda: self._tape.extend(frames))
        return start + len(frames) * FRAME

    def run(self, until: float) -> None:
        while True:
            timer = self.loop.get_timer()
            core_at = math.inf if timer is None else timer
            heap_at = self._heap[0][0] if self._heap else math.inf
            when = min(core_at, heap_at)
            if when > until:
                self.now = until
                return
            self.now = max(self.now, when)
            if heap_at <= core_at:
                heapq.heappop(self._heap)[2]()
            else:
                self.loop.handle_timer(self.now)
            self._pump()

    def names(self) -> list[str]:
        return [name for _, name, _ in self.events]

    def first(self, name: str, after: float = -1.0) -> tuple[float, dict[str, object]] | None:
        return next(((t, f) for t, n, f in self.events if n == name and t > after), None)

    def at_client(self, index: int) -> float | None:
        """The ``index``-th duck, the issue's way: its first voiced frame's arrival at the node
        -> its first faded agent frame's arrival at the client (``None``: none was faded)."""
        duck = self.loop.duck_log[index]
        arrived = None if duck.timestamp is None else self.arrived.get(duck.timestamp)
        return None if arrived is None else arrived - duck.arrived

    # the node's side

    def _pump(self) -> None:
        for frame in self.loop.frames_to_send():
            self.sent.append(self.now)
            self.at(
                self.now + self._delay,
                functools.partial(self._play, frame.payload, frame.timestamp),
            )
        while (event := self.loop.next_event()) is not None:
            self.events.append((self.now, event.name, event.fields))

    # the client's side

    def _play(self, payload: bytes, timestamp: int) -> None:
        self.arrived.setdefault(timestamp, self.now)
        pcm = self._decoder.decode(payload)
        self.received.append((self.now, pcm))
        start = round(self.now * RATE)
        speaker = self._speaker
        if len(speaker) < start + len(pcm) // 2:
            speaker.extend([0] * (start + len(pcm) // 2 - len(speaker)))
        speaker[start : start + len(pcm) // 2] = array.array("h", pcm)

    def _echo_frame(self) -> bytes | None:
        echo = self._echo
        if echo is None:
            return None
        end = round((self.now - echo.delay_ms / 1000) * RATE)
        count = FRAME_BYTES // 2
        begin = end - count
        speaker = self._speaker
        if end <= 0 or begin >= len(speaker):
            source = [0] * count
        else:
            source = [speaker[i] if 0 <= i < len(speaker) else 0 for i in range(begin, end)]
        gain = 10 ** (echo.gain_db / 20)
        a = 1.0 - math.exp(-2 * math.pi * echo.lowpass_hz / RATE)
        lp, lp2 = self._lp, self._lp2
        out = []
        for s in source:  # two one-pole low-passes: -12 dB/octave above the corner
            lp += a * (s - lp)
            lp2 += a * (lp - lp2)
            out.append(lp2 * gain)
        self._lp, self._lp2 = lp, lp2
        return _pack(out)

    def _tick(self, index: int) -> None:
        frame = self._tape.popleft() if self._tape else SILENCE
        if self._noise:
            frame = mix(frame, self._noise[index % len(self._noise)])
        echo = self._echo_frame()
        if echo is not None:
            frame = mix(frame, echo)
        self.mic.append((self.now, frame))
        payload = self._encoder.encode(frame)
        seq, self._seq = self._seq, (self._seq + 1) & 0xFFFF
        timestamp = (index * 960) & 0xFFFF_FFFF
        self.at(
            self.now + self._delay,
            lambda: self.loop.receive(seq, timestamp, payload, self.now),
        )
        self.at((index + 1) * FRAME, lambda: self._tick(index + 1))


# --- material ---------------------------------------------------------------------------------


def said(text: str, *, voice: str = "en", rate: int | None = None) -> list[bytes]:
    """``text`` by espeak-ng as 20 ms frames, without its leading and trailing digital
    silence."""
    pcm = speech.speak(text, voice=voice, rate=rate)
    frames = speech.frames(pcm)
    sounding = [i for i, f in enumerate(frames) if f != SILENCE]
    return frames[sounding[0] : sounding[-1] + 1]


def backchannel(ms: int = 300, text: str = "mm-hm") -> list[bytes]:
    """A short backchannel of ``ms`` (espeak-ng, sped up and cut to length, faded at the end)."""
    frames = said(text, rate=320)[: ms // 20]
    last = _samples(frames[-1])
    n = len(last)
    frames[-1] = _pack([s * (1 - i / n) for i, s in enumerate(last)])
    return frames


def burst(ms: int = 150, *, level_dbfs: float = -18.0, seed: int = 7) -> list[bytes]:
    """A cough-like burst: low-passed noise, a 10 ms attack and a decay to the end."""
    rng = random.Random(seed)
    count = ms * RATE // 1000
    sigma = 32768.0 * 10 ** (level_dbfs / 20) * 2.0
    attack = RATE // 100
    lp = 0.0
    a = 1.0 - math.exp(-2 * math.pi * 1500 / RATE)
    out = []
    for i in range(count):
        lp += a * (rng.gauss(0.0, sigma) - lp)
        envelope = i / attack if i < attack else math.exp(-3.0 * (i - attack) / (count - attack))
        out.append(lp * envelope)
    pcm = _pack(out)
    return speech.frames(pcm)


# --- the bench --------------------------------------------------------------------------------

QUESTIONS: Final = (
    "what is the weather like in Paris today",
    "please book a table for two at eight",
    "I would like to move my flight to Monday morning",
    "how long does it take to get to the airport",
)
INTERRUPTIONS: Final = (
    "wait, stop, that is not what I meant",
    "no no, hold on a second",
    "sorry, let me say that again",
    "stop please, I have a question",
)
#: echo delays of the speakerphone clients (after the client received the audio)
ECHO_DELAYS_MS: Final = (60.0, 130.0, 200.0)
#: the user talks over the reply this long after it started (uniform, seconds)
BARGE_AFTER: Final = (0.3, 1.0)


def _percentiles(seconds: list[float]) -> tuple[int, float | None, float | None]:
    ordered = sorted(seconds)
    if not ordered:
        return 0, None, None

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 1)

    return len(ordered), rank(50), rank(99)


@final
@attrs.frozen
class Counted:
    """Ducks and interruptions over ``agent_minutes`` of agent speech, per minute."""

    ducks: int
    interruptions: int
    agent_minutes: float

    @property
    def ducks_per_minute(self) -> float:
        return round(self.ducks / self.agent_minutes, 2) if self.agent_minutes else 0.0

    @property
    def interruptions_per_minute(self) -> float:
        return round(self.interruptions / self.agent_minutes, 2) if self.agent_minutes else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            **attrs.asdict(self),
            "ducks_per_minute": self.ducks_per_minute,
            "interruptions_per_minute": self.interruptions_per_minute,
        }


@final
@attrs.frozen
class BargeFigures:
    """One detector, echo estimator on or off: reaction and false barge-ins."""

    detector: str
    echo_aware: bool
    #: first voiced frame played out -> first ducked agent frame sent (count, p50, p99 ms)
    reaction: tuple[int, float | None, float | None]
    caught: int
    attempted: int
    #: the same over a speakerphone's echo (-10 dB, 130 ms, low-passed)
    reaction_over_echo: tuple[int, float | None, float | None]
    caught_over_echo: int
    echo: Counted
    noise: Counted
    backchannels: Counted
    #: the issue's figure, clean: first voiced frame's arrival at the node -> first ducked
    #: agent frame's arrival at the client (the jitter buffer and the downlink included)
    at_client: tuple[int, float | None, float | None] = (0, None, None)

    def as_dict(self) -> dict[str, object]:
        out = attrs.asdict(self, recurse=False)
        for key in ("echo", "noise", "backchannels"):
            out[key] = getattr(self, key).as_dict()
        out["reaction"] = list(self.reaction)
        out["reaction_over_echo"] = list(self.reaction_over_echo)
        out["at_client"] = list(self.at_client)
        return out


def _reply(call: LoopCall, question: list[bytes], pause: float = 0.8) -> tuple[float, float]:
    """The user asks; (reply start, reply end) as the turn-echo agent will play it."""
    end = call.say(question, call.now + pause)
    call.run(end)
    started = None
    while started is None and call.now < end + 2.0:  # the detector may miss the turn
        call.run(call.now + FRAME)
        started = call.first("agent_started", end - 0.001)
    if started is None:
        return call.now, call.now
    ms = started[1].get("ms", 0)
    return started[0], started[0] + (ms if isinstance(ms, int) else 0) / 1000


def _count(call: LoopCall, since: float) -> tuple[int, int]:
    names = [n for t, n, _ in call.events if t >= since]
    return names.count("agent_ducked"), names.count("agent_interrupted")


def _barge_ins(
    make: Callable[[], LoopCall], replies: int, rng: random.Random
) -> tuple[list[float], int, list[float]]:
    """Reactions at the node, barge-ins caught, and reactions at the client (the issue's)."""
    call = make()
    reactions: list[float] = []
    at_client: list[float] = []
    caught = 0
    for n in range(replies):
        start, _ = _reply(call, said(QUESTIONS[n % len(QUESTIONS)]))
        barge = start + rng.uniform(*BARGE_AFTER)
        ducks_before = len(call.loop.ducks)
        end = call.say(said(INTERRUPTIONS[n % len(INTERRUPTIONS)]), barge)
        call.run(end + 0.7 + (end - barge) + 0.6)
        if call.first("agent_interrupted", barge) is not None:
            caught += 1
        if len(call.loop.ducks) > ducks_before and call.loop.ducks[ducks_before][0] >= barge:
            onset, faded = call.loop.ducks[ducks_before]
            reactions.append(faded - onset)
            client = call.at_client(ducks_before)
            if client is not None:
                at_client.append(client)
    return reactions, caught, at_client


def _during_replies(
    make: Callable[[], LoopCall], replies: int, sounds: list[tuple[float, list[bytes]]]
) -> Counted:
    """Replies with ``sounds`` made at their offsets into each; ducks and interruptions."""
    call = make()
    ducks = interruptions = 0
    for n in range(replies):
        start, end = _reply(call, said(QUESTIONS[n % len(QUESTIONS)]))
        for offset, frames in sounds:
            if start + offset + len(frames) * FRAME < end:
                call.say(frames, start + offset)
        call.run(max(end, call.now) + 0.8)
        d, i = _count(call, start)
        ducks, interruptions = ducks + d, interruptions + i
    minutes = len(call.sent) * FRAME / 60
    return Counted(ducks, interruptions, round(minutes, 3))


def _echo_only(make: Callable[[EchoPath], LoopCall], replies: int) -> Counted:
    ducks = interruptions = 0
    minutes = 0.0
    for delay in ECHO_DELAYS_MS:
        call = make(EchoPath(delay_ms=delay))
        for n in range(replies):
            _, end = _reply(call, said(QUESTIONS[n % len(QUESTIONS)]))
            call.run(max(end, call.now) + 0.8)
        d, i = _count(call, 0.0)
        ducks, interruptions = ducks + d, interruptions + i
        minutes += len(call.sent) * FRAME / 60
    return Counted(ducks, interruptions, round(minutes, 3))


def measure_barge(
    detectors: list[tuple[str, Callable[[], SpeechClassifier] | None]],
    *,
    replies: int = 10,
    config: TurnConfig | None = None,
    seed: int = 1,
    echo_aware: tuple[bool, ...] = (True, False),
) -> list[BargeFigures]:
    """Every detector, with the echo estimator on and off (``echo_aware``: which of those;
    see the module docstring)."""
    base = TurnConfig() if config is None else config
    cough = burst(150)
    click = burst(20, level_dbfs=-10.0, seed=9)
    mm_hm = backchannel(300)
    yeah = backchannel(280, "yeah")
    figures = []
    for name, make_vad in detectors:
        for aware in echo_aware:
            cfg = attrs.evolve(base, echo_aware=aware)

            def make(
                echo: EchoPath | None = None,
                noise: float | None = None,
                cfg: TurnConfig = cfg,
                make_vad: Callable[[], SpeechClassifier] | None = make_vad,
            ) -> LoopCall:
                vad = None if make_vad is None else make_vad()
                return LoopCall(config=cfg, echo=echo, noise_dbfs=noise, seed=seed, vad=vad)

            clean, caught, at_client = _barge_ins(make, replies, random.Random(seed))
            over_echo, caught_echo, _ = _barge_ins(
                lambda make=make: make(EchoPath(delay_ms=130.0)),  # type: ignore[misc]
                replies,
                random.Random(seed),
            )
            figures.append(
                BargeFigures(
                    detector=name,
                    echo_aware=aware,
                    reaction=_percentiles(clean),
                    caught=caught,
                    attempted=replies,
                    reaction_over_echo=_percentiles(over_echo),
                    caught_over_echo=caught_echo,
                    echo=_echo_only(lambda e, make=make: make(e), replies),  # type: ignore[misc]
                    noise=_during_replies(
                        lambda make=make: make(None, -50.0),  # type: ignore[misc]
                        replies,
                        [(0.5, cough), (1.3, click)],
                    ),
                    backchannels=_during_replies(make, replies, [(0.4, mm_hm), (1.4, yeah)]),
                    at_client=_percentiles(at_client),
                )
            )
    return figures


def echo_cpu_us(frames: int = 500) -> tuple[float, float]:
    """Microseconds per frame of the echo estimator: (a frame sent, a frame heard), with the
    agent talking and its echo coming back (the costly case)."""
    import time

    from sessions.audio.echo import EchoEstimator

    speech_frames = said(QUESTIONS[0])
    est = EchoEstimator()
    sent = heard = 0.0
    for k in range(frames):
        frame = speech_frames[k % len(speech_frames)]
        back = speech_frames[(k - 8) % len(speech_frames)]
        t0 = time.perf_counter()
        est.sent(frame, k * FRAME)
        t1 = time.perf_counter()
        est.heard(back, k * FRAME + 0.003)
        t2 = time.perf_counter()
        sent, heard = sent + t1 - t0, heard + t2 - t1
    return round(sent / frames * 1e6, 1), round(heard / frames * 1e6, 1)


def render_barge(figures: list[BargeFigures], replies: int, cpu: tuple[float, float]) -> str:
    def ms(p: tuple[int, float | None, float | None]) -> list[str]:
        return [str(p[0]), *("-" if v is None else f"{v:.0f}" for v in p[1:])]

    def per_min(c: Counted) -> list[str]:
        return [f"{c.ducks_per_minute:.1f}", f"{c.interruptions_per_minute:.1f}"]

    header = [
        "detector", "echo est.", "n", "p50", "p99", "caught", "client p50", "p99",
        "|", "n", "p50", "p99", "caught",
        "|", "echo d/m", "i/m", "|", "noise d/m", "i/m", "|", "backch. d/m", "i/m",
    ]  # fmt: skip
    rows = [
        [
            f.detector,
            "on" if f.echo_aware else "off",
            *ms(f.reaction),
            f"{f.caught}/{f.attempted}",
            *ms(f.at_client)[1:],
            "|",
            *ms(f.reaction_over_echo),
            f"{f.caught_over_echo}/{f.attempted}",
            "|",
            *per_min(f.echo),
            "|",
            *per_min(f.noise),
            "|",
            *per_min(f.backchannels),
        ]
        for f in figures
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    minutes = figures[0].echo.agent_minutes if figures else 0.0
    return "\n".join(
        [
            f"barge-in: duck at once, decide later (voice loop, real Opus, {replies} replies "
            "per scenario)",
            "  reaction ms: first voiced frame played out -> first ducked agent frame sent; "
            "left clean, right over a speakerphone's echo (-10 dB, 130 ms, low-passed);",
            "  client: the issue's figure, clean: first voiced frame reaching the node -> "
            "first ducked agent frame reaching the client (jitter buffer, 20 ms downlink)",
            f"  false ducks (d/m) and interruptions (i/m) per minute of agent speech: echo "
            f"(-10 dB, {'/'.join(f'{d:g}' for d in ECHO_DELAYS_MS)} ms, low-passed, user silent; "
            f"{minutes:.1f} min), noise (coughs and clicks over -50 dBFS), backchannels "
            "('mm-hm', 'yeah', 300 ms)",
            *lines,
            f"echo estimator: {cpu[0]:.1f} us per frame sent, {cpu[1]:.1f} us per frame heard "
            "(agent talking; one session, this machine)",
        ]
    )
