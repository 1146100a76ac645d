"""A WAN in user space on loopback: regions a given round-trip time apart, for one machine.

This machine's kernel has no ``sch_netem``, so ``tc`` cannot delay packets. The emulator does it
in one thread instead, like a set of 1:1 NATs with a long cable behind each:

* **Regions** are numbered from 1. A host of region ``r`` (a client, a node's tunnel socket)
  sends from ``127.0.r.x`` (:func:`host_address`); Linux routes all of 127/8 to ``lo``, so any
  such address can be bound without configuring anything.
* A **front** stands for a server in a region: it listens on ``127.1.r.n:PORT`` (the address the
  server advertises, e.g. a relay's ``relay.advertise`` or ``relay.tunnel_advertise``) and
  forwards what it hears to the server's bound address (``inside``). Each sender gets a socket of
  its own, bound to ``127.2.<its region>.<its host>`` (a *mapping*, as a NAT keeps one per
  flow), so the server tells clients apart and its answers find their way back, out of the
  front's public address.
* Each direction is delayed by half the round-trip time between the sender's region and the
  front's (:class:`Matrix`), plus optional jitter (uniform, order kept per direction of a
  mapping, as a path keeps order) and loss.

Delays are measured from the kernel's receive timestamp (``SO_TIMESTAMPNS``), so a late wake-up
of the thread does not add to them, and held in one heap: the thread sleeps until the earliest
departure (``epoll`` to the millisecond below it, then a sub-millisecond sleep). What the
emulator adds beyond the configured delay, its *lateness*, is recorded per packet
(:meth:`Wan.lateness`). Memory is bounded: at most ``max_queued`` datagrams wait and at most
``max_mappings`` mappings exist (idle ones expire); excess is counted and dropped. Senders from
no configured region are dropped, or taken for ``default_region`` when it is set (a program
that cannot be told its source address, such as a browser sending from 127.0.0.1).

A sender that cannot choose its address can still be put in a region of its own, one **flow**
(address and port) at a time: :meth:`Wan.place` says "the host behind this socket is in region
r", which the emulator then believes before the address (several browsers on 127.0.0.1, each
placed by its host candidate's port, each in its own region). Placing is the emulator's model
of where a host is, not a packet filter: it should happen before the flow's first datagram, and
a flow already mapped moves with it (its next datagrams take the new region's delays).
:meth:`Wan.stop` joins the thread and closes every socket.
"""

from __future__ import annotations

import collections
import errno
import heapq
import ipaddress
import itertools
import math
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Final, final

import attrs

__all__ = [
    "Front",
    "Link",
    "Matrix",
    "Wan",
    "front_address",
    "host_address",
    "region_of",
]

Address = tuple[str, int]

#: Linux: SO_TIMESTAMPNS (the socket module does not export it), and its control message type
_SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("@qq")
_CMSG_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)
#: the longest the thread sleeps without looking at its stop flag and its mappings' idleness
_IDLE_WAIT: Final = 0.05
#: lateness samples kept (the newest)
_SAMPLES: Final = 100_000


def host_address(region: int, host: int) -> str:
    """The address host ``host`` (1-254) of region ``region`` (1-254) sends from."""
    _check_octet("region", region)
    _check_octet("host", host)
    return f"127.0.{region}.{host}"


def front_address(region: int, index: int) -> str:
    """The public address of front ``index`` (1-254) in region ``region``."""
    _check_octet("region", region)
    _check_octet("front", index)
    return f"127.1.{region}.{index}"


def region_of(host: str) -> int | None:
    """The region a ``127.0.r.x`` host address belongs to; None for any other address."""
    try:
        packed = ipaddress.IPv4Address(host).packed
    except ValueError:
        return None
    if packed[0] != 127 or packed[1] != 0 or not 1 <= packed[2] <= 254:
        return None
    return packed[2]


def _check_octet(what: str, value: int) -> None:
    if not 1 <= value <= 254:
        raise ValueError(f"{what} must be between 1 and 254, not {value}")


