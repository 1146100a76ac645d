"""The adaptive jitter buffer on simulated networks: order, accounting, adaptation, resets."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.audio.jitter import Frame, FrameKind, JitterBuffer
from sessions.audio.opus import OpusDecoder, OpusEncoder
from sessions.audio.pacer import Pacer
from sessions.audio.speech import correlation, speak
from sessions.audio.speech import frames as cut

FRAME = 0.020


@attrs.frozen
class Arrival:
    time: float
    seq: int  # 16-bit, as on the wire
    timestamp: int  # 32-bit, as on the wire
    index: int  # which packet the sender sent: the payload


def payload(index: int) -> bytes:
    return index.to_bytes(4, "big")


def network(
    count: int,
    seed: int,
    *,
    loss: float = 0.0,
    duplicate: float = 0.0,
    jitter: float = 0.0,
    base: float = 0.030,
    seq0: int = 1000,
    ts0: int = 5000,
    start: float = 0.0,
) -> list[Arrival]:
    """Packets sent every 20 ms, each lost, duplicated and delayed at random (seeded)."""
    rnd = random.Random(seed)
    out = []
    for k in range(count):
        if rnd.random() < loss:
            continue
        copies = 2 if rnd.random() < duplicate else 1
        for _ in range(copies):
            arrival = start + k * FRAME + base + rnd.uniform(0.0, jitter)
            out.append(Arrival(arrival, (seq0 + k) % 65536, (ts0 + 960 * k) % 2**32, k))
    return out


def run(jb: JitterBuffer, arrivals: Iterable[Arrival], until: float = math.inf) -> list[Frame]:
    """Deliver packets and pop frames exactly when the buffer's timer says, in time order."""
    pending = sorted(arrivals, key=lambda a: a.time)
    frames: list[Frame] = []
    i = 0
    while True:
        timer = jb.get_timer()
        next_arrival = pending[i].time if i < len(pending) else math.inf
        if timer is not None and timer <= next_arrival:
            if timer > until:
                break
            frame = jb.pop(timer)
            if frame is not None:
                assert frame.deadline == timer
                frames.append(frame)
        elif i < len(pending):
            a = pending[i]
            jb.push(a.seq, a.timestamp, payload(a.index), a.time)
            i += 1
        else:
            break
    return frames


def audio_indices(frames: list[Frame]) -> list[int]:
    return [int.from_bytes(f.payload, "big") for f in frames if f.kind is FrameKind.AUDIO]


def check_accounting(jb: JitterBuffer, arrivals: list[Arrival], frames: list[Frame]) -> None:
    s = jb.stats()
    kinds = [f.kind for f in frames]
    assert s.received + s.late + s.duplicate + s.strays == len(arrivals)
    assert s.received == s.played + s.dropped + s.buffered
    assert s.played == kinds.count(FrameKind.AUDIO)
    assert s.fec_recovered == kinds.count(FrameKind.FEC)
    assert s.concealed == kinds.count(FrameKind.CONCEAL)
    played = [f.seq for f in frames if f.kind is FrameKind.AUDIO and f.seq is not None]
    assert len(played) == s.played
    assert played == sorted(set(played)), "in order, each once"
    # Every sequence number from the first packet's (which starts the stream: anything older
    # is late) to the last played was played, dropped or lost.
    first_seq = min(arrivals, key=lambda a: a.time).seq
    assert played[-1] - first_seq + 1 == s.played + s.dropped + s.lost
    # Each AUDIO frame carries the packet its sequence number belongs to.
    first = audio_indices(frames)[0]
    for f in frames:
        if f.kind is FrameKind.AUDIO and f.seq is not None:
            assert int.from_bytes(f.payload, "big") == f.seq - played[0] + first


# --- a random network -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_network_in_order_and_accounted(seed: int) -> None:
    arrivals = network(3000, seed, loss=0.05, duplicate=0.03, jitter=0.08)
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    check_accounting(jb, arrivals, frames)
    s = jb.stats()
    sent = 3000
    assert s.duplicate >= 0.02 * sent
    # Lost: the network's 5 % plus the few that came later than the 95 % quantile.
    assert 0.04 * sent < s.lost < 0.12 * sent
    assert s.late < 0.07 * sent
    # Most losses had their successor in the buffer and were recovered by FEC.
    assert s.fec_recovered > 0.6 * s.lost
    assert s.resets == 0
    assert s.strays == 0
    assert jb.idle  # the stream ended; the buffer stopped its clock


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    jitter=st.floats(0.0, 0.3),
)
def test_any_network_keeps_order_and_counts(
    seed: int, loss: float, duplicate: float, jitter: float
) -> None:
    arrivals = network(300, seed, loss=loss, duplicate=duplicate, jitter=jitter, seq0=65400)
    if len({a.index for a in arrivals}) < 2:
        return
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    check_accounting(jb, arrivals, frames)
    assert jb.stats().resets == 0


