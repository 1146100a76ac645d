"""The aioquic internals the tunnels rely on (relay/tunnel/connection.py) are still there.

aioquic promises nothing about private attributes. If an upgrade renames or drops one, these
tests fail first, each naming the attribute and what we use it for, instead of the tunnels
failing at run time (an AttributeError mid-handshake, or worse, a server that silently stops
asking clients for certificates).

Every check is made on plain aioquic objects, not on our subclass, which sets some of these
attributes itself and would hide their removal.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest
from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer

from relay.tunnel.certs import Credentials, Identity, make_ca, verify_peer
from relay.tunnel.connection import (
    ACK_DELAY,
    MAX_DATAGRAM_FRAME_SIZE,
    LinkConfig,
    TunnelConnection,
)
from tests.relay import memory

CA = make_ca()
RELAY = LinkConfig(Credentials.issued(*CA, "relay", "r1"))
NODE = LinkConfig(Credentials.issued(*CA, "node", "n1"))

#: QuicConnection attributes we read or set, and why
CONNECTION_INTERNALS = {
    "_ack_delay": "set to ACK_DELAY so DATAGRAM-only packets are acknowledged together",
    "_is_client": "read to ask for a client certificate on the server side only",
    "_initialize": "overridden to set tls._request_client_certificate once tls exists",
    "_remote_max_datagram_frame_size": "read to size DATAGRAM payloads to the peer's limit",
    "_datagrams_pending": "read to refuse datagrams beyond MAX_QUEUED_DATAGRAMS",
    "_close_event": "read to learn a connection is closing before aioquic reports it",
}
#: QuicConnection attributes the short receive and write ways read, set or call, mirroring
#: aioquic's receive_datagram and _write_application (tests/relay/test_tunnel_short_ways.py
#: checks that they still behave as aioquic's own code does)
SHORT_WAY_INTERNALS = (
    "_QuicConnection__frame_handlers",
    "_ack_eliciting_sent_since_receipt",
    "_add_network_path",
    "_close_at",
    "_close_pending",
    "_configuration",
    "_crypto_streams",
    "_cryptos",
    "_events",
    "_handshake_complete",
    "_handshake_done_pending",
    "_host_cids",
    "_idle_timeout",
    "_logger",
    "_loss",
    "_network_paths",
    "_pacing_at",
    "_peer_cid",
    "_ping_pending",
    "_probe_pending",
    "_quic_logger",
    "_retire_connection_ids",
    "_spaces",
    "_spin_bit",
    "_spin_highest_pn",
    "_state",
    "_streams",
    "_streams_blocked_pending",
    "_streams_queue",
    "_use_reserved_peer_cid",
    "_write_ack_frame",
    "_write_application",
    "_write_connection_limits",
    "_write_stream_limits",
)
#: tls.Context attributes we read or set, and why
TLS_INTERNALS = {
    "_request_client_certificate": "set so an aioquic server sends a CertificateRequest",
    "_peer_certificate": "read to verify the peer's leaf against the cluster CA",
    "_peer_certificate_chain": "read to hand the peer's whole chain to verify_peer",
}


def handshake(
    client_type: type[QuicConnection], server_type: type[QuicConnection]
) -> tuple[QuicConnection, QuicConnection]:
    """A node's connection and a relay's, handshaken in memory."""
    return memory.handshake(client_type, server_type, node=NODE, relay=RELAY, now=1.0)


def missing(name: str, why: str, where: str) -> str:
    version = importlib.metadata.version("aioquic")
    return (
        f"aioquic {version} has no {where}.{name} any more: relay/tunnel/connection.py uses it "
        f"({why}). Pin aioquic to a version that has it, or replace the use."
    )


@pytest.mark.parametrize("name", sorted(CONNECTION_INTERNALS))
def test_the_connection_internals_we_use_exist(name: str) -> None:
    client, server = handshake(QuicConnection, QuicConnection)
    for conn in (client, server):
        assert hasattr(conn, name), missing(name, CONNECTION_INTERNALS[name], "QuicConnection")


@pytest.mark.parametrize("name", SHORT_WAY_INTERNALS)
def test_the_connection_internals_of_the_short_ways_exist(name: str) -> None:
    client, server = handshake(QuicConnection, QuicConnection)
    why = "the short receive and write ways of an open tunnel"
    for conn in (client, server):
        assert hasattr(conn, name), missing(name, why, "QuicConnection")


@pytest.mark.parametrize("name", sorted(TLS_INTERNALS))
def test_the_tls_internals_we_use_exist(name: str) -> None:
    client, server = handshake(QuicConnection, QuicConnection)
    for conn in (client, server):
        assert hasattr(conn, "tls"), missing("tls", "the TLS context", "QuicConnection")
        assert hasattr(conn.tls, name), missing(name, TLS_INTERNALS[name], "tls.Context")


@pytest.mark.parametrize(
    ("module", "name", "why"),
    [
        # relay/tunnel/quic.py parses packet headers with it (aioquic.buffer re-exports it
        # without type information), and so does the short receive its frames
        ("aioquic._buffer", "Buffer", "to parse QUIC headers and frames"),
        ("aioquic._buffer", "BufferReadError", "to tell a frame cut short"),
        ("aioquic._crypto", "CryptoError", "to drop a packet that does not decrypt"),
    ],
)
def test_the_private_modules_we_import_exist(module: str, name: str, why: str) -> None:
    assert hasattr(importlib.import_module(module), name), missing(name, why, module)


def test_the_internals_still_do_what_we_use_them_for() -> None:
    client, server = handshake(TunnelConnection, TunnelConnection)
    assert isinstance(client, TunnelConnection) and isinstance(server, TunnelConnection)
    # A server that asked for the client's certificate has it; and the client has the server's.
    assert verify_peer(server.peer_certificates(), RELAY.ca, now=RELAY.wall_clock()) == Identity(
        "node", "n1"
    ), "the server no longer receives the client's certificate"
    assert verify_peer(client.peer_certificates(), NODE.ca, now=NODE.wall_clock()) == Identity(
        "relay", "r1"
    )
    assert client._ack_delay == server._ack_delay == ACK_DELAY
    assert client.peer_max_datagram_frame_size == MAX_DATAGRAM_FRAME_SIZE
    assert client.queued_datagrams == 0
    client.send_datagram_frame(b"one")
    client.send_datagram_frame(b"two")
    assert client.queued_datagrams == 2
    assert client.close_event is None
    client.close(error_code=0, reason_phrase="bye")
    assert client.close_event is not None and client.close_event.reason_phrase == "bye"


#: QuicPacketBuilder attributes TunnelConnection._write_datagrams reads and sets, as aioquic's
#: start_frame does for each frame
BUILDER_INTERNALS = (
    "_buffer",
    "_buffer_capacity",
    "_flight_capacity",
    "_header_size",
    "_packet",
    "_packet_crypto",
    "_packet_start",
)


def test_the_packet_builder_internals_of_the_short_write_exist() -> None:
    client, _ = handshake(QuicConnection, QuicConnection)
    assert client._version is not None
    builder = QuicPacketBuilder(
        host_cid=client.host_cid,
        peer_cid=client._peer_cid.cid,
        version=client._version,
        is_client=True,
        max_datagram_size=1200,
    )
    builder.start_packet(QuicPacketType.ONE_RTT, client._cryptos[tls.Epoch.ONE_RTT])
    why = "to write DATAGRAM frames without start_frame"
    for name in BUILDER_INTERNALS:
        assert hasattr(builder, name), missing(name, why, "QuicPacketBuilder")
    packet = builder._packet
    assert packet is not None
    for name in ("is_ack_eliciting", "in_flight"):
        assert hasattr(packet, name), missing(name, why, "QuicSentPacket")


def test_the_pacer_we_replace_is_still_there() -> None:
    # TunnelConnection swaps its loss recovery's pacer for TunnelPacer (a subclass that sizes
    # the bucket differently), built with the same datagram size.
    client, server = handshake(QuicConnection, QuicConnection)
    for conn in (client, server):
        assert hasattr(conn._loss, "_pacer"), missing("_pacer", "to pace tunnels", "recovery")
        pacer = conn._loss._pacer
        assert type(pacer) is QuicPacketPacer, "aioquic's recovery uses another pacer class"
        for name in ("_max_datagram_size", "bucket_max", "packet_time"):
            assert hasattr(pacer, name), missing(name, "TunnelPacer", "QuicPacketPacer")


def test_a_plain_aioquic_server_asks_for_no_client_certificate() -> None:
    # Why connection.py sets the private flag at all: without it, the server has nothing to
    # verify. If aioquic starts asking by itself, the flag may go.
    client, server = handshake(QuicConnection, QuicConnection)
    assert server.tls._peer_certificate is None
    assert client.tls._peer_certificate is not None
