"""Turn detection: real speech with the real VAD, and the exact rules with a scripted VAD."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.audio.speech import correlation, frames, rms, speak
from sessions.audio.vad import FRAME_BYTES
from sessions.turns import SpeechStarted, SpeechStopped, TurnConfig, TurnDetector, TurnEvent
from tests.audio.test_vad import mix, noise, silence

FRAME = 0.020
T0 = 1000.0  # the clock's reading before the first frame: frame i arrives at T0 + (i + 1) * FRAME


def arrival(i: int) -> float:
    return T0 + (i + 1) * FRAME


def run(detector: TurnDetector, chunks: Iterable[bytes]) -> list[tuple[int, TurnEvent]]:
    """Push every frame at its arrival time; each event with the index of the frame it came on."""
    out: list[tuple[int, TurnEvent]] = []
    for i, frame in enumerate(chunks):
        out.extend((i, event) for event in detector.push(frame, arrival(i)))
    return out


def frame_of(at: float) -> int:
    """The index of the frame that arrived at ``at``."""
    return round((at - T0) / FRAME - 1)


# --- real speech ------------------------------------------------------------------------------


@cache
def said(text: str) -> bytes:
    """``text`` said by espeak-ng, without the digital silence it puts before and after."""
    pcm = speak(text)
    sounding = [i for i in range(0, len(pcm), 2) if pcm[i : i + 2] != b"\0\0"]
    return pcm[sounding[0] : sounding[-1] + 2]


QUESTION = "Hello, can you hear me?"
ANSWER = "Yes. I would like to book a table for two."
REQUEST = "I would like to book a table for two."


def conversation(first: str, second: str) -> tuple[bytes, list[tuple[int, int]]]:
    """0.5 s silence, ``first``, 1 s silence, ``second``, 1 s silence; and the voiced spans.

    The truth is the first and last frame of each utterance that is not digital silence (in
    frames of nearly digital silence a word begins or ends: the detector may go either way).
    """
    lead = silence(0.5) + said(first)
    pcm = lead + silence(1.0) + said(second) + silence(1.0)
    split = len(frames(lead))
    sounding = [i for i, f in enumerate(frames(pcm)) if rms(f) > 10]
    one = [i for i in sounding if i < split]
    two = [i for i in sounding if i >= split]
    return pcm, [(one[0], one[-1]), (two[0], two[-1])]


def check_two_turns(
    events: list[tuple[int, TurnEvent]], truth: list[tuple[int, int]], start_slack: int
) -> None:
    config = TurnConfig()
    kinds = [(type(e), e.turn) for _, e in events]
    assert kinds == [(SpeechStarted, 1), (SpeechStopped, 1), (SpeechStarted, 2), (SpeechStopped, 2)]
    for turn, (first, last) in enumerate(truth):
        (started_on, started), (stopped_on, stopped) = events[2 * turn : 2 * turn + 2]
        assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
        assert abs(frame_of(started.at) - first) <= start_slack
        assert abs(frame_of(stopped.at) - last) <= 2
        # Emitted once min_speech is reached, and once end_silence has passed.
        assert started_on == frame_of(started.at) + config.min_speech_ms // 20 - 1
        assert stopped_on == frame_of(stopped.at) + config.end_silence_ms // 20
        assert stopped.duration_ms == round((stopped.at - started.at) * 1000) + 20
        assert not stopped.cut


def test_utterance_silence_utterance_makes_two_turns() -> None:
    pcm, truth = conversation(QUESTION, ANSWER)
    detector = TurnDetector()
    events = run(detector, frames(pcm))
    check_two_turns(events, truth, start_slack=1)
    assert not detector.in_speech
    assert detector.turns == 2


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_two_turns_in_noise_at_10_db_snr(colour: str) -> None:
    pcm, truth = conversation(QUESTION, REQUEST)
    speech_dbfs = 20 * math.log10(rms(said(QUESTION) + said(REQUEST)) / 32768)
    noisy = mix(pcm, noise(colour, len(pcm) // 2, speech_dbfs - 10))
    # The soft first sound of an utterance can drown in the noise: 3 frames of slack.
    check_two_turns(run(TurnDetector(), frames(noisy)), truth, start_slack=3)


def test_pause_shorter_than_end_silence_stays_in_the_turn() -> None:
    pcm = silence(0.5) + said(QUESTION) + silence(0.4) + said(REQUEST) + silence(1.0)
    events = [e for _, e in run(TurnDetector(), frames(pcm))]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped]
    stopped = events[1]
    assert isinstance(stopped, SpeechStopped)
    spoken_ms = 1000 * (len(said(QUESTION)) + len(said(REQUEST))) / 96_000 + 400
    assert stopped.duration_ms == pytest.approx(spoken_ms, abs=100)


def test_short_bursts_and_clicks_never_start_a_turn() -> None:
    bursts = b"".join(
        silence(0.5) + noise("pink", round(ms * 48), -20.0, offset=9600 * k)
        for k, ms in enumerate((20, 60, 100, 140, 160, 60, 100, 140, 160, 100))
    )
    clicks = b"".join(silence(0.13) + noise("white", 480, -16.0, offset=480 * k) for k in range(8))
    pcm = bursts + clicks + silence(0.5)
    pcm = mix(pcm, noise("white", len(pcm) // 2, -70.0))
    detector = TurnDetector()
    assert run(detector, frames(pcm)) == []
    assert detector.turns == 0
    # The same bursts, made longer than min_speech, do start turns: the test can fail.
    longer = b"".join(silence(0.8) + noise("pink", 48 * 300, -20.0) for _ in range(3))
    assert len(run(TurnDetector(), frames(longer + silence(0.8)))) == 6


def test_turn_audio_is_the_utterance_with_pre_roll_and_padding() -> None:
    pcm, truth = conversation(QUESTION, ANSWER)
    detector = TurnDetector()
    audios = []
    for i, frame in enumerate(frames(pcm)):
        for event in detector.push(frame, arrival(i)):
            if isinstance(event, SpeechStopped):
                audios.append(detector.take_turn_audio())
                assert detector.take_turn_audio() == b""  # handed out once
    assert len(audios) == 2
    padding = TurnConfig().padding_ms // 20
    for audio, text, (first, last) in zip(audios, (QUESTION, ANSWER), truth, strict=True):
        # Pre-roll and padding around the voiced frames, give or take the detector's frame.
        assert abs(len(audio) // FRAME_BYTES - (last - first + 1 + 2 * padding)) <= 2
        assert rms(audio[: 9 * FRAME_BYTES]) == 0.0  # the pre-roll is the silence before
        best, lag = correlation(said(text), audio, 48 * 400)
        assert best > 0.9
        assert abs(lag - padding * 960) <= 960  # the speech starts after the pre-roll


# --- the rules, with a scripted VAD ---------------------------------------------------------


@attrs.define
class Script:
    """A VAD that answers from a list; frames are ignored (they carry their index instead)."""

    answers: list[bool]
    calls: int = 0

    def is_speech(self, frame: bytes) -> bool:
        assert len(frame) == FRAME_BYTES
        self.calls += 1
        return self.answers[self.calls - 1]


def pattern(text: str) -> list[bool]:
    """``#`` voiced, ``.`` not; spaces are ignored."""
    return [c == "#" for c in text.replace(" ", "")]


