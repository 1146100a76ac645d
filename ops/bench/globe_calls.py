"""The clients of one region of the simulated globe (ops/bench/globe.py): aiortc calls from the
region's address that beep and time their echo.

Each call sends 20 ms Opus frames in a one-second cycle: a 200 ms burst of loud noise, 100 ms
of silence, then nothing until the next burst (as a client with DTX sends nothing in silence),
so the echo agent's queue (up to 500 ms, which a stall of the node would otherwise leave
standing) is empty when each burst arrives. The echo agent plays it back; the node's encoder
makes large packets of the burst and small ones of the silence, so the client decodes nothing:
the round trip of a burst is the kernel arrival time (``SIOCGSTAMP``) of the first large echoed
packet after it minus the moment the burst's first frame went to aiortc. That is the
client-to-agent round trip a user hears, less the client's own jitter buffer: both network
legs, the relay, the tunnel, the node's jitter buffer and pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import random
import struct
import time
import traceback
import urllib.request
from typing import Any, Final

from ops.bench.arrivals import stamp_rtp_arrivals
from ops.bench.common import percentile

__all__ = ["CYCLE_FRAMES", "region_process"]

FRAME: Final = 0.020
CLOCK_RATE: Final = 48_000
#: frames in a cycle, and how many of them are the loud burst
CYCLE_FRAMES: Final = 50
BURST_FRAMES: Final = 10
#: frames sent each cycle: the burst and a little silence; then nothing until the next burst
SENT_FRAMES: Final = 15
#: an echoed SRTP datagram this large carries the burst (silence: ~30-50 bytes)
LOUD_BYTES: Final = 90


def _beep_packets() -> list[bytes]:
    import av
    from aiortc.codecs.opus import OpusEncoder

    rng = random.Random(5)
    encoder = OpusEncoder()
    packets: list[bytes] = []
    index = 0
    while len(packets) < CYCLE_FRAMES:
        loud = index % CYCLE_FRAMES < BURST_FRAMES
        samples = [rng.randint(-12000, 12000) if loud else 0 for _ in range(960)]
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(struct.pack(f"<{len(samples)}h", *samples))
        frame.sample_rate = CLOCK_RATE
        frame.pts = index * 960
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        payloads, _ = encoder.encode(frame)
        packets += payloads
        index += 1
    return packets[:CYCLE_FRAMES]


def _track(packets: list[bytes], bursts: list[float]) -> Any:
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    time_base = fractions.Fraction(1, CLOCK_RATE)

    class BeepTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self._index = 0
            self._start: float | None = None

        async def recv(self) -> av.Packet[Any]:
            if self.readyState != "live":
                raise MediaStreamError
            if self._index % CYCLE_FRAMES >= SENT_FRAMES:
                # nothing is sent for the rest of the cycle (as with DTX), so whatever the
                # echo agent still holds drains before the next burst
                self._index += CYCLE_FRAMES - self._index % CYCLE_FRAMES
            if self._start is None:
                self._start = time.monotonic()
            else:
                await asyncio.sleep(max(0.0, self._start + self._index * FRAME - time.monotonic()))
            if self._index % CYCLE_FRAMES == 0:
                bursts.append(time.monotonic())
            packet = av.Packet(packets[self._index % CYCLE_FRAMES])
            packet.pts = self._index * 960
            packet.time_base = time_base
            self._index += 1
            return packet

    return BeepTrack()


class BeepCall:
    """One aiortc call: beeps, records echoed RTP (kernel arrival, size) and its ICE pair.

    ``nomination``: ``"first"`` is aioice's own (it nominates the first pair whose check
    succeeds: the fastest path); ``"priority"`` nominates the highest-priority pair that works,
    as browsers end up doing: checks run one at a time in priority order (aioice starts them in
    that order), so the first success is the best-ranked pair that answers.
    """

    def __init__(self, packets: list[bytes], nomination: str = "first") -> None:
        import aiortc
        from aiortc.rtp import RtpPacket

        self.pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=[]))
        self.bursts: list[float] = []
        self.pc.addTrack(_track(packets, self.bursts))
        self.arrivals: list[tuple[float, int]] = []
        (transceiver,) = self.pc.getTransceivers()

        async def ignore(packet: RtpPacket, arrival_time_ms: int) -> None:
            return None  # nothing decoded: sizes tell the burst from the silence

        transceiver.receiver._handle_rtp_packet = ignore  # type: ignore[method-assign]
        self.nomination = nomination
        if nomination == "priority":
            connection = self._connection()
            one_at_a_time = asyncio.Lock()  # FIFO: checks run in the order aioice starts them
            check = connection.check_start

            async def in_priority_order(pair: Any) -> None:
                async with one_at_a_time:
                    await check(pair)

            connection.check_start = in_priority_order

    def _connection(self) -> Any:
        (transceiver,) = self.pc.getTransceivers()
        return transceiver.receiver.transport.transport._connection

    async def connect(self, url: str, token: str, region: str) -> list[tuple[str, int]]:
        """Offer with the region's header, apply the answer; the answer's candidates."""
        import aiortc

        from ops.bench.globe import REGION_HEADER

        await self.pc.setLocalDescription(await self.pc.createOffer())
        assert self.pc.localDescription is not None
        self._stamp()
        headers = {
            "Content-Type": "application/sdp",
            "Authorization": f"Bearer {token}",
            REGION_HEADER: region,
        }
        request = urllib.request.Request(
            url, data=self.pc.localDescription.sdp.encode(), method="POST", headers=headers
        )

        def post() -> str:
            with urllib.request.urlopen(request, timeout=15) as response:
                return str(response.read().decode())

        answer = await asyncio.to_thread(post)
        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(answer, "answer"))
        return [
            (line.split()[4], int(line.split()[5]))
            for line in answer.splitlines()
            if line.startswith("a=candidate:")
        ]

    def _stamp(self) -> None:
        stamp_rtp_arrivals(
            self._connection(), lambda at, data: self.arrivals.append((at, len(data)))
        )

    def selected(self) -> tuple[str, int] | None:
        pair = self._connection()._nominated.get(1)
        return None if pair is None else tuple(pair.remote_addr)

    def round_trips(self, since: float) -> list[float]:
        """Per burst sent after ``since``: its echo's first loud packet minus its sending."""
        out = []
        loud = [at for at, size in self.arrivals if size >= LOUD_BYTES]
        for sent in self.bursts:
            if sent < since:
                continue
            heard = next((at for at in loud if sent < at < sent + CYCLE_FRAMES * FRAME), None)
            if heard is not None:
                out.append(heard - sent)
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pc.close()


