"""The clients of ops/bench/sessions.py (and of the other benches that reuse them): aiortc peers
playing espeak-ng speech paced like a microphone, timestamping every echoed RTP packet as the
kernel received it, and how late and how regular those echoes came."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import itertools
import statistics
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final, final

import attrs

from ops.bench.arrivals import SPEECH_TEXT, stamp_rtp_arrivals
from ops.bench.sessions_report import LATE_SLACK
from ops.bench.sessions_servers import http

__all__ = ["Call", "Lateness", "lateness", "loop_start", "speech_packets"]

FRAME: Final = 0.020
CLOCK_RATE: Final = 48_000
FRAME_TIMESTAMP: Final = 960
CONNECT_TIMEOUT: Final = 15.0


def speech_packets() -> list[bytes]:
    """espeak-ng speech plus 0.5 s of silence, as 20 ms Opus packets from aiortc's encoder."""
    import av
    from aiortc.codecs.opus import OpusEncoder

    from sessions.audio import speech

    pcm = speech.speak(SPEECH_TEXT, rate=190)
    frames = speech.frames(pcm) + [bytes(2 * FRAME_TIMESTAMP)] * round(0.5 / FRAME)
    encoder = OpusEncoder()
    packets: list[bytes] = []
    index = 0
    while len(packets) < len(frames):  # the encoder holds a little back at first
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_TIMESTAMP)
        frame.planes[0].update(frames[index % len(frames)])
        frame.sample_rate = CLOCK_RATE
        frame.pts = index * FRAME_TIMESTAMP
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        payloads, _ = encoder.encode(frame)
        packets += payloads
        index += 1
    return packets[: len(frames)]


def loop_start(index: int, packets: list[bytes]) -> int:
    """Where the ``index``-th client of a load step starts the speech loop: spread over the
    loop (the golden ratio's multiples, so that however many clients there are, their places
    are about evenly apart). People on a node do not all say the same thing at the same
    moment: clients that all started at the top of the loop a few milliseconds apart spoke
    and fell silent together, and the node's work per grid point rose and fell with them
    (at 40 sessions its pass took 11.5 to 17 ms over each 3.3 s loop, against 13.9 to 17.3
    spread)."""
    return int(len(packets) * ((index * 0.6180339887498949) % 1.0))


def _speech_track(packets: list[bytes], start: int = 0) -> Any:
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    time_base = fractions.Fraction(1, CLOCK_RATE)

    class SpeechTrack(MediaStreamTrack):
        """Loops speech (pre-encoded Opus packets) paced in real time like a microphone, from
        packet ``start`` on. :meth:`mute` stops it for good (no packet at all, as a browser
        sending Opus with DTX sends almost none in silence)."""

        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._index = 0
            self._start: float | None = None
            self._live = asyncio.Event()
            self._live.set()

        def mute(self) -> None:
            self._live.clear()

        async def recv(self) -> av.Packet[Any]:
            if self.readyState != "live":
                raise MediaStreamError
            await self._live.wait()
            if self._start is None:
                self._start = time.monotonic()
            else:
                delay = self._start + self._index * FRAME - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
            packet = av.Packet(packets[(start + self._index) % len(packets)])
            packet.pts = self._index * FRAME_TIMESTAMP
            packet.time_base = time_base
            self._index += 1
            return packet

    return SpeechTrack()