def numbered(count: int) -> list[bytes]:
    """Frames whose PCM says which frame they are, to follow them into turn audio."""
    return [(i.to_bytes(4, "little")) * (FRAME_BYTES // 4) for i in range(count)]


def scripted(
    text: str, config: TurnConfig | None = None
) -> tuple[TurnDetector, list[tuple[int, TurnEvent]], list[bytes]]:
    answers = pattern(text)
    detector = TurnDetector(config, vad=Script(answers))
    chunks = numbered(len(answers))
    audios = []
    events = []
    for i, frame in enumerate(chunks):
        for event in detector.push(frame, arrival(i)):
            events.append((i, event))
            if isinstance(event, SpeechStopped):
                audios.append(detector.take_turn_audio())
    return detector, events, audios


def frame_numbers(audio: bytes) -> list[int]:
    return [int.from_bytes(audio[k : k + 4], "little") for k in range(0, len(audio), FRAME_BYTES)]


def test_exact_timing_of_a_turn() -> None:
    # 20 silent frames, 40 voiced (frames 20-59), 40 silent.
    _, events, audios = scripted("." * 20 + "#" * 40 + "." * 40)
    assert events == [
        (29, SpeechStarted(at=arrival(20), turn=1)),  # 10 frames = 200 ms after the first
        (89, SpeechStopped(at=arrival(59), turn=1, duration_ms=800)),  # 30 frames = 600 ms
    ]
    # 10 frames of pre-roll, the 40 voiced, 10 of padding.
    assert frame_numbers(audios[0]) == list(range(10, 70))


def state(detector: TurnDetector) -> tuple[bool, float | None, float | None]:
    return detector.in_speech, detector.first_voiced_at, detector.get_timer()


def test_state_during_a_turn() -> None:
    detector = TurnDetector(vad=Script(pattern("#" * 12 + "." * 40)))
    chunks = numbered(52)
    assert state(detector) == (False, None, None)
    for i in range(9):
        detector.push(chunks[i], arrival(i))
    assert state(detector) == (False, None, None)  # not yet min_speech
    assert (detector.voiced_run, detector.unvoiced_run) == (9, 0)
    detector.push(chunks[9], arrival(9))
    # The first voiced frame's arrival: barge-in latency is measured from there.
    assert state(detector)[:2] == (True, arrival(0))
    assert detector.get_timer() == pytest.approx(arrival(9) + 0.6)
    assert detector.turns == 1
    detector.push(chunks[10], arrival(10))
    detector.push(chunks[11], arrival(11))
    assert state(detector)[:2] == (True, arrival(0))
    assert detector.get_timer() == pytest.approx(arrival(11) + 0.6)
    events = []
    for i in range(12, 52):
        events += detector.push(chunks[i], arrival(i))
    assert [type(e) for e in events] == [SpeechStopped]
    assert state(detector) == (False, None, None)
    assert (detector.voiced_run, detector.unvoiced_run) == (0, 40)


def test_bursts_shorter_than_min_speech_are_ignored() -> None:
    for length in range(1, 10):
        _, events, _ = scripted(("." * 15 + "#" * length) * 4 + "." * 40)
        assert events == [], length
    _, events, _ = scripted("." * 15 + "#" * 10 + "." * 40)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]


def test_start_ratio_tolerates_gaps_in_the_window() -> None:
    # 7 of 10 voiced (start_ratio 0.7), starting and ending with a voiced frame: a turn.
    _, events, _ = scripted("....." + "##.#.##.##" + "#" * 5 + "." * 40)
    assert events[0] == (14, SpeechStarted(at=arrival(5), turn=1))
    # 6 of 10 voiced, over and over: never.
    _, events, _ = scripted("....." + "#.#.##.#.#" * 5 + "." * 40)
    assert events == []
    # A lower ratio accepts it.
    config = TurnConfig(start_ratio=0.5)
    _, events, _ = scripted("....." + "#.#.##.#.#" * 5 + "." * 40, config)
    assert events[0] == (14, SpeechStarted(at=arrival(5), turn=1))


def test_pause_rules() -> None:
    # A pause of 29 frames stays inside the turn; 30 end it.
    _, events, _ = scripted("#" * 20 + "." * 29 + "#" * 20 + "." * 40)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]
    _, events, _ = scripted("#" * 20 + "." * 30 + "#" * 20 + "." * 40)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped] * 2
    # Lone voiced frames in a pause do not hold the turn open (though the one that comes as
    # the pause ends makes the end wait a frame, to see); two in a row do.
    _, events, _ = scripted("#" * 20 + ("." * 9 + "#") * 5 + "." * 40)
    assert events[1] == (50, SpeechStopped(at=arrival(19), turn=1, duration_ms=400))
    _, events, _ = scripted("#" * 20 + ("." * 8 + "#") * 5 + "." * 40)
    assert events[1] == (49, SpeechStopped(at=arrival(19), turn=1, duration_ms=400))
    _, events, _ = scripted("#" * 20 + "." * 20 + "##" + "." * 40)
    assert events[1] == (71, SpeechStopped(at=arrival(41), turn=1, duration_ms=840))


