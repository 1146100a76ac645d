"""Two QUIC connections wired together in memory: no socket, no task, time passed in by hand.

The tunnel's protocol cores are sans-I/O (aioquic's connection, relay/tunnel/link.py's Link), so
a test can drive a whole handshake deterministically by moving datagrams between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aioquic._buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from relay.tunnel.connection import CID_LENGTH, LinkConfig

CLIENT_ADDR = ("127.0.0.1", 40001)
SERVER_ADDR = ("127.0.0.1", 4433)


def first_dcid(client: QuicConnection, now: float) -> tuple[bytes, list[bytes]]:
    """The client's first flight (after ``connect``) and the connection ID it addressed it to,
    which a server needs to be created (RFC 9000 §7.2)."""
    flight = [data for data, _ in client.datagrams_to_send(now)]
    header = pull_quic_header(Buffer(data=flight[0]), host_cid_length=CID_LENGTH)
    return header.destination_cid, flight


def deliver(flight: list[bytes], to: QuicConnection, sender: tuple[str, int], now: float) -> None:
    for data in flight:
        to.receive_datagram(data, sender, now)


def step(
    client: QuicConnection,
    server: QuicConnection,
    now: float,
    *,
    to_client: bool = True,
    to_server: bool = True,
) -> bool:
    """Move whatever each side has to send to the other (in one direction only, if asked);
    True if anything moved."""
    moved = False
    if to_server:
        flight = [data for data, _ in client.datagrams_to_send(now)]
        deliver(flight, server, CLIENT_ADDR, now)
        moved = moved or bool(flight)
    if to_client:
        flight = [data for data, _ in server.datagrams_to_send(now)]
        deliver(flight, client, SERVER_ADDR, now)
        moved = moved or bool(flight)
    return moved


def pump(
    client: QuicConnection,
    server: QuicConnection,
    now: float,
    after: Callable[[], None] = lambda: None,
    *,
    rounds: int = 20,
) -> None:
    """Exchange datagrams until neither side has any to send, calling ``after`` each round
    (to take the events the round produced)."""
    for _ in range(rounds):
        moved = step(client, server, now)
        after()
        if not moved:
            return
    raise AssertionError("the connections never went quiet")


C = TypeVar("C", bound=QuicConnection)
S = TypeVar("S", bound=QuicConnection)


def handshake(
    client_type: type[C],
    server_type: type[S],
    *,
    node: LinkConfig,
    relay: LinkConfig,
    now: float,
) -> tuple[C, S]:
    """A node's connection (the client, from CLIENT_ADDR) and a relay's (the server, at
    SERVER_ADDR), handshaken in memory at ``now``."""
    client = client_type(configuration=node.quic(is_client=True))
    client.connect(SERVER_ADDR, now)
    dcid, flight = first_dcid(client, now)
    server = server_type(
        configuration=relay.quic(is_client=False), original_destination_connection_id=dcid
    )
    deliver(flight, server, CLIENT_ADDR, now)
    pump(client, server, now)
    return client, server
