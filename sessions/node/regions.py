"""Regions (issue #19): which relays a client's answer offers, and which node serves it.

A browser nominates the candidate pair of highest priority that works, not the nearest one, so
an answer listing every relay of the cluster at the same footing serves a user in one region
through a relay on another continent as often as not. With ``node.steering`` on:

* **Candidates**: the relays of the client's region come first (the highest priorities), rotated
  per session so that a region's relays share its sessions, then at most
  :data:`STEER_FALLBACKS` relays of other regions as lower-priority fallbacks, so that a client
  whose nearest relay dies still has a way in (the relays that ICE then checks next).
* **Placement**: an offer from a client of another region than this node's is sent to an
  active node of the client's region with room, when one exists (a WebSocket ``redirect``, a
  WHIP 307); the relay-to-node tunnel then carries only the short haul, and the long haul is
  nobody's. No node there with room: this node keeps the session, steered to the client's
  relays all the same.

The client's region comes from what a deployment has, most trusted first: an access token's
``region`` claim, then the header the load balancer in front of signaling sets
(``node.region_header``), then this node's own region.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, final

import trio

from relay.addresses import Address
from sessions.node.signaling.messages import Redirect
from sessions.webrtc.ice import PeerAddress
from storage.etcd import EtcdError
from storage.members import Member, RelayInfo

__all__ = ["PLACEMENT_REFRESH", "STEER_FALLBACKS", "Hop", "Placement", "first_hop", "steer"]

log = logging.getLogger("parley.regions")

#: relays of other regions an answer keeps behind the client's own, as fallbacks
STEER_FALLBACKS: Final = 2
#: seconds a placement decision may use the same view of the nodes (one etcd read per this)
PLACEMENT_REFRESH: Final = 2.0


def _rotate(items: list[Address], session_id: str) -> list[Address]:
    if not items:
        return items
    turn = zlib.crc32(session_id.encode()) % len(items)
    return items[turn:] + items[:turn]


def _addresses(relays: Sequence[RelayInfo]) -> list[Address]:
    out: list[Address] = []
    for info in relays:
        out.extend(a for a in info.public if a not in out)
    return out


#: what the packet path knows of the way a session's client reaches this node through ``relay``
#: ("": the node's own port): the relay-to-node tunnel's round-trip time in seconds (0.0 for
#: no tunnel, None before QUIC has a sample) and the region of the first hop ("": unknown)
Hop = Callable[[str], tuple[float | None, str]]


def first_hop(stats: Mapping[str, object], hop: Hop, region: str) -> dict[str, object]:
    """Where a session's client meets the cluster, from its core's ``stats``: the relay of the
    selected candidate pair, that relay's region (else ``region``, the node's), the tunnel's
    round-trip time and the **first hop's**, client to relay: the RTCP round trip (client to
    node) less the tunnel's. Figures are None until both are known."""
    selected = stats.get("selected")
    relay = selected.relay if isinstance(selected, PeerAddress) else ""
    tunnel, where = hop(relay)
    rtt = stats.get("rtt_ms")
    first = (
        round(max(0.0, float(rtt) - tunnel * 1000), 2)
        if isinstance(rtt, int | float) and tunnel is not None
        else None
    )
    return {
        "relay": relay,
        "region": where or region,
        "tunnel_rtt_ms": None if tunnel is None else round(tunnel * 1000, 2),
        "first_hop_rtt_ms": first,
    }


def steer(
    relays: Sequence[RelayInfo], session_id: str, region: str, *, steering: bool = True
) -> list[Address]:
    """The candidate addresses of ``session_id``'s answer, in priority order, from ``relays``
    (those with an open tunnel, in a stable order).

    Steered, when ``region`` has a relay here: its relays first, then at most
    :data:`STEER_FALLBACKS` relays of other regions. Otherwise (no steering, no region known,
    or none of its relays reachable): every relay, rotated per session so sessions spread.
    """
    near = [info for info in relays if region and info.region == region]
    if not steering or not near:
        return _rotate(_addresses(relays), session_id)
    # a relay's workers register one each, with the same public port: count relays, not those
    far: dict[str, list[RelayInfo]] = {}
    for info in relays:
        if info.region != region:
            far.setdefault(info.certified_as, []).append(info)
    names = sorted(far)
    turn = zlib.crc32(session_id.encode()) % len(names) if names else 0
    fallbacks = [
        info for name in (names[turn:] + names[:turn])[:STEER_FALLBACKS] for info in far[name]
    ]
    steered = _rotate(_addresses(near), session_id)
    return steered + [a for a in _addresses(fallbacks) if a not in steered]


@final
class Placement:
    """Sends an offer from a client of another region to a node of that region with room.

    ``nodes`` lists the cluster's nodes (etcd); it is read at most every
    :data:`PLACEMENT_REFRESH` seconds, and an etcd that does not answer places nothing (the
    node that got the offer keeps it).
    """

    def __init__(
        self,
        node_id: str,
        region: str,
        nodes: Callable[[], Awaitable[list[Member]]],
        *,
        steering: bool = True,
    ) -> None:
        self.node_id = node_id
        self.region = region
        self.steering = steering
        self._nodes = nodes
        self._view: list[Member] = []
        self._read_at = float("-inf")
        #: offers sent elsewhere, by the region they were sent to
        self.placed: dict[str, int] = {}

    async def elsewhere(self, region: str | None) -> Redirect | None:
        """Where a client of ``region`` should offer instead of here; None: here."""
        if not self.steering or not region or region == self.region:
            return None
        now = trio.current_time()
        if now - self._read_at >= PLACEMENT_REFRESH:
            self._read_at = now
            try:
                self._view = await self._nodes()
            except EtcdError as exc:
                log.warning("cannot list nodes to place an offer", extra={"error": str(exc)})
                self._view = []
        best: tuple[int, str, str] | None = None
        for member in self._view:
            info = member.info
            url = info.addresses.get("signaling", "")
            room = info.capacity - info.sessions
            if (
                info.id == self.node_id
                or info.region != region
                or info.state != "active"
                or room <= 0
                or not url
            ):
                continue
            if best is None or room > best[0]:
                best = (room, info.id, url)
        if best is None:
            return None
        _, node, url = best
        self.placed[region] = self.placed.get(region, 0) + 1
        return Redirect(node=node, url=url, reason="region")