def test_poll_ends_a_turn_when_audio_stops_coming() -> None:
    detector = TurnDetector(vad=Script(pattern("#" * 15)))
    for i, frame in enumerate(numbered(15)):
        detector.push(frame, arrival(i))
    assert detector.in_speech
    assert detector.poll(arrival(14) + 0.59) == []
    deadline = detector.get_timer()
    assert deadline is not None
    assert deadline == pytest.approx(arrival(14) + 0.6)
    assert detector.poll(deadline) == [SpeechStopped(at=arrival(14), turn=1, duration_ms=300)]
    assert not detector.in_speech
    assert detector.poll(deadline + 10) == []
    # The audio is what was heard: there was nothing after the last voiced frame.
    assert frame_numbers(detector.take_turn_audio()) == list(range(15))


def test_long_turns_are_cut_and_follow_on() -> None:
    config = TurnConfig(max_turn_ms=1000)  # 50 frames
    _, events, audios = scripted("." * 5 + "#" * 160 + "." * 40, config)
    assert [(i, type(e), e.turn) for i, e in events] == [
        (14, SpeechStarted, 1),
        (49, SpeechStopped, 1),  # 5 frames of pre-roll + 45 voiced = 50
        (59, SpeechStarted, 2),
        (99, SpeechStopped, 2),
        (109, SpeechStarted, 3),
        (149, SpeechStopped, 3),
        (159, SpeechStarted, 4),
        (194, SpeechStopped, 4),
    ]
    assert [e.cut for _, e in events if isinstance(e, SpeechStopped)] == [True, True, True, False]
    assert events[2][1] == SpeechStarted(at=arrival(50), turn=2)  # the frame after the cut
    assert all(len(audio) <= 50 * FRAME_BYTES for audio in audios)
    # One after the other, the turns are exactly what was heard, with no frame twice.
    joined = [n for audio in audios for n in frame_numbers(audio)]
    assert joined == list(range(joined[0], joined[-1] + 1))
    assert (joined[0], joined[-1]) == (0, 174)