def test_delay_adapts_to_jitter_and_back() -> None:
    jb = JitterBuffer(min_delay=0.020, max_delay=0.200)
    jittery = network(1500, 7, jitter=0.080)  # 30 s with 0-80 ms of jitter
    calm = network(1500, 8, jitter=0.0, seq0=(1000 + 1500) % 65536, ts0=5000 + 960 * 1500)
    calm = [attrs.evolve(a, time=a.time + 1500 * FRAME, index=a.index + 1500) for a in calm]

    run(jb, jittery, until=29.0)
    s = jb.stats()
    assert 0.065 < s.target <= 0.080
    assert s.target - FRAME / 2 < s.delay < s.target + FRAME
    assert s.late < 0.06 * 1450

    frames = run(jb, [a for a in jittery if a.time > 29.0] + calm, until=59.0)
    s = jb.stats()
    assert s.target == pytest.approx(0.020)
    assert s.delay < 0.020 + FRAME
    assert s.dropped >= 2  # the delay came down by dropping single packets
    assert s.resets == 0
    assert all(f.kind is FrameKind.AUDIO for f in frames[-100:])


def test_delay_spike_is_absorbed_not_lost() -> None:
    arrivals = network(500, 1)
    # Packets 200-209 are held up in a queue for 100 ms and then arrive in a burst.
    arrivals = [
        attrs.evolve(a, time=max(a.time, 200 * FRAME + 0.030 + 0.100))
        if 200 <= a.index < 210
        else a
        for a in arrivals
    ]
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    check_accounting(jb, arrivals, frames)
    s = jb.stats()
    # The clock held (concealing) until the burst came instead of declaring packets lost...
    assert (s.lost, s.late) == (0, 0)
    at = [f.seq for f in frames].index(1199) + 1
    assert [f.kind for f in frames[at : at + 5]] == [FrameKind.CONCEAL] * 5
    # ...then took the extra 100 ms back one dropped packet at a time, one per 250 ms.
    played = audio_indices(frames)
    skipped = [k for k in range(500) if k not in played]
    assert len(skipped) == s.dropped == 4
    assert all(b - a >= 0.250 / FRAME for a, b in itertools.pairwise(skipped))
    assert s.delay < s.target + FRAME


def talk(
    jb: JitterBuffer, sizes: list[int], *, burst: int, speech_above: int = 50
) -> list[tuple[int, int]]:
    """A client that sends ``len(sizes)`` packets of these payload sizes, its first ``burst``
    arriving together (a client that started late), the rest every 20 ms; the caller says a
    frame was speech when its packet was larger than ``speech_above`` bytes, as a VAD would
    (Opus at 32 kbit/s: silence about 20 bytes, speech 50-110). The (index, size) played."""
    arrivals = [
        (max(k, burst) * FRAME + 0.001, k, k.to_bytes(4, "big").ljust(size, b"\0"))
        for k, size in enumerate(sizes)
    ]
    played: list[tuple[int, int]] = []
    last = 0
    i = 0
    while i < len(arrivals) or jb.get_timer() is not None:
        timer = jb.get_timer()
        if i < len(arrivals) and (timer is None or arrivals[i][0] < timer):
            at, k, data = arrivals[i]
            jb.push(k, 960 * k, data, at)
            i += 1
            continue
        assert timer is not None
        frame = jb.pop(timer, speech=last > speech_above)
        if frame is not None and frame.kind is FrameKind.AUDIO:
            last = len(frame.payload)
            played.append((int.from_bytes(frame.payload[:4], "big"), last))
    return played


def test_a_long_delay_is_shortened_in_a_pause_not_in_speech() -> None:
    # Speech from the first packet (90 bytes), a pause of 1.2 s (20 bytes), speech again: the
    # first five packets came together, which made the delay 80 ms too long. The packets
    # dropped to shorten it are the pause's (one per shrink_interval), not holes in the words.
    sizes = [90] * 50 + [20] * 60 + [90] * 50
    jb = JitterBuffer()
    played = talk(jb, sizes, burst=4)
    dropped = sorted(set(range(len(sizes))) - {k for k, _ in played})
    s = jb.stats()
    assert s.dropped == len(dropped) == 4
    assert all(sizes[k] == 20 for k in dropped), dropped
    assert s.dropped_in_speech == 0
    assert s.delay < s.target + FRAME


