"""The clients of ops/bench/scale.py: up to a thousand light WebRTC sessions
(:class:`~ops.bench.lite_client.Client`) in one Trio process, each on a UDP socket of its own.

A session POSTs its offer (a thread, the blocking ``urllib``), sends connectivity checks to
the answer's first candidate until ICE answers, drives the DTLS handshake (retransmitting on
its timer) until SRTP is keyed, then stays connected with a consent check every
:data:`CONSENT_PERIOD` (a node ends a session after 30 s without one, RFC 7675). Idle, it
sends nothing else. Talking, it sends a pre-encoded Opus frame every 20 ms, paced from the
first one (no drift), and records each echoed RTP packet's arrival as the kernel stamped it
(``SIOCGSTAMP``) with its RTP timestamp.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Final, final

import trio

from ops.bench.arrivals import SPEECH_TEXT, kernel_receive_time, realtime_offset
from ops.bench.lite_client import Client, answer_candidates, certificates, offer_sdp

__all__ = ["CONSENT_PERIOD", "Fleet", "Session", "speech_payloads"]

FRAME: Final = 0.020
CONSENT_PERIOD: Final = 5.0
CONNECT_TIMEOUT: Final = 20.0
HTTP_TIMEOUT: Final = 20.0
#: ICE checks are repeated this often until one is answered
CHECK_RETRY: Final = 0.5


def speech_payloads() -> list[bytes]:
    """espeak-ng speech plus 0.5 s of silence, as 20 ms Opus packets (the node's encoder)."""
    from sessions.audio import speech
    from sessions.audio.opus import OpusEncoder

    frames = speech.frames(speech.speak(SPEECH_TEXT, rate=190))
    frames += [bytes(len(frames[0]))] * round(0.5 / FRAME)
    encoder = OpusEncoder()
    return [encoder.encode(frame) for frame in frames]


def _post(url: str, offer: bytes, token: str | None) -> tuple[int, str, str | None]:
    """POST an offer; (status, body, Location)."""
    headers = {"Content-Type": "application/sdp"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, offer, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read().decode(), response.headers.get("Location")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), None


@final
class Session:
    """One connected client session: its :class:`Client`, socket and talking state."""

    def __init__(self, client: Client, sock: trio.socket.SocketType, location: str | None):
        self.client = client
        self.sock = sock
        self.location = location
        self.talking: trio.CancelScope | None = None
        #: how late each frame was sent after its time, seconds (while talking)
        self.send_lags: list[float] = []
        self._clock = realtime_offset()

    async def serve(self) -> None:
        """Stay connected: consent checks, and take whatever comes back."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._consent)
            fd = self.sock.fileno()
            while True:
                data = await self.sock.recv(2048)
                at = kernel_receive_time(fd, self._clock) if self.client.record else 0.0
                for reply in self.client.receive(data, at):
                    await self.sock.send(reply)

    async def _consent(self) -> None:
        while True:
            await trio.sleep(CONSENT_PERIOD)
            await self.sock.send(self.client.check())

    async def talk(self, payloads: Sequence[bytes], task_status: trio.TaskStatus[None]) -> None:
        """Send ``payloads`` in a loop, one every 20 ms, until cancelled."""
        with trio.CancelScope() as scope:
            self.talking = scope
            task_status.started()
            start = trio.current_time()
            index = 0
            while True:
                self.send_lags.append(trio.current_time() - (start + index * FRAME))
                await self.sock.send(self.client.packet(payloads[index % len(payloads)]))
                index += 1
                await trio.sleep_until(start + index * FRAME)


async def _handshake(client: Client, sock: trio.socket.SocketType) -> None:
    """ICE, then DTLS, until SRTP is keyed (the caller bounds the time)."""
    next_check = 0.0
    while not client.keyed:
        now = trio.current_time()
        if now >= next_check and not client.dtls_timeout():
            await sock.send(client.check())
            next_check = now + CHECK_RETRY
        wait = client.dtls_timeout()
        wait = CHECK_RETRY if wait is None else min(max(wait, 0.001), CHECK_RETRY)
        data = None
        with trio.move_on_after(wait):
            data = await sock.recv(2048)
        if data is None:
            replies = client.handle_dtls_timeout()
        else:
            replies = client.receive(data, trio.current_time())
        for reply in replies:
            await sock.send(reply)


@final
class Fleet:
    """The bench's client sessions against one node's signaling ``url``."""

    def __init__(self, url: str, token: str | None, nursery: trio.Nursery) -> None:
        self.url = url
        self.token = token
        self.sessions: list[Session] = []
        #: why setups failed: reason -> count
        self.failures: dict[str, int] = {}
        self.setup_seconds: list[float] = []
        self._nursery = nursery
        self._server_cert, self._cert = certificates()
        self._offer = offer_sdp(self._cert.fingerprint_sha256).encode()

    def _fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    async def grow(self, count: int, *, batch: int = 20, attempts: int | None = None) -> None:
        """Connect sessions, ``batch`` at a time, until ``count`` are connected or ``attempts``
        setups (default: twice the shortfall) were made."""
        limiter = trio.CapacityLimiter(batch)
        budget = attempts if attempts is not None else 2 * max(0, count - len(self.sessions))
        while len(self.sessions) < count and budget > 0:
            wanted = min(batch, count - len(self.sessions), budget)
            budget -= wanted
            async with trio.open_nursery() as nursery:
                for _ in range(wanted):
                    nursery.start_soon(self._connect, limiter)

    async def _connect(self, limiter: trio.CapacityLimiter) -> None:
        started = trio.current_time()
        try:
            status, answer, location = await trio.to_thread.run_sync(
                _post, self.url, self._offer, self.token, limiter=limiter
            )
        except OSError as exc:
            self._fail(f"POST: {type(exc).__name__}")
            return
        if status != 201:
            self._fail(f"POST answered {status}")
            return
        candidates = answer_candidates(answer)
        if not candidates:
            self._fail("answer without a host candidate")
            return
        client = Client(answer, self._cert)
        client.record = False
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        await sock.connect(candidates[0])
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            try:
                await _handshake(client, sock)
            except OSError as exc:
                sock.close()
                self._fail(f"handshake: {type(exc).__name__}")
                return
        if scope.cancelled_caught:
            sock.close()
            self._fail(f"not keyed within {CONNECT_TIMEOUT:g} s")
            return
        session = Session(client, sock, location)
        self.sessions.append(session)
        self.setup_seconds.append(trio.current_time() - started)
        self._nursery.start_soon(self._serve, session)

    async def _serve(self, session: Session) -> None:
        with contextlib.suppress(OSError):
            await session.serve()
        # the node (or relay) refused us: the session is gone
        self._fail("connection lost")
        with contextlib.suppress(ValueError):
            self.sessions.remove(session)

    async def talk(self, count: int, payloads: Sequence[bytes]) -> list[Session]:
        """The first ``count`` sessions start talking (recording their echoes)."""
        talkers = self.sessions[:count]
        for session in talkers:
            session.client.record = True
            await self._nursery.start(session.talk, payloads)
        return talkers

    def quiet(self) -> None:
        """Every session stops talking and recording."""
        for session in self.sessions:
            if session.talking is not None:
                session.talking.cancel()
                session.talking = None
            session.client.record = False
            session.send_lags.clear()
            session.client.echoes.clear()
            session.client.timestamps.clear()