def test_turns_never_share_audio() -> None:
    config = TurnConfig(end_silence_ms=100, padding_ms=300)
    _, events, audios = scripted(("." * 8 + "#" * 12) * 4 + "." * 20, config)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped] * 4
    joined = [n for audio in audios for n in frame_numbers(audio)]
    assert joined == sorted(set(joined))


def test_no_padding_keeps_just_the_voiced_frames() -> None:
    config = TurnConfig(padding_ms=0)
    _, _, audios = scripted("." * 20 + "#" * 15 + "." * 40, config)
    assert frame_numbers(audios[0]) == list(range(20, 35))


def test_durations_round_up_to_whole_frames() -> None:
    config = TurnConfig(min_speech_ms=210, start_ratio=1.0)  # 11 frames
    _, events, _ = scripted("." * 5 + "#" * 10 + "." * 40, config)
    assert events == []
    _, events, _ = scripted("." * 5 + "#" * 11 + "." * 40, config)
    assert events[0] == (15, SpeechStarted(at=arrival(5), turn=1))


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"min_speech_ms": 0},
        {"min_speech_ms": 19},
        {"end_silence_ms": 0},
        {"padding_ms": -20},
        {"start_ratio": 0.0},
        {"start_ratio": 1.5},
        {"resume_ms": 10},
        {"resume_ms": 400},  # longer than min_speech_ms
        {"max_turn_ms": 700},  # less than twice padding + min_speech
    ],
)
def test_config_is_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TurnConfig(**bad)  # type: ignore[arg-type]


def test_config_is_frozen_and_defaults_are_the_documented_ones() -> None:
    config = TurnConfig()
    assert (config.min_speech_ms, config.end_silence_ms, config.padding_ms) == (200, 600, 200)
    assert config.max_turn_ms == 30_000
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.padding_ms = 0  # type: ignore[misc]


def test_frames_and_time_are_checked() -> None:
    detector = TurnDetector()
    with pytest.raises(ValueError, match="1920"):
        detector.push(bytes(960), 1.0)
    detector.push(bytes(FRAME_BYTES), 2.0)
    detector.push(bytes(FRAME_BYTES), 2.0)  # the same time again is fine
    with pytest.raises(ValueError, match="backwards"):
        detector.push(bytes(FRAME_BYTES), 1.9)
    with pytest.raises(ValueError, match="backwards"):
        detector.poll(1.0)


@settings(max_examples=200, deadline=None)
@given(
    answers=st.lists(st.booleans() | st.just(True), min_size=1, max_size=600),
    min_speech=st.sampled_from([20, 100, 200]),
    end_silence=st.sampled_from([20, 200, 600]),
    padding=st.sampled_from([0, 60, 200]),
    ratio=st.sampled_from([0.3, 0.7, 1.0]),
    max_turn=st.sampled_from([1000, 2000, 30_000]),
)
def test_invariants_on_any_voicing(
    answers: list[bool],
    min_speech: int,
    end_silence: int,
    padding: int,
    ratio: float,
    max_turn: int,
) -> None:
    config = TurnConfig(
        min_speech_ms=min_speech,
        end_silence_ms=end_silence,
        padding_ms=padding,
        start_ratio=ratio,
        resume_ms=min(40, min_speech),
        max_turn_ms=max_turn,
    )
    detector = TurnDetector(config, vad=Script(answers))
    events: list[TurnEvent] = []
    audios = []
    for i, frame in enumerate(numbered(len(answers))):
        for event in detector.push(frame, arrival(i)):
            events.append(event)
            if isinstance(event, SpeechStopped):
                audios.append(frame_numbers(detector.take_turn_audio()))
    # Started and stopped alternate, turn by turn, and a stop never precedes its start.
    for k, event in enumerate(events):
        assert isinstance(event, SpeechStopped if k % 2 else SpeechStarted)
        assert event.turn == k // 2 + 1
        if isinstance(event, SpeechStopped):
            started = events[k - 1]
            assert started.at <= event.at
            assert event.duration_ms >= 20
    assert detector.in_speech == (len(events) % 2 == 1)
    # Every turn starts and ends on voiced frames, keeps its voiced frames, stays under the
    # cap, and no frame is in two turns.
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    for started, stopped, audio in zip(starts, stops, audios, strict=False):
        first, last = frame_of(started.at), frame_of(stopped.at)
        assert answers[first] and answers[last]
        assert audio == list(range(audio[0], audio[-1] + 1))
        assert audio[0] <= first <= last <= audio[-1]
        assert len(audio) <= -(-max_turn // 20)
    joined = [n for audio in audios for n in audio]
    assert joined == sorted(set(joined))