@final
@attrs.frozen
class Link:
    """A path between two regions: round-trip time, jitter (each direction, uniform in
    ±jitter) and loss (each direction, a probability), seconds."""

    rtt: float
    jitter: float = 0.0
    loss: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not (self.rtt >= 0 and 0 <= self.jitter <= self.rtt / 2 and 0 <= self.loss < 1):
            raise ValueError(f"a link needs rtt >= 0, 0 <= jitter <= rtt/2, 0 <= loss < 1: {self}")


@final
@attrs.frozen
class Matrix:
    """The links between regions, the same both ways: ``links[(a, b)]`` with a <= b; every pair
    of ``regions`` (a region with itself too) must have one."""

    regions: tuple[int, ...]
    links: Mapping[tuple[int, int], Link]

    def __attrs_post_init__(self) -> None:
        for region in self.regions:
            _check_octet("region", region)
        for a, b in itertools.combinations_with_replacement(sorted(self.regions), 2):
            if (a, b) not in self.links:
                raise ValueError(f"no link between regions {a} and {b}")

    @classmethod
    def of_rtts(
        cls, rtts: Mapping[tuple[int, int], float], *, jitter: float = 0.0, loss: float = 0.0
    ) -> Matrix:
        """From round-trip times in seconds, keyed by region pairs in either order."""
        links = {
            (min(a, b), max(a, b)): Link(rtt, min(jitter, rtt / 2), loss)
            for (a, b), rtt in rtts.items()
        }
        regions = tuple(sorted({r for pair in links for r in pair}))
        return cls(regions, links)

    def link(self, a: int, b: int) -> Link:
        return self.links[(min(a, b), max(a, b))]

    def rtt(self, a: int, b: int) -> float:
        return self.link(a, b).rtt


@final
class Front:
    """The public side of one server in a region (made by :meth:`Wan.add_front`)."""

    def __init__(self, region: int, sock: socket.socket, inside: Address | None) -> None:
        self.region = region
        self.sock = sock
        self.address: Address = sock.getsockname()
        #: where its datagrams go: the server's bound address (None: dropped until set)
        self.inside = inside
        self.mappings: dict[Address, _Mapping] = {}


@final
class _Mapping:
    __slots__ = ("client", "front", "last", "region", "sock", "to_client", "to_server")

    def __init__(self, front: Front, client: Address, region: int, sock: socket.socket) -> None:
        self.front = front
        self.client = client
        self.region = region
        self.sock = sock
        self.last = time.monotonic()
        #: the latest departure scheduled each way (jitter never reorders a direction)
        self.to_server = 0.0
        self.to_client = 0.0