def test_a_drop_waits_for_a_packet_no_larger_than_the_last_one_played() -> None:
    # The caller never says speech; the sizes alone: three quiet packets, then a word. With no
    # interval between drops, any slot of a too-long delay may drop, except the onset (20 -> 90
    # bytes: the first packet of the word) and the very first (nothing played to compare with).
    # (The target is held at 20 ms, so that the burst's delay is too long from the start.)
    sizes = [20] * 3 + [90] * 50
    jb = JitterBuffer(min_delay=0.020, max_delay=0.020, shrink_interval=0.0)
    played = talk(jb, sizes, burst=5, speech_above=1000)
    dropped = sorted(set(range(len(sizes))) - {k for k, _ in played})
    assert [k for k, _ in played][:4] == [0, 2, 3, 5]
    assert dropped[:2] == [1, 4]
    assert jb.stats().dropped_in_speech == 0


def test_a_talker_who_never_pauses_gets_the_delay_shortened_after_shrink_wait() -> None:
    # Five seconds of speech with no pause: the drops wait shrink_wait (2 s), then come one per
    # shrink_interval, each counted as dropped in speech.
    sizes = [90] * 250
    jb = JitterBuffer(shrink_wait=2.0)
    played = talk(jb, sizes, burst=5)
    dropped = sorted(set(range(len(sizes))) - {k for k, _ in played})
    s = jb.stats()
    assert s.dropped == s.dropped_in_speech == len(dropped) == 5
    assert dropped[0] * FRAME >= 2.0
    assert all(b - a >= 0.250 / FRAME for a, b in itertools.pairwise(dropped))
    assert s.delay < s.target + FRAME


# --- individual behaviours --------------------------------------------------------------------


def test_idle_until_the_first_packet() -> None:
    jb = JitterBuffer()
    assert jb.get_timer() is None
    assert jb.pop(100.0) is None
    jb.push(7, 1234, b"a", 10.0)
    assert jb.get_timer() == pytest.approx(10.0 + 0.020)
    assert jb.pop(10.0) is None  # not due yet
    frame = jb.pop(10.02)
    assert frame is not None
    assert (frame.kind, frame.seq, frame.timestamp, frame.payload) == (
        FrameKind.AUDIO,
        7,
        1234,
        b"a",
    )


def test_fec_for_a_gap_when_the_next_packet_is_here() -> None:
    arrivals = [a for a in network(10, 0, seq0=0, ts0=0) if a.index != 5]
    jb = JitterBuffer(min_delay=0.060)
    frames = run(jb, arrivals)
    kinds = [(f.kind, f.seq) for f in frames if f.seq is not None]
    assert kinds[5] == (FrameKind.FEC, 5)
    assert frames[[f.seq for f in frames].index(5)].payload == payload(6)
    assert [k for k in kinds if k[0] is FrameKind.AUDIO] == [
        (FrameKind.AUDIO, i) for i in range(10) if i != 5
    ]
    assert frames[[f.seq for f in frames].index(5)].timestamp == 5 * 960


def test_conceal_for_two_lost_in_a_row() -> None:
    arrivals = [a for a in network(10, 0, seq0=0, ts0=0) if a.index not in (4, 5)]
    jb = JitterBuffer(min_delay=0.060)
    frames = run(jb, arrivals)
    by_seq = {f.seq: f.kind for f in frames if f.seq is not None}
    assert (by_seq[4], by_seq[5]) == (FrameKind.CONCEAL, FrameKind.FEC)
    assert jb.stats().lost == 2


def test_reordering_within_the_delay_is_undone() -> None:
    # Packets 10, 20, 30 and 40 are held up 25 ms, so each arrives after its successor.
    arrivals = [
        attrs.evolve(a, time=a.time + 0.025) if a.index % 10 == 0 and a.index else a
        for a in network(50, 0)
    ]
    jb = JitterBuffer(min_delay=0.040)
    frames = run(jb, arrivals)
    assert [a.index for a in sorted(arrivals, key=lambda a: a.time)][10:12] == [11, 10]
    assert audio_indices(frames) == list(range(50))
    assert jb.stats().lost == 0