@final
class Call:
    """One aiortc client session: sends speech (the loop from packet ``start``), timestamps
    every echoed RTP packet.

    Echoed packets are timestamped by the kernel as they reach the client's socket
    (``SIOCGSTAMP`` after each read), so that a busy or descheduled client process does not
    make the server look late; the first one (setup time) as aiortc's receiver gets it.
    """

    def __init__(
        self, packets: list[bytes], *, decode_all: bool, token: str | None = None, start: int = 0
    ) -> None:
        self.token = token
        import aiortc
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
        from aiortc.rtp import RtpPacket

        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.pc.addTrack(_speech_track(packets, start))
        #: (arrival on the kernel's clock, as time.monotonic(); RTP timestamp) of every echo
        self.arrivals: list[tuple[float, int]] = []
        self.first_rtp: float | None = None
        self.first_frame = asyncio.get_running_loop().create_future()
        self.location: str | None = None
        self._decode = True
        self._reader: asyncio.Task[None] | None = None

        (transceiver,) = self.pc.getTransceivers()
        receiver = transceiver.receiver
        original = receiver._handle_rtp_packet

        async def on_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
            if self.first_rtp is None:
                self.first_rtp = time.monotonic()
            if self._decode:
                await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = on_rtp  # type: ignore[method-assign]

        async def read(track: MediaStreamTrack) -> None:
            with contextlib.suppress(MediaStreamError):
                await track.recv()
                if not self.first_frame.done():
                    self.first_frame.set_result(time.monotonic())
                if not decode_all:
                    self._decode = False
                    return
                while True:
                    await track.recv()

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._reader = asyncio.ensure_future(read(track))

    async def connect(self, url: str) -> tuple[float, float, float]:
        """POST the offer, apply the answer and wait for the first decoded echo.

        Returns seconds from sending the POST to the answer, to the first echoed RTP packet and
        to the first decoded frame.
        """
        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        self._stamp_arrivals()
        offer = self.pc.localDescription.sdp.encode()
        start = time.monotonic()
        status, headers, answer = await http("POST", url, offer, token=self.token)
        answered = time.monotonic()
        if status != 201:
            raise RuntimeError(f"POST answered {status}: {answer[:200]!r}")
        self.location = headers.get("location")
        import aiortc

        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(answer.decode(), "answer"))
        async with asyncio.timeout(CONNECT_TIMEOUT):
            decoded: float = await self.first_frame
        assert self.first_rtp is not None
        return answered - start, self.first_rtp - start, decoded - start

    def _stamp_arrivals(self) -> None:
        """Record the kernel's arrival time of every RTP packet on our ICE sockets."""
        (transceiver,) = self.pc.getTransceivers()
        connection = transceiver.receiver.transport.transport._connection
        stamp_rtp_arrivals(
            connection, lambda at, data: self.arrivals.append((at, int.from_bytes(data[4:8])))
        )

    async def close(self, base_url: str) -> None:
        if self.location is not None:
            parts = urllib.parse.urlsplit(base_url)
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                await http(
                    "DELETE", f"{parts.scheme}://{parts.netloc}{self.location}", token=self.token
                )
            self.location = None
        with contextlib.suppress(Exception):
            await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()


@final
@attrs.frozen
class Lateness:
    frames: int
    late: int
    missing: int
    delays: list[float]
    """each frame's delay beyond the least of the window (arrival - timestamp), seconds"""
    drift: float
    """how much the echo's delay grew over the window (median of its last second minus its
    first), seconds"""


def lateness(arrivals: Sequence[tuple[float, int]], start: float, end: float) -> Lateness:
    """Late and missing echoed frames among ``arrivals`` in [start, end), and the echo's delay.

    Late: the frame came more than 5 ms after the previous one beyond the spacing their RTP
    timestamps give (20 ms for consecutive frames). Missing: its timestamp never came. The
    delay of a frame is its arrival minus its timestamp (on the clock of the first frame);
    it only varies (jitter) or grows (a server falling behind) from the least of the window.
    """
    window = [(at, ts) for at, ts in arrivals if start <= at < end]
    if not window:
        return Lateness(0, 0, 0, [], 0.0)
    origin = window[0][1]
    unwrapped: list[tuple[float, int]] = []
    for at, ts in window:
        delta = (ts - origin + (1 << 31)) % (1 << 32) - (1 << 31)
        unwrapped.append((at, delta))
    offsets = [at - delta / CLOCK_RATE for at, delta in unwrapped]
    base = min(offsets)
    seen = {delta // FRAME_TIMESTAMP for _, delta in unwrapped}
    first, last = min(seen), max(seen)
    frames = last - first + 1
    late = 0
    for (prev_at, prev_ts), (at, ts) in itertools.pairwise(unwrapped):
        if ts > prev_ts and at - prev_at > (ts - prev_ts) / CLOCK_RATE + LATE_SLACK:
            late += 1
    span = min(1.0, (end - start) / 4)
    head = [o for (at, _), o in zip(unwrapped, offsets, strict=True) if at < start + span]
    tail = [o for (at, _), o in zip(unwrapped, offsets, strict=True) if at >= end - span]
    drift = statistics.median(tail) - statistics.median(head) if head and tail else 0.0
    return Lateness(frames, late, frames - len(seen), [o - base for o in offsets], drift)
