"""Real WebRTC peers for tests: aiortc playing espeak-ng speech and recording what it hears."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fractions
import functools
import time

import aioice.ice
import aiortc
import av
import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sessions.agents import FRAME_BYTES
from sessions.audio import speech

FRAME = 0.020


class SpeechTrack(MediaStreamTrack):
    """Plays PCM (looped, with a pause between repeats) as 20 ms Opus packets, paced in real time
    like a microphone.

    The speech is encoded once, with aiortc's own Opus encoder, and the track hands aiortc the
    packets: aiortc sends pre-encoded media as it is (its ``MediaPlayer(decode=False)`` path). Every
    peer says the same words, so twenty peers on two cores would otherwise spend most of their CPU
    encoding the same frames again, through a thread hop each.
    """

    kind = "audio"

    def __init__(self, pcm: bytes, *, pause: float = 0.5) -> None:
        super().__init__()
        self._packets = _encoded(pcm, round(pause / FRAME))
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._index * FRAME - time.monotonic()))
        packet = av.Packet(self._packets[self._index % len(self._packets)])
        packet.pts = self._index * 960
        packet.time_base = _TIME_BASE
        self._index += 1
        return packet


_TIME_BASE = fractions.Fraction(1, 48_000)


@functools.cache
def _encoded(pcm: bytes, pause_frames: int) -> tuple[bytes, ...]:
    """One Opus packet per 20 ms frame of ``pcm`` followed by ``pause_frames`` of silence."""
    encoder = OpusEncoder()
    packets: list[bytes] = []
    for index, chunk in enumerate(speech.frames(pcm) + [bytes(FRAME_BYTES)] * pause_frames):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(chunk)
        frame.sample_rate = 48_000
        frame.pts = index * 960
        frame.time_base = _TIME_BASE
        payloads, _ = encoder.encode(frame)
        packets += payloads
    return tuple(packets)


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice never gathers loopback candidates; for these tests it gathers only 127.0.0.1."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class AiortcCall:
    """aiortc's RTCPeerConnection, speaking ``pcm`` in a loop with ``pause`` seconds between."""

    def __init__(self, pcm: bytes, *, pause: float = 0.5) -> None:
        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.pc.addTrack(SpeechTrack(pcm, pause=pause))
        self.received: list[tuple[float, bytes]] = []  # (arrival, mono PCM of a frame)
        self._readers: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    assert isinstance(frame, av.AudioFrame)
                    # aiortc decodes to interleaved s16 stereo; keep the left channel
                    samples = array.array("h", bytes(frame.planes[0])[: frame.samples * 4])
                    self.received.append((loop.time(), samples[0::2].tobytes()))

        self._readers.append(asyncio.ensure_future(read()))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp, "answer"))

    def pcm_between(self, start: float, end: float) -> bytes:
        return b"".join(pcm for at, pcm in self.received if start <= at < end)

    async def close(self) -> None:
        await self.pc.close()
        for reader in self._readers:
            reader.cancel()
