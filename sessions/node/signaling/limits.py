"""Fair admission (issue #15): what one source address, or one token subject, may hold and ask.

Tokens say who may open sessions (:mod:`.admission`); these limits keep any one client from
taking the node from everyone else:

- **connections per source**: a source (an IPv4 address; an IPv6 /64, which one host usually
  has whole) holds at most ``source_connections`` signaling connections at once. More are
  answered 429 ``source_limit`` before their request is read. The global ``max_connections``
  (503) still bounds them all.
- **offers per second**: every offer (a WHIP POST, a WebSocket offer) takes a token from its
  source's bucket before its access token is checked, and one from its subject's once that is
  valid and the offer fits the limits below: ``offer_rate`` per second in the long run,
  ``offer_burst`` at once. An empty bucket is 429 ``rate_limited`` with the seconds until the
  next token.
- **half-open sessions**: a source, and a subject, holds at most ``half_open`` sessions that
  were answered (or are being answered) and whose ICE has not connected; more are 429
  ``half_open_limit``. Such a session has ``setup_within`` seconds to connect: then it is ended
  (``session_ended`` with the code ``setup_timeout``) and its slot is free.
- **capacity**: the node's sessions plus the offers being answered never pass its capacity
  (503 ``node_over_capacity``). The check and the reservation are one step with no await
  between them, so concurrent offers cannot all pass a check that only one of them fits.
- **load**: while the node's event loop is busy at or above ``max_load`` of a core
  (sessions/node/load.py), offers are refused with 503 ``node_busy`` and a ``retry_after``:
  the sessions it holds keep their CPU.

Subjects count only where tokens are checked: on an open node everyone is ``anonymous``, and
one shared bucket would let one client starve the rest. Connections count per source only: a
token on a WebSocket upgrade is optional (it may come with the offer), so a client could leave
it out to avoid a per-subject count.

Every table is bounded: connection and half-open entries exist only while a connection or a
half-open session does (both bounded by the node's limits), and the offer buckets are a
least-recently-used table of ``rate_entries`` sources. A source forgotten there comes back with
a full bucket: at worst one extra burst, for an attacker who already had that many addresses.

Sans-I/O: time comes in as ``now`` (Trio's clock in the server, a number in tests).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import final

import attrs

from sessions.node.settings import NodeSettings
from sessions.node.signaling.messages import Refusal, SignalingLimits

__all__ = [
    "BUSY_RETRY",
    "SETUP_TIMEOUT",
    "Capacity",
    "Limiter",
    "RateTable",
    "Setup",
    "TokenBucket",
    "node_limits",
    "source_of",
]

#: the ``session_ended`` code (and the counter) of a session whose ICE did not connect within
#: ``setup_within`` of its answer
SETUP_TIMEOUT = "setup_timeout"
#: a source with more connections than it may hold asks again after this many seconds
_CONNECTION_RETRY = 1
#: a busy node is asked again after this many seconds (its load is a mean over a few seconds)
BUSY_RETRY = 2
#: IPv6 sources are counted by their /64: a host is usually given one whole (RFC 4291 §2.5.1)
_IPV6_SOURCE_PREFIX = 64


def node_limits(node: NodeSettings, base: SignalingLimits | None = None) -> SignalingLimits:
    """``base`` (the defaults if None) with the admission limits of the node's settings."""
    return attrs.evolve(
        base or SignalingLimits(),
        source_connections=node.source_connections,
        offer_rate=node.offer_rate,
        offer_burst=node.offer_burst,
        half_open=node.half_open,
        setup_within=node.setup_within,
    )


def source_of(host: str) -> str:
    """The source a peer address counts under: the IPv4 address (an IPv4-mapped IPv6 address
    included), or the IPv6 /64; a host that is not an IP address counts as itself."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


def _seconds(wait: float) -> int:
    """A wait as HTTP's Retry-After gives it: whole seconds, at least one."""
    return max(1, math.ceil(wait))