def test_duplicates_and_late_packets_are_counted_and_dropped() -> None:
    jb = JitterBuffer()
    jb.push(0, 0, b"0", 0.0)
    jb.push(0, 0, b"0", 0.001)  # duplicate while buffered
    jb.push(2, 1920, b"2", 0.040)
    assert jb.pop(0.020) is not None
    jb.push(0, 0, b"0", 0.021)  # duplicate of a played packet
    lost = jb.pop(0.040)
    assert lost is not None
    assert (lost.kind, lost.seq) == (FrameKind.FEC, 1)
    jb.push(1, 960, b"1", 0.045)  # its turn has passed
    s = jb.stats()
    assert (s.duplicate, s.late, s.received, s.lost) == (2, 1, 2, 1)


def test_sequence_and_timestamp_wrap() -> None:
    arrivals = network(400, 4, jitter=0.03, seq0=65400, ts0=2**32 - 960 * 100)
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    check_accounting(jb, arrivals, frames)
    assert audio_indices(frames) == list(range(400))
    seqs = [f.seq for f in frames if f.kind is FrameKind.AUDIO]
    assert seqs[0] == 65400
    assert seqs[-1] == 65400 + 399  # extended past 65535
    stamps = [f.timestamp for f in frames if f.kind is FrameKind.AUDIO]
    assert max(stamps) < 2**32
    assert jb.stats().resets == 0


def test_short_dtx_silence_is_concealed_without_loss() -> None:
    # The sender stops for 60 ms (DTX): sequence numbers continue, timestamps jump.
    arrivals = [
        Arrival(
            0.030 + k * FRAME + (0.060 if k >= 10 else 0.0),
            k,
            960 * k + (2880 if k >= 10 else 0),
            k,
        )
        for k in range(20)
    ]
    jb = JitterBuffer(min_delay=0.080)
    frames = run(jb, arrivals)
    assert audio_indices(frames) == list(range(20))
    gap = frames[10:13]
    assert [(f.kind, f.seq) for f in gap] == [(FrameKind.CONCEAL, None)] * 3
    assert [f.timestamp for f in frames[9:14]] == [960 * k for k in range(9, 14)]
    s = jb.stats()
    assert (s.lost, s.resets, s.dropped) == (0, 0, 0)


def test_talkspurt_after_long_silence_restarts_at_the_target_delay() -> None:
    first = network(50, 0, seq0=100, ts0=0)
    # Two seconds of DTX: next sequence number, timestamp and arrival two seconds on.
    second = [
        attrs.evolve(a, seq=a.seq + 50, timestamp=a.timestamp + 960 * 150, time=a.time + 3.0)
        for a in network(50, 0, seq0=100, ts0=0)
    ]
    jb = JitterBuffer(min_delay=0.040)
    frames = run(jb, first + second)
    s = jb.stats()
    assert (s.lost, s.resets, s.played) == (0, 0, 100)
    resumed = next(f for f in frames if f.seq == 150)
    assert resumed.deadline == pytest.approx(second[0].time + 0.040)
    assert resumed.kind is FrameKind.AUDIO


@pytest.mark.parametrize(("min_delay", "flushed"), [(0.020, 0), (0.100, 4)])
def test_sender_restart_resets_after_two_packets(min_delay: float, flushed: int) -> None:
    # A restarted sender: new sequence numbers and timestamps, same arrival schedule.
    old = network(100, 0, seq0=1000, ts0=5000)
    new = network(100, 0, seq0=40000, ts0=3_000_000_000, start=100 * FRAME)
    jb = JitterBuffer(min_delay=min_delay)
    frames = run(jb, old + new)
    s = jb.stats()
    assert (s.resets, s.strays, s.received, s.dropped, s.lost) == (1, 0, 200, flushed, 0)
    # What the old stream still had buffered when the restart was confirmed is dropped.
    seqs = [f.seq for f in frames if f.kind is FrameKind.AUDIO]
    assert seqs == list(range(1000, 1100 - flushed)) + list(range(40000, 40100))


def test_single_stray_packet_is_ignored() -> None:
    arrivals = network(100, 0, seq0=1000, ts0=5000)
    arrivals.append(Arrival(50 * FRAME + 0.031, 30000, 123, 999))  # a stray from nowhere
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    s = jb.stats()
    assert (s.strays, s.resets, s.lost) == (1, 0, 0)
    assert audio_indices(frames) == list(range(100))


