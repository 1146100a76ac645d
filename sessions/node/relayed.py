"""A node's media path in a cluster: QUIC tunnels to the relays, no client-facing UDP port.

The node finds the cluster's relays in etcd (storage/members.py ``RelayInfo``) and keeps one QUIC
tunnel open to each (relay/tunnel/quic.py; the node dials, the relay listens, both authenticate with
certificates of the cluster CA). Clients reach sessions only through relays:

* every answer lists the relays' public addresses as its candidates, rotated per session so
  that sessions spread over the relays; ICE picks among them, and a client can fall back to
  another relay's candidate if one dies;
* the server ufrag is minted with a routing hint (relay/tunnel/hint.py), so a relay can route a new
  client's first STUN packet to this node before etcd's watch tells it the session is here;
* a datagram arriving through relay ``r`` from client ``ip:port`` is given to its session as
  coming from ``PeerAddress(ip, port, relay=r)`` — the relay is the local candidate of that
  pair, so the session's ICE core keeps one pair per relay (sessions/webrtc/ice/) and answers
  each path through the relay it came by;
* every datagram to a client is stamped with the session's ownership epoch, which the relay
  checks (fencing, relay/routes.py): once the session belongs to another node, what this node
  still sends is dropped.

This class offers sessions the same surface as the node's own UDP port (sessions/node/media.py),
sessions/ports.py's ``PacketPath``, so session code does not know which one it runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, final

import trio

from relay.addresses import Address
from relay.tunnel import frames
from relay.tunnel.certs import Credentials, Identity
from relay.tunnel.hint import mint_ufrag
from relay.tunnel.quic import Tunnel, TunnelEndpoint, TunnelError
from sessions.node.regions import steer
from sessions.ports import INBOX_SIZE, Datagram, Inbound, PeerAddress, SessionPort
from storage.etcd import EtcdError
from storage.members import Members, RelayInfo

__all__ = ["RelayedMedia"]

log = logging.getLogger("parley.relayed")

#: how often the node looks for relays that joined or left, and retries failed tunnels
DISCOVERY_INTERVAL: Final = 1.0
_MAX_BACKOFF: Final = 5.0

_COUNTERS: Final = (
    "received",  # frames from relays
    "sent",  # datagrams sent into tunnels
    "malformed_frame",  # frames that did not decode, or the wrong kind
    "unknown_session",  # frames for a session this node does not host
    "inbox_full",  # a session that could not keep up lost a datagram
    "no_tunnel",  # a datagram for a relay we have no open tunnel to
    "not_owned",  # a datagram of a session this node holds no epoch for
    "send_failed",  # the tunnel refused a datagram
    "handed_on",  # client datagrams passed on to a session's new owner after a move
    "early",  # datagrams kept for a session not registered yet (a move's target, see below)
    "early_dropped",  # ... beyond the bounds, or never claimed in time
)
#: how long after a session moved away this node still hands its late datagrams on
MOVED_FORWARD_FOR: Final = 10.0
#: A move's source forwards what reaches the quiesced session to the target as soon as the
#: snapshot is ready, which can be before the target has even seen the move and registered the
#: session. Those datagrams are kept (they came through a mutually authenticated relay tunnel)
#: for a session not registered yet, within these bounds, and go first into its inbox when it
#: is registered: each client packet is then decrypted by exactly one node, none by neither.
EARLY_FOR: Final = 5.0
EARLY_PER_SESSION: Final = 128
EARLY_SESSIONS: Final = 64


@final
class RelayedMedia:
    """Sessions' packet path through the cluster's relays. Start ``run`` with ``nursery.start``.

    ``epoch_of`` gives the ownership epoch of a session hosted here (None if not hosted);
    ``members`` lists the relays; ``secret`` is the cluster's hint secret.
    """

    def __init__(
        self,
        node_id: str,
        credentials: Credentials,
        secret: bytes,
        members: Callable[[], Members | None],
        epoch_of: Callable[[str], int | None],
        *,
        tunnel_host: str = "127.0.0.1",
        steering: bool = True,
    ) -> None:
        self.node_id = node_id
        #: offer a client its own region's relays first (sessions/node/regions.py)
        self.steering = steering
        self.credentials = credentials
        self.secret = secret
        self._members = members
        self._epoch_of = epoch_of
        self.tunnel_host = tunnel_host
        self.endpoint: TunnelEndpoint | None = None
        self.relays: dict[str, RelayInfo] = {}
        #: open tunnels by relay registration (a relay's workers register one each)
        self.tunnels: dict[str, Tunnel] = {}
        self._names: dict[Tunnel, str] = {}
        self._dialing: dict[Address, str] = {}  # tunnel address -> registration, while dialing
        self._ports: dict[str, SessionPort] = {}
        self._connecting: set[str] = set()
        self._backoff: dict[str, tuple[float, float]] = {}  # relay -> (retry at, backoff)
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._from_client = frames.FromClientReader()
        #: sessions that moved away: session -> (new owner, its epoch, forward until)
        self._moved: dict[str, tuple[str, int, float]] = {}
        #: quiesced sessions whose snapshot is ready for a move: session -> (target, our epoch,
        #: what was forwarded). What arrives is kept here *and* forwarded at once, so that the
        #: target has it in its inbox, in order, before the client's packets reach it directly
        self._teeing: dict[str, tuple[str, int, set[bytes]]] = {}
        #: datagrams for sessions not registered (yet): session -> (first kept at, datagrams)
        self._early: dict[str, tuple[float, list[Datagram]]] = {}

    # -- what NodeSessions needs -----------------------------------------------------------------

    def mint_ufrag(self, session_id: str) -> str:
        """A server ufrag carrying this node's routing hint for ``session_id``."""
        return mint_ufrag(session_id, self.node_id, self.secret)

    def candidates(self, session_id: str, region: str = "") -> list[Address]:
        """The relays' public addresses for an answer to a client of ``region``: steered to
        that region's relays when steering is on (sessions/node/regions.py), else rotated by
        session.

        Relays with an open tunnel only: a candidate whose relay cannot reach us would only cost
        the client a failed check. Empty if no relay is reachable (the offer is then refused).
        """
        relays = [self.relays[r] for r in sorted(self.tunnels) if r in self.relays]
        return steer(relays, session_id, region, steering=self.steering)

    def hop(self, relay: str) -> tuple[float | None, str]:
        """The tunnel to ``relay`` (a registration): its round-trip time (None: no sample, or
        no tunnel) and the relay's region."""
        tunnel = self.tunnels.get(relay)
        info = self.relays.get(relay)
        return (tunnel.rtt if tunnel is not None else None), (info.region if info else "")

    def register(self, session_id: str, ufrag: str) -> SessionPort:
        if session_id in self._ports:
            raise ValueError(f"session {session_id!r} already routed")
        send, receive = trio.open_memory_channel[Inbound](INBOX_SIZE)

        def send_to(data: bytes, addr: PeerAddress) -> None:
            self._send(session_id, data, addr)

        port = SessionPort(session_id, ufrag, send, receive, send_to, flush=self.flush)
        self._ports[session_id] = port
        _, early = self._early.pop(session_id, (0.0, []))
        now = trio.current_time()
        for data, addr in early:  # oldest first, ahead of anything newer
            try:
                send.send_nowait((data, addr, now))
            except trio.WouldBlock:
                self.counters["early_dropped"] += 1
        return port

    def unregister(self, session_id: str) -> None:
        port = self._ports.pop(session_id, None)
        if port is not None:
            port.inbox_send.close()

    def flush(self) -> None:
        if self.endpoint is not None:
            self.endpoint.flush()

    # -- sessions -> relays ----------------------------------------------------------------------

    def _send(self, session_id: str, data: bytes, addr: PeerAddress) -> None:
        tunnel = self.tunnels.get(addr.relay)
        if tunnel is None:
            self.counters["no_tunnel"] += 1
            return
        epoch = self._epoch_of(session_id)
        if epoch is None:
            self.counters["not_owned"] += 1
            return
        frame = frames.encode_to_client(session_id, epoch, addr.socket_address, data)
        if tunnel.send_datagram(frame):
            self.counters["sent"] += 1
        else:
            self.counters["send_failed"] += 1

    # -- after a planned move ----------------------------------------------------------------

    def moved(self, session_id: str, target: str, epoch: int) -> None:
        """``session_id`` runs on ``target`` at ``epoch`` now: for a while, hand on whatever of
        its clients still reaches us (a relay's route follows within a packet or a watch)."""
        now = trio.current_time()
        for session, (_, _, until) in list(self._moved.items()):
            if until <= now:
                del self._moved[session]
        self._moved[session_id] = (target, epoch, now + MOVED_FORWARD_FOR)

    def tee(
        self, session_id: str, datagrams: list[tuple[bytes, PeerAddress]], target: str, epoch: int
    ) -> None:
        """The move's snapshot is ready: forward what the quiesced session kept, and from now
        on whatever arrives for it, to ``target`` at once (at our ``epoch``: the relay passes
        it on without moving its route). The target queues it until it runs the session; if the
        move is abandoned, the target drops it unread and we resume with our own copy."""
        forwarded: set[bytes] = set()
        self._teeing[session_id] = (target, epoch, forwarded)
        for data, addr in datagrams:
            tunnel = self.tunnels.get(addr.relay)
            self._hand_on(tunnel, session_id, data, addr.socket_address, target, epoch)
            forwarded.add(data)
        self.flush()

    def stop_tee(self, session_id: str) -> set[bytes]:
        """What :meth:`tee` forwarded for ``session_id`` (and stop forwarding)."""
        teeing = self._teeing.pop(session_id, None)
        return set() if teeing is None else teeing[2]

    def hand_on(
        self, session_id: str, datagrams: list[tuple[bytes, PeerAddress]], target: str, epoch: int
    ) -> None:
        """Pass datagrams a quiesced session kept on to its new owner, through the relay each
        came by (relay/edge.py handles HAND_ON), oldest first; what :meth:`tee` already
        forwarded is not sent twice."""
        forwarded = self.stop_tee(session_id)
        for data, addr in datagrams:
            if data in forwarded:
                continue
            tunnel = self.tunnels.get(addr.relay)
            self._hand_on(tunnel, session_id, data, addr.socket_address, target, epoch)
        self.flush()

    def _hand_on(
        self,
        tunnel: Tunnel | None,
        session_id: str,
        data: bytes,
        client: Address,
        target: str,
        epoch: int,
    ) -> None:
        if tunnel is None:
            self.counters["no_tunnel"] += 1
            return
        frame = frames.encode_hand_on(session_id, epoch, target, client, data)
        if tunnel.send_datagram(frame):
            self.counters["handed_on"] += 1
        else:
            self.counters["send_failed"] += 1

    # -- relays -> sessions (TunnelHandler) ------------------------------------------------------

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None:
        self.counters["received"] += 1
        try:
            read = self._from_client.read(data)  # media: the common case, read cheaply
        except frames.FrameError:
            read = None
        if read is None:  # malformed, or a frame of another kind (none is for a node)
            self.counters["malformed_frame"] += 1
            return
        session, client, payload = read
        port = self._ports.get(session)
        if port is None:
            moved = self._moved.get(session)
            if moved is not None and moved[2] > trio.current_time():
                target, epoch, _ = moved
                self._hand_on(tunnel, session, payload, client, target, epoch)
                return
            name = self._names.get(tunnel, tunnel.peer.ident)
            self._keep_early(session, (payload, PeerAddress(*client, name)))
            return
        teeing = self._teeing.get(session)
        if teeing is not None:
            target, epoch, forwarded = teeing
            self._hand_on(tunnel, session, payload, client, target, epoch)
            forwarded.add(payload)
        name = self._names.get(tunnel, tunnel.peer.ident)
        addr = PeerAddress(client[0], client[1], name)
        port.addresses.add(addr)
        try:
            port.inbox_send.send_nowait((payload, addr, trio.current_time()))
        except trio.WouldBlock:
            port.dropped_full += 1
            self.counters["inbox_full"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _keep_early(self, session_id: str, datagram: Datagram) -> None:
        now = trio.current_time()
        for session, (since, kept) in list(self._early.items()):
            if since + EARLY_FOR <= now:
                del self._early[session]
                self.counters["early_dropped"] += len(kept)
        entry = self._early.get(session_id)
        if entry is None:
            if len(self._early) >= EARLY_SESSIONS:
                self.counters["unknown_session"] += 1
                return
            entry = self._early[session_id] = (now, [])
        if len(entry[1]) >= EARLY_PER_SESSION:
            self.counters["early_dropped"] += 1
            return
        entry[1].append(datagram)
        self.counters["early"] += 1

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        if tunnel.peer.role != "relay":
            tunnel.close("a node only tunnels to relays")
            return
        # Named by the registration we dialed: the workers of one relay share its certificate.
        name = self._dialing.get(tunnel.remote, tunnel.peer.ident)
        self._names[tunnel] = name
        self.tunnels[name] = tunnel  # the endpoint logs the opening (and the closing)

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None:
        log.debug("control from %s: %s", tunnel.peer.ident, message)

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        name = self._names.pop(tunnel, tunnel.peer.ident)
        if self.tunnels.get(name) is tunnel:
            del self.tunnels[name]

    # -- finding relays --------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[RelayedMedia] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the tunnel endpoint, then keep a tunnel to every registered relay."""
        endpoint = TunnelEndpoint(
            self.credentials, self, host=self.tunnel_host, port=0, server=False
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(endpoint.run)
            self.endpoint = endpoint
            await self.refresh(nursery)
            task_status.started(self)
            while True:
                await trio.sleep(DISCOVERY_INTERVAL)
                await self.refresh(nursery)

    async def refresh(self, nursery: trio.Nursery) -> None:
        """Read the relay registry once and dial every relay without an open tunnel."""
        members = self._members()
        if members is None:
            return
        try:
            infos = await members.relay_infos()
        except EtcdError as exc:
            log.debug("cannot list relays: %s", exc)
            return
        self.relays = {info.id: info for info in infos}
        for relay_id in list(self.tunnels):
            info = self.relays.get(relay_id)
            if info is None:
                # Deregistered (stopped cleanly, or its lease expired): stop using it.
                self.tunnels.pop(relay_id).close("relay left the cluster")
            elif self.tunnels[relay_id].remote != info.tunnel:
                # The relay restarted elsewhere (a new tunnel port): the old tunnel leads to
                # a dead process, and would only be noticed at its idle timeout. Redial now.
                self.tunnels.pop(relay_id).close("relay moved to a new tunnel address")
        now = trio.current_time()
        for info in infos:
            if info.id in self.tunnels or info.id in self._connecting:
                continue
            if self._backoff.get(info.id, (0.0, 0.0))[0] > now:
                continue
            self._connecting.add(info.id)
            nursery.start_soon(self._dial, info)

    async def _dial(self, info: RelayInfo) -> None:
        assert self.endpoint is not None
        self._dialing[info.tunnel] = info.id
        try:
            await self.endpoint.connect(
                *info.tunnel, expect=Identity("relay", info.certified_as), timeout=3.0
            )
        except TunnelError as exc:
            _, backoff = self._backoff.get(info.id, (0.0, 0.25))
            backoff = min(backoff * 2, _MAX_BACKOFF)
            self._backoff[info.id] = (trio.current_time() + backoff, backoff)
            log.warning(
                "tunnel to relay failed",
                extra={"relay": info.id, "error": str(exc), "retry_in": backoff},
            )
        else:
            self._backoff.pop(info.id, None)
        finally:
            self._connecting.discard(info.id)
            self._dialing.pop(info.tunnel, None)

    def all_counters(self) -> dict[str, int]:
        """This path's counters and, as ``tunnel_*``, its tunnel endpoint's."""
        endpoint = self.endpoint
        if endpoint is None:
            return dict(self.counters)
        tunnel = {**endpoint.counters, "kernel_drops": endpoint.kernel_drops()}
        return {**self.counters, **{f"tunnel_{k}": v for k, v in tunnel.items()}}

    def stats(self) -> dict[str, Any]:
        return {
            "tunnels": sorted(self.tunnels),
            "relays": sorted(self.relays),
            **self.counters,
        }
