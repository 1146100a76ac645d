"""``parley relay``: the relay daemon — public UDP port, route table, tunnel endpoint, registry.

The tree of one relay process::

    relay ─┬─ route table    (etcd: list + watch of session owners; relay/routes.py)
           ├─ tunnel endpoint (QUIC server; nodes dial in with cluster certificates; relay/tunnel/)
           ├─ public port     (UDP, IPv4 and/or IPv6; relay/edge.py)
           ├─ ops port        (TCP, loopback by default: GET /metrics; relay/opsport.py)
           └─ registration    (etcd key under the relay's own lease, refreshed with stats)

A relay holds no session state that matters for safety: fencing is decided by epochs from etcd,
so it keeps forwarding through an etcd outage (with the routes it has) and re-registers when
etcd is back. Nodes find relays through their registrations; when a relay dies its lease expires
and nodes stop listing it in answers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Final, final

import trio

from actors.lag import LoopLag
from relay.addresses import Address
from relay.edge import Limits, RelayEdge
from relay.metrics import RelayCollector
from relay.opsport import OpsPort, new_registry
from relay.routes import RouteTable
from relay.tunnel.certs import Credentials
from relay.tunnel.quic import Tunnel, TunnelEndpoint
from storage.etcd import Etcd, EtcdError, EtcdTLS, open_etcd
from storage.keys import Keyspace, check_name
from storage.lease import LeaseKeeper
from storage.members import Members, RelayInfo
from storage.ownership import Owners

__all__ = ["STATS_INTERVAL", "Relay", "worker_id"]

log = logging.getLogger("parley.relay")

#: how often the relay's record (with its packet rates) is refreshed in etcd
STATS_INTERVAL: Final = 2.0


def worker_id(relay_id: str, worker: int) -> str:
    """The registration of worker ``worker`` of relay ``relay_id`` (``relay-1.w0``).

    Workers share the relay's public port (SO_REUSEPORT) and its certificate, but each keeps
    its own client cache, route table and tunnel endpoint: nodes tunnel to each worker, and
    answer a client through the worker that heard it, the one the kernel hashes it to.
    """
    return f"{relay_id}.w{worker}"


@final
class Relay:
    """One relay process. Start ``run`` with ``nursery.start``; it reports the relay itself."""

    def __init__(
        self,
        relay_id: str,
        *,
        etcd_endpoint: str,
        prefix: str,
        credentials: Credentials,
        secrets: Sequence[bytes],
        listen: Sequence[Address],
        tunnel_host: str = "127.0.0.1",
        tunnel_port: int = 0,
        lease_ttl: int = 5,
        limits: Limits | None = None,
        worker: int | None = None,
        etcd_tls: EtcdTLS | None = None,
        ops_listen: Address | None = None,
        advertise: Sequence[Address] = (),
        region: str = "",
        tunnel_advertise: Address | None = None,
        tunnel_hold: float = 0.0,
    ) -> None:
        check_name("relay", relay_id)
        if not advertise and any(ipaddress.ip_address(h).is_unspecified for h, _ in listen):
            raise ValueError(
                "relay.listen binds every address (0.0.0.0 or ::), which no client can send to: "
                "set relay.advertise to the address(es) clients reach, or listen on one"
            )
        if credentials.identity.role != "relay" or credentials.identity.ident != relay_id:
            raise ValueError(
                f"the certificate is for {credentials.identity}, not relay {relay_id!r}"
            )
        #: the relay's name, as its certificate gives it
        self.identity = relay_id
        #: the registration's: one per worker when several share the public port
        self.id = relay_id if worker is None else worker_id(relay_id, worker)
        self.etcd_endpoint = etcd_endpoint
        #: what the relay presents to an etcd that requires client certificates (its own)
        self.etcd_tls = etcd_tls
        self.keys = Keyspace(prefix)
        self.credentials = credentials
        self.listen = list(listen)
        #: the addresses offered to clients as candidates (empty: the bound ones)
        self.advertise = tuple(advertise)
        #: where its public port is (relay.region): nodes offer it first to clients there
        self.region = region
        self.tunnel_host = tunnel_host
        self.tunnel_port = tunnel_port
        #: the tunnel address registered for nodes to dial (None: the bound one)
        self.tunnel_advertise = tunnel_advertise
        #: seconds the tunnel may hold client datagrams to pack them (relay.tunnel_hold_ms)
        self.tunnel_hold = tunnel_hold
        self.lease_ttl = lease_ttl
        self.routes = RouteTable()
        self.edge = RelayEdge(
            self.id, secrets, self.routes, limits=limits, reuse_port=worker is not None
        )
        self.endpoint: TunnelEndpoint | None = None
        self.started_at = time.time()
        self._last: tuple[float, int, int] = (0.0, 0, 0)
        self._rates = (0.0, 0.0)
        self.lag = LoopLag()
        self._lag: dict[str, int] = {}
        #: the relay's lease keeper, once it runs (its lease is the registration's)
        self.keeper: LeaseKeeper | None = None
        #: serves GET /metrics (None: no ops port)
        self.ops: OpsPort | None = None
        if ops_listen is not None:
            self.ops = OpsPort(new_registry(RelayCollector(self)), *ops_listen)

    # -- TunnelHandler ---------------------------------------------------------------------------

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        if tunnel.peer.role != "node":
            tunnel.close("only nodes tunnel to a relay")
            return
        old = self.edge.tunnels.get(tunnel.peer.ident)
        self.edge.tunnels[tunnel.peer.ident] = tunnel  # a reconnecting node replaces its tunnel
        if isinstance(old, Tunnel) and old is not tunnel:
            old.close("replaced by a new tunnel from the same node")
        # The endpoint logs every tunnel's opening and closing, once.

    def datagram_received(self, tunnel: Tunnel, data: bytes) -> None:
        self.edge.from_node(tunnel.peer.ident, data)

    def control_received(self, tunnel: Tunnel, message: dict[str, Any]) -> None:
        log.debug("control from %s: %s", tunnel.peer.ident, message)

    def tunnel_closed(self, tunnel: Tunnel, reason: str) -> None:
        if self.edge.tunnels.get(tunnel.peer.ident) is tunnel:
            del self.edge.tunnels[tunnel.peer.ident]

    # -- lifetime --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
        async with (
            open_etcd(self.etcd_endpoint, tls=self.etcd_tls) as etcd,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self.lag.run)
            if self.ops is not None:
                await nursery.start(self.ops.run)
            owners = Owners(etcd, self.keys)
            members = Members(etcd, self.keys)
            # Routes first: a relay that forwarded before knowing owners would route only by
            # hints, and could not fence.
            await nursery.start(self.routes.run, owners)
            endpoint = TunnelEndpoint(
                self.credentials,
                self,
                host=self.tunnel_host,
                port=self.tunnel_port,
                server=True,
                hold=self.tunnel_hold,
            )
            await nursery.start(endpoint.run)
            self.endpoint = endpoint
            self.edge.flush = endpoint.transmit_pending
            await nursery.start(self.edge.serve, self.listen)
            keeper = self.keeper = LeaseKeeper(etcd, ttl=self.lease_ttl)
            await nursery.start(keeper.run)
            await self._register(members, keeper, etcd, task_status)

    def info(self) -> RelayInfo:
        assert self.endpoint is not None
        counters = self.edge.counters
        return RelayInfo(
            id=self.id,
            identity=self.identity,
            public=self.advertise or tuple(self.edge.addresses),
            tunnel=self.tunnel_advertise or self.endpoint.address,
            tunnels=tuple(sorted(self.edge.tunnels)),
            sessions=self.edge.sessions(),
            clients=len(self.edge.clients),
            pps_in=round(self._rates[0], 1),
            pps_out=round(self._rates[1], 1),
            metrics=self.ops.url if self.ops is not None else "",
            region=self.region,
            counters={
                **counters,
                **{f"routes_{k}": v for k, v in self.routes.counters.items()},
                # What the tunnels dropped (backlog, size, closed) shows up here too.
                **{f"tunnel_{k}": v for k, v in self.endpoint.counters.items()},
                "kernel_drops": self.edge.kernel_drops(),
                "tunnel_kernel_drops": self.endpoint.kernel_drops(),
                # A stalled loop loses packets in the kernel, where no counter above sees it.
                **self._lag,
            },
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=self.started_at,
        )

    def _measure(self) -> None:
        now = trio.current_time()
        then, received, sent = self._last
        counters = self.edge.counters
        if then:
            elapsed = max(now - then, 1e-6)
            self._rates = (
                (counters["client_in"] - received) / elapsed,
                (counters["client_out"] - sent) / elapsed,
            )
        self._last = (now, counters["client_in"], counters["client_out"])
        self._lag = self.lag.counters()

    async def _register(
        self,
        members: Members,
        keeper: LeaseKeeper,
        etcd: Etcd,
        task_status: trio.TaskStatus[Relay],
    ) -> None:
        """Publish the relay under its lease, refreshed every STATS_INTERVAL, forever.

        A lost lease (etcd unreachable for a TTL) only means a new registration under the next
        one; forwarding goes on meanwhile. On the way out the record is deleted and the lease
        revoked, so nodes drop this relay from their answers at once.
        """
        reported = False
        try:
            while True:
                lease = await keeper.current()
                with lease.scope:
                    while True:
                        self._measure()
                        try:
                            await members.register_relay(self.info(), lease.id)
                        except EtcdError as exc:
                            log.warning("could not register relay", extra={"error": str(exc)})
                        else:
                            if not reported:
                                reported = True
                                log.info(
                                    "relay registered",
                                    extra={
                                        "relay": self.id,
                                        "public": self.info().public,
                                        "tunnel": self.info().tunnel,
                                    },
                                )
                                task_status.started(self)
                        await trio.sleep(STATS_INTERVAL)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await members.deregister_relay(self.id)
                    last = keeper.lease
                    if last is not None:
                        await etcd.lease_revoke(last.id)
                except EtcdError as exc:
                    log.warning("could not deregister relay", extra={"error": str(exc)})
