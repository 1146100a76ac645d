"""The tunnel link's state machine, sans I/O: two Links (or a Link and a bare connection) wired
together in memory, time passed in by hand. tests/relay/test_quic.py drives the same protocol
over real UDP through the Trio endpoint."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import get_args

import pytest

from relay.tunnel.certs import Credentials, Identity, make_ca
from relay.tunnel.connection import LinkConfig, TunnelConnection
from relay.tunnel.link import (
    APP_CLOSED,
    TRANSITIONS,
    Closing,
    ConnectionIdIssued,
    ConnectionIdRetired,
    ControlReceived,
    DatagramReceived,
    Link,
    LinkEvent,
    LinkStateError,
    Opened,
    Phase,
    Terminated,
)
from tests.relay.memory import CLIENT_ADDR, SERVER_ADDR, first_dcid, pump, step

CA = make_ca()
RELAY = LinkConfig(Credentials.issued(*CA, "relay", "r1"))
NODE = LinkConfig(Credentials.issued(*CA, "node", "n1"))


def phase(link: Link) -> Phase:
    """The link's phase now (read through a call: mypy would keep an earlier comparison's)."""
    return link.phase


class Pair:
    """A node's link dialing a relay's; what each side reported, in order."""

    def __init__(self, *, expect: Identity | None = None) -> None:
        self.now = 1.0
        self.client_totals: Counter[str] = Counter()
        self.server_totals: Counter[str] = Counter()
        self.client = Link.dial(
            NODE, SERVER_ADDR, self.now, totals=self.client_totals, expect=expect
        )
        dcid, flight = first_dcid(self.client.conn, self.now)
        self.server = Link.accept(RELAY, CLIENT_ADDR, self.now, dcid, totals=self.server_totals)
        for data in flight:
            self.server.receive(data, CLIENT_ADDR, self.now)
        self.client_events: list[LinkEvent] = []
        self.server_events: list[LinkEvent] = []
        self.take()

    def take(self) -> None:
        """Take every event, as the endpoint does (it forgets a link once it terminates)."""
        for link, seen in (
            (self.client, self.client_events),
            (self.server, self.server_events),
        ):
            while (event := link.next_event()) is not None:
                if isinstance(event, ConnectionIdIssued | ConnectionIdRetired):
                    continue  # the endpoint's routing business
                seen.append(event)
                if isinstance(event, Terminated):
                    link.finish(event.reason)

    def run(self) -> None:
        self.now += 0.1  # aioquic paces what it sends: a moment must pass between flights
        pump(self.client.conn, self.server.conn, self.now, self.take)

    def later(self, seconds: float) -> None:
        """Let time pass and run both timers (closing periods end, idle timers fire)."""
        self.now += seconds
        for link in (self.client, self.server):
            if link.phase != "done":
                link.handle_timer(self.now)
        self.take()


# -- scenarios (each drives some transitions; together, every one in the table) -----------------


def open_exchange_close_and_end() -> Pair:
    pair = Pair()
    pair.run()
    assert pair.client.phase == pair.server.phase == "open"
    assert pair.client_events == [Opened()] and pair.server_events == [Opened()]
    assert pair.client.peer == Identity("relay", "r1")
    assert pair.server.peer == Identity("node", "n1")
    assert pair.client_totals["handshakes"] == pair.server_totals["handshakes"] == 1

    assert pair.client.send_datagram(b"media")
    assert pair.client.send_control({"op": "hello there"}) is True
    pair.run()
    assert pair.server_events[1:] == [
        DatagramReceived(b"media"),
        ControlReceived({"op": "hello there"}),
    ]
    assert pair.server.counters["datagrams_in"] == pair.server.counters["control_in"] == 1

    assert pair.client.close(APP_CLOSED, "node draining")
    assert phase(pair.client) == "closing" and pair.client.error == "node draining"
    assert not pair.client.send_datagram(b"late")
    assert pair.client.counters["dropped_closed"] == 1
    pair.run()
    assert pair.server_events[-1] == Closing("node draining", graceful=True)
    pair.later(60)  # past both closing and draining periods (RFC 9000 §10.2)
    assert phase(pair.client) == phase(pair.server) == "done"
    assert isinstance(pair.server_events[-1], Terminated)
    return pair


def reject_an_unexpected_peer() -> Pair:
    pair = Pair(expect=Identity("relay", "r2"))
    pair.run()
    reason = "peer rejected: peer is relay:r1, expected relay:r2"
    assert pair.client_events == [Closing(reason, graceful=False)]
    assert pair.client.phase == "closing" and pair.client.error == reason
    assert pair.client_totals["auth_failures"] == 1
    assert Opened() not in pair.server_events
    assert pair.server.phase == "closing"
    # the alert, not a graceful close (RFC 9001 §4.8)
    assert any(isinstance(e, Closing) and not e.graceful for e in pair.server_events)
    return pair


def give_up_while_waiting_for_the_welcome() -> Pair:
    pair = Pair()
    while pair.client.phase == "handshake":
        step(pair.client.conn, pair.server.conn, pair.now)
        pair.take()
    # Authenticated, hello sent, the welcome not delivered (yet).
    assert pair.client.phase == "greeting" and pair.client_events == []
    assert not pair.client.send_datagram(b"too early")
    assert pair.client.close(APP_CLOSED, "connect abandoned")
    assert phase(pair.client) == "closing"
    assert not pair.client.close(APP_CLOSED, "again")  # already closing: nothing to report
    return pair


def greet_with_the_wrong_line() -> Link:
    totals: Counter[str] = Counter()
    now = 1.0
    raw = TunnelConnection(configuration=NODE.quic(is_client=True))
    raw.connect(SERVER_ADDR, now)
    dcid, flight = first_dcid(raw, now)
    server = Link.accept(RELAY, CLIENT_ADDR, now, dcid, totals=totals)
    for data in flight:
        server.receive(data, CLIENT_ADDR, now)
    seen: list[LinkEvent] = []

    def take() -> None:
        while (event := server.next_event()) is not None:
            if not isinstance(event, ConnectionIdIssued | ConnectionIdRetired):
                seen.append(event)

    pump(raw, server.conn, now, take)
    assert server.phase == "greeting"
    raw.send_stream_data(0, b'{"type": "parley-welcome", "version": 1}\n')  # not a hello
    pump(raw, server.conn, now + 0.1, take)  # a moment later: aioquic paces its flights
    reason = "expected a parley-hello line, got 'parley-welcome'"
    assert seen == [Closing(reason, graceful=False)]
    assert phase(server) == "closing" and totals["malformed"] == 1
    return server


SCENARIOS = [
    open_exchange_close_and_end,
    reject_an_unexpected_peer,
    give_up_while_waiting_for_the_welcome,
    greet_with_the_wrong_line,
]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario: object) -> None:
    assert callable(scenario)
    scenario()


# -- the transition table -----------------------------------------------------------------------


def edges() -> Iterator[tuple[Phase, Phase]]:
    for source, targets in TRANSITIONS.items():
        for target in targets:
            yield source, target


def test_the_table_names_every_phase_and_ends_in_done() -> None:
    phases = set(get_args(Phase))
    assert set(TRANSITIONS) == phases
    assert all(targets <= phases for targets in TRANSITIONS.values())
    assert TRANSITIONS["done"] == frozenset()
    # Either side may give up at any time, and the only way to done is through closing.
    assert all("closing" in TRANSITIONS[p] for p in ("handshake", "greeting", "open"))
    assert [source for source, target in edges() if target == "done"] == ["closing"]


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (source, target)
        for source in get_args(Phase)
        for target in get_args(Phase)
        if target not in TRANSITIONS[source]
    ],
)
def test_an_illegal_transition_raises(source: Phase, target: Phase) -> None:
    link = Pair().client
    link.phase = source  # put it there; only _set_phase's check is under test
    with pytest.raises(LinkStateError, match=f"from {source} to {target}"):
        link._set_phase(target)
    assert link.phase == source


def test_finishing_a_finished_link_is_a_local_error() -> None:
    link = Pair().client
    assert link.finish("endpoint stopped")  # handshake -> closing -> done
    assert link.phase == "done" and link.error == "endpoint stopped"
    with pytest.raises(LinkStateError, match="from done to done"):
        link.finish("again")


def test_the_scenarios_drive_every_transition_in_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    driven: set[tuple[Phase, Phase]] = set()
    set_phase = Link._set_phase

    def recording(self: Link, phase: Phase) -> None:
        driven.add((self.phase, phase))
        set_phase(self, phase)

    monkeypatch.setattr(Link, "_set_phase", recording)
    for scenario in SCENARIOS:
        scenario()
    assert driven == set(edges())