def test_wild_timestamp_alone_is_a_stray() -> None:
    arrivals = network(100, 0)
    arrivals[50] = attrs.evolve(arrivals[50], timestamp=(arrivals[50].timestamp + 48000 * 30))
    jb = JitterBuffer()
    frames = run(jb, arrivals)
    s = jb.stats()
    assert (s.strays, s.resets) == (1, 0)
    assert audio_indices(frames) == [k for k in range(100) if k != 50]


def test_render_picks_the_decoder_call() -> None:
    class Fake:
        def decode(self, payload: bytes) -> bytes:
            return b"D" + payload

        def decode_fec(self, next_payload: bytes) -> bytes:
            return b"F" + next_payload

        def conceal(self) -> bytes:
            return b"C"

    fake = Fake()
    assert Frame(FrameKind.AUDIO, 0, 0.0, 1, b"x").render(fake) == b"Dx"
    assert Frame(FrameKind.FEC, 0, 0.0, 1, b"y").render(fake) == b"Fy"
    assert Frame(FrameKind.CONCEAL, 0, 0.0).render(fake) == b"C"


def test_invalid_configuration_and_input() -> None:
    with pytest.raises(ValueError):
        JitterBuffer(min_delay=0.3, max_delay=0.2)
    with pytest.raises(ValueError):
        JitterBuffer().push(70000, 0, b"", 0.0)
    with pytest.raises(attrs.exceptions.FrozenAttributeError):
        JitterBuffer().window = 5


# --- end to end -------------------------------------------------------------------------------


def test_speech_survives_pacer_network_and_jitter_buffer() -> None:
    """espeak-ng speech -> Opus -> pacer -> lossy, jittery network -> jitter buffer -> Opus."""
    speech = speak("Parley carries the voice of the caller to the agent, and the answer back.")
    encoder = OpusEncoder()
    pacer = Pacer(initial_timestamp=4_000_000_000)
    for pcm in cut(speech):
        pacer.push(pcm, 0.0)
    pacer.end_talkspurt()
    rnd = random.Random(3)
    packets: list[tuple[float, int, int, bytes]] = []
    index = 0
    while (timer := pacer.get_timer()) is not None:
        sent = pacer.pop(timer)
        assert sent is not None
        payload = encoder.encode(sent.payload)
        if rnd.random() >= 0.05:
            arrival = timer + 0.030 + rnd.uniform(0.0, 0.040)
            packets.append((arrival, (60_000 + index) % 65536, sent.timestamp, payload))
        index += 1

    jb = JitterBuffer()
    decoder = OpusDecoder()
    heard = []
    for arrival, seq, timestamp, payload in sorted(packets):
        while (due := jb.get_timer()) is not None and due <= arrival:
            frame = jb.pop(due)
            if frame is not None:
                heard.append(frame.render(decoder))
        jb.push(seq, timestamp, payload, arrival)
    while (due := jb.get_timer()) is not None:
        frame = jb.pop(due)
        if frame is not None:
            heard.append(frame.render(decoder))

    s = jb.stats()
    assert s.lost > 0
    assert s.played + s.lost >= index - 1
    best, lag = correlation(speech, b"".join(heard), 48_000)
    assert best > 0.85
    # The codec's look-ahead, plus any frames the buffer concealed before the speech began.
    assert 0 <= lag < 0.150 * 48_000


def test_older_packets_before_anything_played_start_the_stream_not_late() -> None:
    """After a move, what reached the old owner is handed on and arrives just after the
    client's next packets, which came the short way: it must still be played, in order."""
    jb = JitterBuffer(backfill=True)
    ts = 960 * 100
    jb.push(12, ts + 2 * 960, b"c", 1.000)  # the client's next packet, straight to us
    jb.push(10, ts, b"a", 1.004)  # handed on by the old owner
    jb.push(11, ts + 960, b"b", 1.005)
    played = []
    now = 1.0
    while len(played) < 3 and now < 2.0:
        frame = jb.pop(now)
        if frame is not None and frame.kind is FrameKind.AUDIO:
            played.append(frame.payload)
        now += 0.005
    assert played == [b"a", b"b", b"c"]
    stats = jb.stats()
    assert stats.late == 0 and stats.backfilled == 1 and stats.received == 3
    # Without backfill (every other stream) the same arrivals are late, as they always were.
    plain = JitterBuffer()
    plain.push(12, ts + 2 * 960, b"c", 1.000)
    plain.push(10, ts, b"a", 1.004)
    assert plain.stats().late == 1
    # Once something has played, an older packet is late again, as before.
    jb.push(9, ts - 960, b"z", now)
    assert jb.stats().late == 1