@final
class Wan:
    """The emulator: add fronts, then ``start()`` (or ``with Wan(...) as wan:``), ``stop()``."""

    def __init__(
        self,
        matrix: Matrix,
        *,
        seed: int = 0,
        max_mappings: int = 1024,
        max_queued: int = 20_000,
        idle_timeout: float = 120.0,
        default_region: int | None = None,
        realtime: bool = False,
    ) -> None:
        if default_region is not None and default_region not in matrix.regions:
            raise ValueError(f"default_region {default_region} is not in the matrix")
        self.matrix = matrix
        #: the region of senders outside every region's range (None: they are dropped)
        self.default_region = default_region
        #: ask for SCHED_FIFO for the thread (needs CAP_SYS_NICE; without it, ignored): on a
        #: saturated machine a normal thread wakes milliseconds late
        self.realtime = realtime
        #: whether the thread got SCHED_FIFO
        self.realtime_applied = False
        self.max_mappings = max_mappings
        self.max_queued = max_queued
        self.idle_timeout = idle_timeout
        self.fronts: list[Front] = []
        self.counters: dict[str, int] = collections.Counter()
        self._random = random.Random(seed)
        self._heap: list[tuple[float, int, socket.socket, bytes, Address]] = []
        self._order = itertools.count()
        self._by_fd: dict[int, Front | _Mapping] = {}
        self._mappings = 0
        #: flows (address, port) placed in a region by :meth:`place`
        self._placed: dict[Address, int] = {}
        self._late: collections.deque[float] = collections.deque(maxlen=_SAMPLES)
        self._poll = select.epoll()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # add_front while running; lateness() from other threads
        self._closed = False

    # -- setup -----------------------------------------------------------------------------------

    def add_front(
        self, region: int, inside: Address | None = None, *, index: int = 0, port: int = 0
    ) -> Front:
        """A front for a server of ``region`` at ``127.1.region.index:port`` (index 0: the next
        free one; port 0: any); ``inside`` may be set later (``front.inside = ...``)."""
        if region not in self.matrix.regions:
            raise ValueError(f"region {region} is not in the matrix {self.matrix.regions}")
        with self._lock:
            if not index:
                index = 1 + sum(f.region == region for f in self.fronts)
            sock = self._socket((front_address(region, index), port))
            front = Front(region, sock, inside)
            self.fronts.append(front)
            self._by_fd[sock.fileno()] = front
            self._poll.register(sock.fileno(), select.EPOLLIN)
        return front

    def place(self, flow: Address, region: int) -> None:
        """Take the sender ``flow`` (its address and port, as the fronts see it) for a host of
        ``region`` from now on, whatever its address; its mappings made before move too.

        For hosts that cannot pick their source address (browsers on 127.0.0.1): place each
        one's socket, e.g. by the port of its ICE host candidate, before it sends."""
        if region not in self.matrix.regions:
            raise ValueError(f"region {region} is not in the matrix {self.matrix.regions}")
        flow = (str(flow[0]), int(flow[1]))
        with self._lock:
            self._placed[flow] = region
            for front in self.fronts:
                mapping = front.mappings.get(flow)
                if mapping is not None:
                    mapping.region = region

    def mapped(self, flow: Address) -> dict[Address, int]:
        """Where ``flow`` has a mapping now: each front's address and the region the emulator
        took the sender for (what it delays that flow's datagrams by)."""
        flow = (str(flow[0]), int(flow[1]))
        with self._lock:
            return {
                front.address: front.mappings[flow].region
                for front in self.fronts
                if flow in front.mappings
            }

    def _socket(self, bind: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            sock.bind(bind)
        except OSError:
            sock.close()
            raise
        return sock

    # -- lifetime --------------------------------------------------------------------------------

    def start(self) -> Wan:
        if self._thread is not None or self._closed:
            raise RuntimeError("a Wan starts once")
        self._thread = threading.Thread(target=self._run, name="wan", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (what still waits is dropped) and close every socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the WAN emulator's thread did not stop")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.counters["dropped_at_stop"] += len(self._heap)
            self._heap.clear()
            for front in self.fronts:
                for mapping in front.mappings.values():
                    mapping.sock.close()
                front.mappings.clear()
                front.sock.close()
            self._by_fd.clear()
            self._poll.close()

    def __enter__(self) -> Wan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- figures ---------------------------------------------------------------------------------

    def lateness(self) -> dict[str, float | int]:
        """How late datagrams left against their scheduled departure (the error the emulator
        adds to the configured delays), ms: p50, p99, max, over the newest samples."""
        with self._lock:
            samples = sorted(self._late)
        if not samples:
            return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}

        def at(q: float) -> float:
            return round(1000 * samples[max(1, math.ceil(q * len(samples))) - 1], 3)

        return {"n": len(samples), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}

    def mappings(self) -> int:
        return self._mappings

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.realtime:
            # A thread's own id schedules only this thread. The thread sleeps between
            # departures and its work per wake-up is bounded (256 reads a socket), and the
            # kernel's RT throttling caps a runaway anyway.
            try:
                os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(10))
                self.realtime_applied = True
            except (OSError, AttributeError):
                pass
        next_expiry = time.monotonic() + 1.0
        while not self._stop.is_set():
            self._send_due()
            wait = self._heap[0][0] - time.time() if self._heap else _IDLE_WAIT
            wait = min(wait, _IDLE_WAIT)
            with self._lock:
                if self._closed:
                    return
                # epoll rounds its timeout up to a millisecond: wait in it only up to the last
                # whole millisecond, then sleep (sub-millisecond) until the departure.
                events = self._poll.poll(math.floor(wait * 1000) / 1000 if wait >= 0.001 else 0)
                for fd, _ in events:
                    target = self._by_fd.get(fd)
                    if isinstance(target, Front):
                        self._from_client(target)
                    elif target is not None:
                        self._from_server(target)
            if not events and self._heap:
                rest = self._heap[0][0] - time.time()
                if 0 < rest < 0.0015:
                    time.sleep(rest)
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + 1.0
                self._expire()

    def _send_due(self) -> None:
        heap = self._heap
        while heap and heap[0][0] <= time.time():
            at, _, sock, data, dest = heapq.heappop(heap)
            try:
                sock.sendto(data, dest)
            except OSError as exc:  # the other side's socket is gone, or a full buffer
                self.counters["send_errors"] += 1
                if exc.errno == errno.EBADF:
                    continue
            else:
                self.counters["sent"] += 1
            self._late.append(time.time() - at)

    def _read(self, sock: socket.socket) -> Iterable[tuple[bytes, Address, float]]:
        """Everything waiting on ``sock``, with the kernel's arrival time (CLOCK_REALTIME)."""
        for _ in range(256):  # a bound: the heap's due datagrams must not wait for a flood
            try:
                data, ancillary, _, sender = sock.recvmsg(65535, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED from an earlier send
                self.counters["receive_errors"] += 1
                continue
            arrival = time.time()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                    arrival = sec + nsec / 1e9
            yield data, sender, arrival

    def _from_client(self, front: Front) -> None:
        for data, client, arrival in self._read(front.sock):
            self.counters["from_clients"] += 1
            mapping = front.mappings.get(client)
            if mapping is None:
                mapping = self._map(front, client)
                if mapping is None:
                    continue
            if front.inside is None:
                self.counters["no_inside"] += 1
                continue
            mapping.last = time.monotonic()
            at = self._departure(mapping.region, front.region, arrival, mapping.to_server)
            if at is not None:
                mapping.to_server = at
                self._schedule(at, mapping.sock, data, front.inside)

    def _from_server(self, mapping: _Mapping) -> None:
        front = mapping.front
        for data, sender, arrival in self._read(mapping.sock):
            if sender != front.inside:  # a NAT's filtering: only the server may answer
                self.counters["not_from_inside"] += 1
                continue
            self.counters["from_servers"] += 1
            mapping.last = time.monotonic()
            at = self._departure(front.region, mapping.region, arrival, mapping.to_client)
            if at is not None:
                mapping.to_client = at
                self._schedule(at, front.sock, data, mapping.client)

    def _map(self, front: Front, client: Address) -> _Mapping | None:
        region = self._placed.get(client)
        if region is None:
            region = region_of(client[0])
        if region is None:
            region = self.default_region
        if region is None or region not in self.matrix.regions:
            self.counters["unknown_region"] += 1
            return None
        if self._mappings >= self.max_mappings:
            self.counters["mappings_full"] += 1
            return None
        host = ipaddress.ip_address(client[0]).packed[-1] or 1
        try:
            sock = self._socket((f"127.2.{region}.{host}", 0))
        except OSError:
            self.counters["mapping_errors"] += 1
            return None
        mapping = _Mapping(front, client, region, sock)
        front.mappings[client] = mapping
        self._by_fd[sock.fileno()] = mapping
        self._poll.register(sock.fileno(), select.EPOLLIN)
        self._mappings += 1
        self.counters["mappings_made"] += 1
        return mapping

    def _departure(self, source: int, target: int, arrival: float, last: float) -> float | None:
        link = self.matrix.link(source, target)
        if link.loss and self._random.random() < link.loss:
            self.counters["lost"] += 1
            return None
        delay = link.rtt / 2
        if link.jitter:
            delay += self._random.uniform(-link.jitter, link.jitter)
        return max(arrival + delay, last)

    def _schedule(self, at: float, sock: socket.socket, data: bytes, dest: Address) -> None:
        if len(self._heap) >= self.max_queued:
            self.counters["queue_full"] += 1
            return
        heapq.heappush(self._heap, (at, next(self._order), sock, data, dest))

    def _expire(self) -> None:
        with self._lock:
            idle_since = time.monotonic() - self.idle_timeout
            for front in self.fronts:
                for client, mapping in list(front.mappings.items()):
                    if mapping.last < idle_since:
                        del front.mappings[client]
                        del self._by_fd[mapping.sock.fileno()]
                        self._poll.unregister(mapping.sock.fileno())
                        mapping.sock.close()  # a queued answer to it fails with EBADF
                        self._mappings -= 1
                        self.counters["mappings_expired"] += 1
