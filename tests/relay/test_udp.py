"""relay/udp.py: the one UDP drain loop every packet path uses, over real loopback sockets."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from relay import udp
from relay.udp import (
    GSO_MAX_SEGMENTS,
    Address,
    BatchSender,
    bound_udp,
    drain_forever,
    kernel_drops,
    send_nowait,
)


async def test_datagrams_waiting_are_drained_in_bounded_batches_with_one_flush_each() -> None:
    got: list[tuple[bytes, Address]] = []
    flushes: list[int] = []
    async with bound_udp("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.bind(("127.0.0.1", 0))
            for index in range(7):  # all waiting before the loop first looks
                sender.sendto(b"d%d" % index, ("127.0.0.1", port))
            source = sender.getsockname()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: drain_forever(
                        sock, lambda d, a: got.append((d, a)), flushes.append, batch=3
                    )
                )
                with trio.fail_after(5):
                    while sum(flushes) < 7:  # noqa: ASYNC110 - the loop reports through a list
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert got == [(b"d%d" % i, source) for i in range(7)]
    assert flushes[:3] == [3, 3, 1]  # a full batch, another, then what was left


async def test_an_icmp_error_from_an_earlier_send_is_skipped() -> None:
    # A connected UDP socket hears of the ICMP port unreachable its send caused (RFC 1122
    # §4.1.3.3) as ECONNREFUSED on its next receive: not a reason to stop reading.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        peer = gone.getsockname()
    got: list[bytes] = []
    async with bound_udp("127.0.0.1", 0) as sock:
        sock.connect(peer)
        assert send_nowait(sock, b"to nobody", peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: drain_forever(sock, lambda d, _: got.append(d)))
            await trio.sleep(0.05)  # the refusal arrives and is read (and skipped)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back:
                back.bind(peer)  # the peer is back, at the address the socket is connected to
                back.sendto(b"hello again", sock.getsockname())
                with trio.fail_after(5):
                    while not got:  # noqa: ASYNC110 - the loop reports through a list
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert got == [b"hello again"]


async def test_a_send_that_cannot_go_is_dropped_not_raised() -> None:
    async with bound_udp("127.0.0.1", 0) as sock:
        assert send_nowait(sock, b"fine", sock.getsockname())
        # Too big for UDP at all (EMSGSIZE): the caller counts the loss.
        assert not send_nowait(sock, bytes(70_000), sock.getsockname())
        assert kernel_drops(sock, None) == 0


def _receive_all(sock: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    sock.settimeout(1.0)
    while True:
        try:
            got.append(sock.recv(70_000))
        except TimeoutError:
            return got
        sock.settimeout(0.05)


def test_a_run_of_equal_sized_datagrams_leaves_in_one_segmented_send() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        out.setblocking(False)
        peer.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        to, elsewhere = peer.getsockname(), other.getsockname()
        sender = BatchSender(out, gso=True)
        run = [bytes([i]) * 1200 for i in range(5)] + [b"short"]
        datagrams = [(data, to) for data in run]
        # Then one elsewhere (a new run), and two that may not share a run: a bigger one
        # after a smaller one.
        datagrams += [(b"x" * 100, elsewhere), (b"y" * 10, to), (b"z" * 20, to)]
        assert sender.send(datagrams) == (len(datagrams), 0)
        assert sender.gso and sender.batches == 1
        # The kernel splits the segmented send into the datagrams it was given, in order.
        assert _receive_all(peer) == [*run, b"y" * 10, b"z" * 20]
        assert _receive_all(other) == [b"x" * 100]


def test_a_run_is_at_most_the_kernels_segment_limit() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        out.setblocking(False)
        peer.bind(("127.0.0.1", 0))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sender = BatchSender(out, gso=True)
        many = [(b"%04d" % i + bytes(96), peer.getsockname()) for i in range(GSO_MAX_SEGMENTS + 6)]
        assert sender.send(many) == (len(many), 0)
        assert sender.batches == 2
        assert _receive_all(peer) == [data for data, _ in many]


class _NoOffload:
    """A socket whose path has no segmentation offload: the kernel answers EIO."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendmsg(self, *args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def sendto(self, data: bytes, addr: Address) -> int:
        self.sent.append(data)
        return len(data)


def test_a_path_without_segmentation_offload_falls_back_to_one_send_each() -> None:
    fake = _NoOffload()
    sender = BatchSender(fake, gso=True)  # type: ignore[arg-type]
    datagrams = [(b"a" * 50, ("192.0.2.1", 9)), (b"b" * 50, ("192.0.2.1", 9))]
    assert sender.send(datagrams) == (2, 0)
    assert fake.sent == [b"a" * 50, b"b" * 50]
    assert not sender.gso and sender.batches == 0
    assert sender.send(datagrams) == (2, 0)  # and from then on, without trying again
    assert len(fake.sent) == 4


def test_kernel_drops_read_each_socket_s_own_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as full,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # the kernel's least
        full.bind(("127.0.0.1", 0))
        for _ in range(200):  # never read: most are dropped
            sender.sendto(bytes(200), full.getsockname())
        # Where the kernel gives no counter of the socket's own: the host's /proc tables.
        with monkeypatch.context() as patch:
            patch.setattr(udp, "_socket_drops", lambda _: None)
            by_table = udp.kernel_drops(full)
        assert by_table > 0

        def no_tables(*_: object, **__: object) -> None:
            raise AssertionError("read /proc/net/udp, whose length is every UDP socket's")

        # The socket's own counter (SO_MEMINFO): the same figure, without the tables.
        monkeypatch.setattr(udp, "open", no_tables, raising=False)
        assert udp.kernel_drops(full, None) == by_table
