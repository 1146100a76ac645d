"""The greedy client of tests/interop/test_admission_flood.py, as a process of its own.

    python tests/interop/flood_client.py HOST PORT TOKEN SECONDS RATE IDLE OFFER_FILE

POSTs the offer in OFFER_FILE as WHIP for SECONDS / 2, aiming at RATE a second over eight
threads, each on a new connection; then opens IDLE WebSocket upgrades (with TOKEN), leaves them
idle, and POSTs for SECONDS / 2 more. Prints what it was answered, as JSON: per phase, the POST
statuses and error codes, and the upgrades' statuses.
"""

from __future__ import annotations

import collections
import json
import resource
import socket
import sys
import threading
import time
from typing import Any


def upgrades(
    host: str, port: int, token: str, count: int
) -> tuple[list[socket.socket], dict[str, int]]:
    """``count`` upgrade requests left open, and what the node answered them."""
    request = (
        f"GET /v1/session HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    held = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(request)
        held.append(sock)
    answered: collections.Counter[str] = collections.Counter()
    for sock in held:
        try:
            line = sock.recv(4096).split(b"\r\n", 1)[0].decode()
            answered[line.split(" ")[1] if " " in line else "closed"] += 1
        except OSError:
            answered["error"] += 1
    return held, dict(answered)


def post_once(host: str, port: int, request: bytes) -> tuple[str, str]:
    """(HTTP status, the JSON error's code or "") of one POST on a new connection."""
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(request)
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return "error", ""
    if not reply:
        return "closed", ""
    status = reply.split(b" ", 2)[1].decode()
    body = reply.split(b"\r\n\r\n", 1)[-1]
    try:
        code = str(json.loads(body).get("code", ""))
    except ValueError:
        code = ""
    return status, code


def main() -> None:
    host, port_arg, token, seconds_arg, rate_arg, idle_arg, offer_path = sys.argv[1:8]
    port, seconds, rate, idle = int(port_arg), float(seconds_arg), int(rate_arg), int(idle_arg)
    with open(offer_path, "rb") as f:
        offer = f.read()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    request = (
        f"POST /v1/session HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/sdp\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(offer)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + offer
    posts = flood(host, port, request, seconds / 2, rate)
    held, ws = upgrades(host, port, token, idle)
    held_posts = flood(host, port, request, seconds / 2, rate)
    print(json.dumps({"posts": posts, "ws": ws, "held_posts": held_posts}))
    for sock in held:
        sock.close()


def flood(host: str, port: int, request: bytes, seconds: float, rate: int) -> dict[str, Any]:
    """POST ``request`` for ``seconds`` at up to ``rate`` a second: what came back."""
    statuses: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    threads = 8
    end = time.monotonic() + seconds

    def fire() -> None:
        next_at = time.monotonic()
        while time.monotonic() < end:
            status, code = post_once(host, port, request)
            with lock:
                statuses[status] += 1
                codes[code] += 1
            next_at += threads / rate
            time.sleep(max(0.0, next_at - time.monotonic()))

    workers = [threading.Thread(target=fire) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    sent = sum(statuses.values())
    return {"statuses": statuses, "codes": codes, "per_second": round(sent / seconds)}


if __name__ == "__main__":
    main()
