"""relay/udp.py: the one UDP drain loop every packet path uses, over real loopback sockets."""

from __future__ import annotations

import socket

import trio

from relay.udp import Address, bound_udp, drain_forever, kernel_drops, send_nowait


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