# Written here, not taken from a rate-limit library: a token bucket is a dozen lines, and ours
# takes ``now`` from its caller (Trio's clock; MockClock in tests) like every protocol core of
# this project. The general-purpose libraries (``limits``, ``pyrate-limiter``) bring storage
# backends and clock plumbing of their own, more code to adapt than this is to write.
@final
@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; each offer takes one."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0 if there was one, else the seconds until there is (none taken)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@final
class RateTable:
    """A token bucket per key, for at most ``size`` keys (the least recently seen goes)."""

    def __init__(self, rate: float, burst: int, size: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Take one of ``key``'s tokens: 0, or the seconds until it has one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.size:
                self._buckets.popitem(last=False)
            bucket = TokenBucket(self.rate, self.burst, self.burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)


@final
@attrs.frozen
class Capacity:
    """The sessions a node takes (``sessions``) and a count of those it holds now (``load``:
    every session, whether opened here, moved in or adopted); ``busy``: whether its event loop
    is too busy for another session now."""

    sessions: int
    load: Callable[[], int]
    busy: Callable[[], bool] = lambda: False


@final
@attrs.define(eq=False)  # identity: kept in sets
class Setup:
    """One admitted offer until its session connects (ICE) or ends: a half-open slot of its
    source (and subject), and a capacity reservation until the backend has its session."""

    source: str
    subject: str | None
    session_id: str | None = None
    #: when the session is ended if its ICE has not connected (Trio time; none until answered)
    deadline: float = math.inf
    #: the offer is being answered: it holds one of the node's places until it is a session
    pending: bool = True


@final
class Limiter:
    """The admission limits of one signaling server (see the module docstring)."""

    def __init__(self, limits: SignalingLimits, capacity: Capacity | None = None) -> None:
        self.limits = limits
        #: None: the backend's own capacity check is the only one (a backend without a node)
        self.capacity = capacity
        self._connections: dict[str, int] = {}
        self._source_rates = RateTable(limits.offer_rate, limits.offer_burst, limits.rate_entries)
        self._subject_rates = RateTable(limits.offer_rate, limits.offer_burst, limits.rate_entries)
        self._by_source: dict[str, set[Setup]] = {}
        self._by_subject: dict[str, set[Setup]] = {}
        self._setups: dict[str, Setup] = {}
        #: offers admitted and not answered yet: each holds a place until it is a session
        self.pending = 0

    # -- connections ------------------------------------------------------------------------

    def connect(self, source: str) -> Refusal | None:
        """Count a connection of ``source``, or the refusal if it holds all it may."""
        held = self._connections.get(source, 0)
        limit = self.limits.source_connections
        if held >= limit:
            return Refusal(
                429,
                "source_limit",
                f"too many connections from one address (at most {limit})",
                _CONNECTION_RETRY,
            )
        self._connections[source] = held + 1
        return None

    def disconnect(self, source: str) -> None:
        """A counted connection of ``source`` closed."""
        left = self._connections.get(source, 0) - 1
        if left > 0:
            self._connections[source] = left
        else:
            self._connections.pop(source, None)

    def connections(self, source: str) -> int:
        """The connections ``source`` holds now."""
        return self._connections.get(source, 0)

    # -- offers -----------------------------------------------------------------------------

    def offer(self, source: str, now: float) -> Refusal | None:
        """An offer from ``source`` arrived: take one of its tokens, or refuse it."""
        wait = self._source_rates.take(source, now)
        return self._rate_limited(wait, "address") if wait else None

    def admit(self, source: str, subject: str | None, now: float) -> Setup | Refusal:
        """Admit an offer whose token is valid (``subject`` None where subjects do not count):
        a half-open slot and a place on the node, taken at once; give them back with
        :meth:`cancel` if no session comes of it, or make them the session's with
        :meth:`opened`."""
        for key, table, whose in (
            (source, self._by_source, "address"),
            (subject, self._by_subject, "token subject"),
        ):
            held = table.get(key, set()) if key is not None else set()
            if len(held) >= self.limits.half_open:
                first = min(setup.deadline for setup in held)
                wait = first - now if first < math.inf else self.limits.setup_within
                return Refusal(
                    429,
                    "half_open_limit",
                    f"too many sessions of one {whose} are still connecting "
                    f"(at most {self.limits.half_open})",
                    _seconds(wait),
                )
        capacity = self.capacity
        if capacity is not None and capacity.load() + self.pending >= capacity.sessions:
            return Refusal(503, "node_over_capacity", "the node is at capacity")
        if capacity is not None and capacity.busy():
            return Refusal(
                503, "node_busy", "the node is too busy for another session now", BUSY_RETRY
            )
        if subject is not None:
            wait = self._subject_rates.take(subject, now)
            if wait:
                return self._rate_limited(wait, "token subject")
        setup = Setup(source, subject)
        self._by_source.setdefault(source, set()).add(setup)
        if subject is not None:
            self._by_subject.setdefault(subject, set()).add(setup)
        self.pending += 1
        return setup

    def _rate_limited(self, wait: float, whose: str) -> Refusal:
        rate = self.limits.offer_rate
        return Refusal(
            429,
            "rate_limited",
            f"too many offers from one {whose} (at most {rate:g} a second)",
            _seconds(wait),
        )

    def opened(self, setup: Setup, session_id: str, now: float) -> None:
        """The backend answered ``setup``'s offer with ``session_id``: it is a session now
        (counted by the capacity's load), half-open until :meth:`connected` or :meth:`gone`."""
        self._unpend(setup)
        setup.session_id = session_id
        setup.deadline = now + self.limits.setup_within
        self._setups[session_id] = setup

    def cancel(self, setup: Setup) -> None:
        """No session came of ``setup``'s offer: its slot and place are free."""
        self._unpend(setup)
        self._drop(setup)

    def connected(self, session_id: str) -> None:
        """``session_id``'s ICE connected: it is no longer half-open."""
        setup = self._setups.pop(session_id, None)
        if setup is not None:
            self._drop(setup)

    def gone(self, session_id: str) -> None:
        """``session_id`` is no longer served here (ended, moved): no longer half-open."""
        self.connected(session_id)

    def deadline(self, session_id: str) -> float:
        """When ``session_id`` is ended unless its ICE connects (infinity: not half-open)."""
        setup = self._setups.get(session_id)
        return setup.deadline if setup is not None else math.inf

    def half_open(self, source: str) -> int:
        """The half-open sessions (and offers being answered) of ``source``."""
        return len(self._by_source.get(source, ()))

    def _unpend(self, setup: Setup) -> None:
        if setup.pending:
            setup.pending = False
            self.pending -= 1

    def _drop(self, setup: Setup) -> None:
        for key, table in ((setup.source, self._by_source), (setup.subject, self._by_subject)):
            if key is None:
                continue
            held = table.get(key)
            if held is not None:
                held.discard(setup)
                if not held:
                    del table[key]