async def _region(
    region: int, url: str, token: str, count: int, start: float, talk: float, by_priority: int
) -> dict[str, Any]:
    from ops.bench.globe import REGIONS, front_region

    packets = _beep_packets()
    kinds = ["first"] * count + ["priority"] * by_priority
    calls = [BeepCall(packets, kind) for kind in kinds]
    clients: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(max(0.0, start - time.time()))
        answers = []
        for call in calls:
            answers.append(await call.connect(url, token, REGIONS[region]))
        settled = time.monotonic() + 2.0  # ICE, DTLS and the first echo
        await asyncio.sleep(2.0 + talk)
        for call, candidates in zip(calls, answers, strict=True):
            selected = call.selected()
            trips = call.round_trips(settled)
            clients.append(
                {
                    "region": region,
                    "nomination": call.nomination,
                    "candidates": candidates,
                    "selected": selected,
                    "relay_region": front_region(selected) if selected else None,
                    "echo_rtt_ms": [round(1000 * t, 1) for t in trips],
                    "echo_rtt_p50_ms": round(1000 * percentile(trips, 50), 1) if trips else None,
                    "echoed_packets": len(call.arrivals),
                }
            )
    finally:
        await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)
    return {"clients": clients}


def region_process(args: tuple[int, str, str, int, float, float, int]) -> dict[str, Any]:
    """A process of one region's calls (started with the ``spawn`` method): aioice gathers only
    the region's client address."""
    import aioice.ice

    from ops.wan import host_address

    region = args[0]
    address = host_address(region, 50)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]
    try:
        return asyncio.run(_region(*args))
    except Exception:
        return {"error": traceback.format_exc()}
