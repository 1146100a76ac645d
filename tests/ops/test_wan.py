"""The user-space WAN emulator (ops/wan.py) with real UDP sockets on loopback: a UDP echo server
behind a front, clients in regions, round trips timed by the client.

Tolerances: the emulator times each delay from the kernel's receive timestamp, and its own
lateness (departure minus schedule) measured 0.1-0.2 ms p50 here; the echo server and the
client are Python threads on a 2-core machine shared with other work, and their own wake-ups
add to what the client measures. So the median of a burst of pings must be within ±3 ms of
10 and 60 ms, ±5 ms of 100 and 150 ms. Measured (load average ~1.4 from other engineers' runs):
medians 10.2, 60.4, 60.4, 100.4 and 150.5 ms.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from ops.wan import Link, Matrix, Wan, front_address, host_address, region_of

RTTS = {(1, 1): 0.010, (2, 2): 0.010, (3, 3): 0.010, (1, 2): 0.060, (1, 3): 0.150, (2, 3): 0.100}


class Echo:
    """A UDP echo server in a thread: answers every datagram to its sender, records senders."""

    def __init__(self, host: str = "127.0.9.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.05)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.senders: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.senders.add(sender)
            self.sock.sendto(data, sender)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    server = Echo()
    yield server
    server.close()


def client(region: int, host: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host_address(region, host), 0))
    sock.settimeout(2.0)
    return sock


def pings(sock: socket.socket, to: tuple[str, int], count: int, gap: float = 0.02) -> list[float]:
    """Round trips of ``count`` sequential pings, seconds (a lost one is skipped)."""
    out = []
    for n in range(count):
        payload = n.to_bytes(4, "big")
        start = time.monotonic()
        sock.sendto(payload, to)
        try:
            while sock.recv(100) != payload:
                pass
        except TimeoutError:
            continue
        out.append(time.monotonic() - start)
        time.sleep(gap)
    return out


def test_addresses_and_regions() -> None:
    assert host_address(2, 7) == "127.0.2.7"
    assert front_address(3, 1) == "127.1.3.1"
    assert region_of("127.0.2.7") == 2
    assert region_of("127.0.0.1") is None and region_of("127.1.2.1") is None
    assert region_of("::1") is None and region_of("nonsense") is None
    with pytest.raises(ValueError):
        host_address(0, 1)
    with pytest.raises(ValueError, match="no link between regions 1 and 2"):
        Matrix((1, 2), {(1, 1): Link(0.01), (2, 2): Link(0.01)})
    with pytest.raises(ValueError):
        Link(0.01, jitter=0.02)


@pytest.mark.parametrize(
    ("source", "target", "tolerance"),
    [(1, 1, 0.003), (1, 2, 0.003), (2, 1, 0.003), (1, 3, 0.005), (3, 2, 0.005)],
)
def test_round_trips_match_the_matrix(
    echo: Echo, source: int, target: int, tolerance: float
) -> None:
    matrix = Matrix.of_rtts(RTTS)
    with Wan(matrix) as wan:
        front = wan.add_front(target, echo.address)
        with client(source, 5) as sock:
            measured = pings(sock, front.address, 12 if matrix.rtt(source, target) > 0.1 else 20)
        lateness = wan.lateness()
    assert len(measured) >= 10
    expected = matrix.rtt(source, target)
    median = statistics.median(measured)
    print(f"{source}->{target}: configured {expected * 1000:.0f} ms, median {median * 1000:.2f} ms")
    print(f"emulator lateness {lateness}")
    assert abs(median - expected) <= tolerance, (median, expected, measured)
    assert min(measured) >= expected - 0.001, measured  # never faster than the cable
    # every ping and its answer left on schedule (what the emulator itself adds, ms)
    assert lateness["n"] >= 2 * len(measured)
    assert lateness["p50_ms"] < 2.0, lateness


def test_each_client_gets_its_own_mapping_and_its_own_answers(echo: Echo) -> None:
    with Wan(Matrix.of_rtts(RTTS)) as wan:
        front = wan.add_front(2, echo.address)
        socks = [client(1, 5), client(1, 5), client(3, 6)]
        try:
            for n, sock in enumerate(socks):
                sock.sendto(bytes([n]), front.address)
            for n, sock in enumerate(socks):
                data, sender = sock.recvfrom(100)
                assert data == bytes([n])
                assert sender == front.address  # answers come from the public address
        finally:
            for sock in socks:
                sock.close()
        assert wan.mappings() == 3
    # the server saw three senders, each in the mapped range of its client's region and host
    assert len(echo.senders) == 3
    assert sorted(host for host, _ in echo.senders) == ["127.2.1.5", "127.2.1.5", "127.2.3.6"]


def test_loss_drops_each_direction_with_its_probability(echo: Echo) -> None:
    matrix = Matrix((1,), {(1, 1): Link(0.002, loss=0.3)})
    with Wan(matrix, seed=7) as wan:
        front = wan.add_front(1, echo.address)
        with client(1, 5) as sock:
            sock.settimeout(0.5)
            for n in range(400):
                sock.sendto(n.to_bytes(2, "big"), front.address)
                if n % 50 == 49:
                    time.sleep(0.01)  # keep the buffers shallow
            heard = 0
            with pytest.raises(TimeoutError):
                while True:
                    sock.recv(100)
                    heard += 1
        lost = wan.counters["lost"]
    # both ways survive with 0.7 * 0.7 = 0.49; a binomial of 400 stays within ±0.1
    assert 0.39 <= heard / 400 <= 0.59, heard
    assert lost == 400 - heard  # each datagram not heard was lost once, on one of the ways


def test_jitter_keeps_order_and_spreads_the_delay(echo: Echo) -> None:
    matrix = Matrix((1,), {(1, 1): Link(0.040, jitter=0.010)})
    with Wan(matrix, seed=3) as wan:
        front = wan.add_front(1, echo.address)
        with client(1, 5) as sock:
            for n in range(50):
                sock.sendto(n.to_bytes(2, "big"), front.address)
                time.sleep(0.002)
            order = [int.from_bytes(sock.recv(100), "big") for _ in range(50)]
    assert order == list(range(50))  # jitter never reorders one direction of a mapping


def test_unknown_senders_and_too_many_mappings_are_dropped(echo: Echo) -> None:
    with Wan(Matrix.of_rtts(RTTS), max_mappings=2) as wan:
        front = wan.add_front(1, echo.address)
        outsider = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        outsider.bind(("127.0.0.1", 0))  # no region: 127.0.0.x
        socks = [client(1, n) for n in (5, 6, 7)]
        try:
            outsider.sendto(b"x", front.address)
            for sock in socks:
                sock.sendto(b"y", front.address)
            for sock in socks[:2]:
                assert sock.recv(10) == b"y"
            socks[2].settimeout(0.2)
            with pytest.raises(TimeoutError):
                socks[2].recv(10)
        finally:
            outsider.close()
            for sock in socks:
                sock.close()
        assert wan.counters["unknown_region"] == 1
        assert wan.counters["mappings_full"] == 1
        assert wan.mappings() == 2


def test_idle_mappings_expire(echo: Echo) -> None:
    with Wan(Matrix.of_rtts(RTTS), idle_timeout=0.2) as wan:
        front = wan.add_front(1, echo.address)
        with client(1, 5) as sock:
            sock.sendto(b"z", front.address)
            assert sock.recv(10) == b"z"
            assert wan.mappings() == 1
            deadline = time.monotonic() + 3
            while wan.mappings() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert wan.mappings() == 0 and wan.counters["mappings_expired"] == 1
            sock.sendto(b"w", front.address)  # a new mapping, as after a NAT's timeout
            assert sock.recv(10) == b"w"


def test_stop_is_clean_and_prompt(echo: Echo) -> None:
    wan = Wan(Matrix.of_rtts(RTTS)).start()
    front = wan.add_front(3, echo.address)  # fronts may be added while it runs
    address = front.address
    with client(1, 5) as sock:
        for n in range(20):  # 150 ms away: all of it still in flight at stop
            sock.sendto(bytes([n]), address)
        time.sleep(0.02)
        started = time.monotonic()
        wan.stop()
        took = time.monotonic() - started
    assert took < 0.5, took
    assert not wan.running()
    assert wan.counters["dropped_at_stop"] > 0
    assert front.sock.fileno() == -1
    # the public port is free again
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    again.bind(address)
    again.close()
    wan.stop()  # twice is harmless
    with pytest.raises(RuntimeError):
        wan.start()


def test_a_default_region_takes_senders_from_outside_every_range(echo: Echo) -> None:
    matrix = Matrix.of_rtts(RTTS)
    with pytest.raises(ValueError, match="default_region"):
        Wan(matrix, default_region=9)
    with Wan(matrix, default_region=3, realtime=True) as wan:
        front = wan.add_front(1, echo.address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))  # as a browser that picks its own address
            sock.settimeout(2.0)
            measured = pings(sock, front.address, 5)
    assert len(measured) >= 4
    assert abs(statistics.median(measured) - 0.150) <= 0.005, measured  # region 3 to region 1
    assert echo.senders and {host for host, _ in echo.senders} == {"127.2.3.1"}


def test_placed_flows_take_their_own_region_whatever_their_address(echo: Echo) -> None:
    """Browsers on 127.0.0.1, each placed in a region by its socket's port: each flow's
    datagrams take its own region's delays; an unplaced one is dropped; a placed flow that is
    already mapped moves with its placement."""
    matrix = Matrix.of_rtts(RTTS)
    with Wan(matrix) as wan:
        front = wan.add_front(1, echo.address)
        with pytest.raises(ValueError, match="region 9"):
            wan.place(("127.0.0.1", 1), 9)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for sock in socks:
                sock.bind(("127.0.0.1", 0))  # the address a browser picks
                sock.settimeout(2.0)
            near, far, unplaced = socks
            wan.place(near.getsockname(), 1)
            wan.place(far.getsockname(), 3)
            near_rtts = pings(near, front.address, 8)
            far_rtts = pings(far, front.address, 5)
            unplaced.settimeout(0.3)
            unplaced.sendto(b"?", front.address)
            with pytest.raises(TimeoutError):
                unplaced.recv(10)
            assert wan.mapped(near.getsockname()) == {front.address: 1}
            assert wan.mapped(far.getsockname()) == {front.address: 3}
            assert wan.mapped(unplaced.getsockname()) == {}
            wan.place(near.getsockname(), 2)  # the near host moves to region 2: 60 ms away
            moved_rtts = pings(near, front.address, 5)
            assert wan.mapped(near.getsockname()) == {front.address: 2}
        finally:
            for sock in socks:
                sock.close()
        assert wan.counters["unknown_region"] == 1
    assert abs(statistics.median(near_rtts) - 0.010) <= 0.003, near_rtts
    assert abs(statistics.median(far_rtts) - 0.150) <= 0.005, far_rtts
    assert abs(statistics.median(moved_rtts) - 0.060) <= 0.003, moved_rtts
    # the server told them apart by the region each was mapped from
    assert {host for host, _ in echo.senders} == {"127.2.1.1", "127.2.3.1"}
