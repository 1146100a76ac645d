"""etcd for Trio.

python-etcd3 is a blocking gRPC client. Every call here runs in a worker thread (bounded by a
capacity limiter, abandoned on cancellation) with a gRPC deadline, so the Trio loop never blocks and
a frozen etcd cannot hang a caller beyond ``timeout``. Watches are our own: one bidirectional gRPC
stream pumped by a thread, restarted after any failure from the revision after the last one seen,
so an etcd restart loses no event.

Given several endpoints (the members of one cluster), the client talks to one at a time and moves
on to the next when it fails as unavailable: dead (refused at once), frozen (accepts TCP, never
answers: only a deadline shows it, so one attempt gets half the call's time) or without a leader
(refused at once: multi-endpoint requests carry etcd's "require leader" mark). A member that did
not answer is passed over for a while. Reads and lease calls then retry on the next member within
the call's own deadline, and lease keepalives do not even wait for a silent member's attempt to
end (hedged); a write is retried only when it surely never reached a member, since one that a
silent member received may still be applied. Reads stay linearizable (etcd's default), so a
cut-off member cannot answer with stale data. Watches ask for progress to notice a silent member,
and resume on the next member after the last revision they delivered.

The messages, errors and helpers live in :mod:`storage.etcdwire`; import them from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, final

import trio

from storage.etcdwire import (
    Compacted,
    EtcdError,
    EtcdTLS,
    EtcdUnavailable,
    KeyValue,
    MemberStatus,
    TxnResult,
    WatchEvent,
    WatchStream,
    check_client,
    cmp_create_revision,
    cmp_mod_revision,
    endpoints_use_tls,
    etcdrpc,
    grpc,
    grpc_client,
    key_bytes,
    op_delete,
    op_get,
    op_put,
    parse_endpoints,
    prefix_range_end,
    read_member_status,
    translate_rpc_error,
)

__all__ = [
    "Compacted",
    "Etcd",
    "EtcdError",
    "EtcdTLS",
    "EtcdUnavailable",
    "KeyValue",
    "MemberStatus",
    "TxnResult",
    "WatchChannel",
    "WatchEvent",
    "cmp_create_revision",
    "cmp_mod_revision",
    "endpoints_use_tls",
    "op_delete",
    "op_get",
    "op_put",
    "open_etcd",
    "parse_endpoints",
    "prefix_range_end",
    "read_member_status",
]

log = logging.getLogger("parley.etcd")

T = TypeVar("T")

#: etcd's "require leader" mark: a member that has lost its leader refuses the call at once (and
#: ends such a watch) instead of waiting or serving a stream that no longer moves.
_REQUIRE_LEADER = (("hasleader", "true"),)
#: The shortest attempt worth starting on another member, seconds.
_MIN_ATTEMPT = 0.05
#: Seconds a member that did not answer (dead, frozen, unreachable) is passed over when the
#: client moves on, unless every other one is suspect too: without it, a failure elsewhere (a
#: refusal during the election that a frozen leader caused) sends calls back to the silent member
#: for another attempt timeout.
_SUSPECT_FOR = 5.0
#: Seconds a hedged call (lease keepalives) waits for an answer before it also asks another member.
_HEDGE_AFTER = 0.25


@final
class WatchChannel(Generic[T]):
    """The values of a watch, in order (what :meth:`Etcd.watch_each` yields).

    Values cross from the watch to the consumer a batch at a time, and values already here are
    handed out without a trip through the scheduler. With one trip per value a loaded node
    (every scheduler round taking tens of milliseconds) fell seconds behind its watch in a
    drain of 50 sessions, and its moves waited for news the etcd server had long sent.
    """

    def __init__(self, batches: trio.MemoryReceiveChannel[list[T]]) -> None:
        self._batches = batches
        self._ready: deque[T] = deque()

    async def receive(self) -> T:
        """The next value; raises ``trio.EndOfChannel`` once the watch has ended."""
        while not self._ready:
            self._ready.extend(await self._batches.receive())
        return self._ready.popleft()

    def __aiter__(self) -> WatchChannel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@final
class Etcd:
    """A Trio client for one etcd cluster, given one endpoint (``host:port``) or several
    (``"h1:p1,h2:p2"`` or a list: the members of that cluster).

    ``tls``: the client certificate to present, for an etcd with client-certificate TLS; then
    the channels are TLS. Endpoints written ``https://host:port`` need it (storage/etcdtls.py).

    Open it with :func:`open_etcd`. Every method raises :class:`EtcdUnavailable` when etcd does
    not answer within ``rpc_timeout`` seconds and :class:`EtcdError` for other failures. With
    several endpoints one attempt gets at most ``attempt_timeout`` (default: half the call's
    time) before the call moves on to the next member (see the module docstring).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        rpc_timeout: float = 2.0,
        max_threads: int = 32,
        attempt_timeout: float | None = None,
        tls: EtcdTLS | None = None,
    ) -> None:
        check_client(endpoints, tls)
        self.endpoints = parse_endpoints(endpoints)
        #: whether the channels are TLS (with our client certificate)
        self.tls = tls is not None
        #: ``host:port`` for one member, ``host:port,host:port,...`` for several
        self.endpoint = ",".join(self.endpoints)
        self.timeout = rpc_timeout
        multi = len(self.endpoints) > 1
        self.attempt_timeout = attempt_timeout or (rpc_timeout / 2 if multi else rpc_timeout)
        self._metadata = _REQUIRE_LEADER if multi else None
        self._clients = [grpc_client(endpoint, tls) for endpoint in self.endpoints]
        self._current = 0
        #: per member: until when (time.monotonic) it is skipped when moving on
        self._suspect_until = [0.0] * len(self.endpoints)
        #: how often a call or watch moved on to the next member
        self.failovers = 0
        self._limiter = trio.CapacityLimiter(max_threads)

    @property
    def current_endpoint(self) -> str:
        """The member calls and new watches go to now."""
        return self.endpoints[self._current]

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def _move_on(self, index: int, reason: EtcdUnavailable) -> None:
        """Leave the member at ``index`` for the next one that is not suspect, unless a
        concurrent failure already moved on (many calls fail together when a member dies: they
        must not skip healthy ones). A member that is gone or silent becomes suspect for a while;
        one that answered with a refusal (no leader yet, leader changed) does not."""
        count = len(self._clients)
        if count == 1:
            return
        if not reason.answered:
            self._suspect_until[index] = time.monotonic() + _SUSPECT_FOR
        if self._current != index:
            return
        self._current = self._next(index)
        self.failovers += 1
        log.info(
            "etcd %s failed (%s); moving on to %s",
            self.endpoints[index],
            reason,
            self.current_endpoint,
        )

    def _next(self, index: int) -> int:
        """The member after ``index`` in the ring that is not suspect (if all are: the next)."""
        now, count = time.monotonic(), len(self._clients)
        later = [(index + step) % count for step in range(1, count + 1)]
        return next((i for i in later if self._suspect_until[i] <= now), later[0])

    async def _call(
        self,
        fn: Callable[[Any, float], T],
        *,
        idempotent: bool,
        budget: float | None = None,
    ) -> T:
        """``fn(client, attempt_timeout)`` in a worker thread, on the current member and then on
        the next ones as the failure allows, within ``budget`` seconds (default: the timeout)."""
        budget = self.timeout if budget is None else budget
        if len(self._clients) == 1:
            return await self._attempt(0, fn, budget)
        give_up = time.monotonic() + budget
        failed = 0
        while True:
            index = self._current
            attempt = min(give_up - time.monotonic(), self.attempt_timeout)
            try:
                return await self._attempt(index, fn, max(attempt, _MIN_ATTEMPT))
            except EtcdUnavailable as exc:
                self._move_on(index, exc)
                if not (idempotent or exc.never_sent):
                    raise
                failed += 1
                if failed % len(self._clients) == 0:
                    # A whole round failed: likely an election; do not spin through it.
                    await trio.sleep(min(0.1, max(0.0, give_up - time.monotonic())))
                if give_up - time.monotonic() < _MIN_ATTEMPT:
                    raise

    async def _hedged(self, fn: Callable[[Any, float], T], budget: float | None = None) -> T:
        """Like :meth:`_call` for a call that is safe to repeat, but without waiting out a silent
        member: each ``_HEDGE_AFTER`` seconds without an answer (or at once after a failure)
        one more attempt starts on the next member, and the first answer wins. A follower that
        forwards to a frozen leader stays stuck in that attempt even after a new leader is
        elected, so a later attempt, even on the same member, is what gets through."""
        budget = self.timeout if budget is None else budget
        if len(self._clients) == 1:
            return await self._attempt(0, fn, budget)
        give_up = time.monotonic() + budget
        won: list[T] = []
        failures: list[EtcdUnavailable] = []
        refused: list[EtcdError] = []
        finished_send, finished = trio.open_memory_channel[None](math.inf)

        async def attempt(index: int, seconds: float) -> None:
            try:
                won.append(await self._attempt(index, fn, seconds))
            except EtcdUnavailable as exc:
                failures.append(exc)
                self._move_on(index, exc)
                finished_send.send_nowait(None)
                return
            except EtcdError as exc:  # an answer too, and no other member would differ
                refused.append(exc)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            index = self._current
            while (left := give_up - time.monotonic()) >= _MIN_ATTEMPT:
                nursery.start_soon(attempt, index, min(left, self.attempt_timeout))
                with trio.move_on_after(_HEDGE_AFTER):
                    await finished.receive()
                await trio.sleep(_MIN_ATTEMPT)  # members refusing at once: no busy loop
                index = self._next(index)
        if won:
            return won[0]
        if refused:
            raise refused[0]
        raise failures[-1] if failures else EtcdUnavailable(f"etcd: no answer in {budget:g}s")

    async def _attempt(self, index: int, fn: Callable[[Any, float], T], seconds: float) -> T:
        client = self._clients[index]

        def guarded() -> T:
            try:
                return fn(client, seconds)
            except grpc.RpcError as exc:
                raise translate_rpc_error(exc) from None

        # abandon_on_cancel: a cancelled caller must not wait for a frozen etcd; the gRPC
        # deadline still bounds the abandoned thread.
        return await trio.to_thread.run_sync(guarded, abandon_on_cancel=True, limiter=self._limiter)

    # -- KV -------------------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> KeyValue | None:
        kvs, _ = await self.get_range(key_bytes(key))
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str | bytes) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` and the store revision they were read at."""
        p = key_bytes(prefix)
        return await self.get_range(p, prefix_range_end(p))

    async def get_range(self, key: bytes, range_end: bytes = b"") -> tuple[list[KeyValue], int]:
        # Linearizable (not serializable): a member cut off from its leader must not answer
        # from its own, possibly stale, store.
        request = etcdrpc.RangeRequest(key=key, range_end=range_end)
        response = await self._call(
            lambda c, t: c.kvstub.Range(request, t, metadata=self._metadata), idempotent=True
        )
        return [KeyValue.from_pb(kv) for kv in response.kvs], int(response.header.revision)

    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int:
        """Store ``value``; returns the revision of the write."""
        request = etcdrpc.PutRequest(key=key_bytes(key), value=value, lease=lease)
        response = await self._call(
            lambda c, t: c.kvstub.Put(request, t, metadata=self._metadata), idempotent=False
        )
        return int(response.header.revision)

    async def delete(self, key: str | bytes) -> bool:
        request = etcdrpc.DeleteRangeRequest(key=key_bytes(key))
        response = await self._call(
            lambda c, t: c.kvstub.DeleteRange(request, t, metadata=self._metadata),
            idempotent=False,
        )
        return int(response.deleted) > 0

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> TxnResult:
        """One atomic transaction; ``revision`` is the store revision after it ran."""
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)
        response = await self._call(
            lambda c, t: c.kvstub.Txn(request, t, metadata=self._metadata), idempotent=False
        )
        ranges = tuple(
            tuple(KeyValue.from_pb(kv) for kv in r.response_range.kvs)
            for r in response.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnResult(bool(response.succeeded), int(response.header.revision), ranges)

    # -- leases (cluster-wide: any member serves them) -----------------------------------------

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; returns (lease id, granted TTL in seconds)."""
        request = etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0)
        # Retried freely: a grant whose answer was lost leaves an unused lease that expires.
        response = await self._call(
            lambda c, t: c.leasestub.LeaseGrant(request, t, metadata=self._metadata),
            idempotent=True,
        )
        if response.error:
            raise EtcdError(f"lease grant refused: {response.error}")
        return int(response.ID), int(response.TTL)

    async def lease_keepalive(self, lease_id: int, *, deadline: float | None = None) -> int:
        """Send one keepalive; returns the TTL etcd granted (0: the lease no longer exists).

        ``deadline``: seconds the whole call may take, every member tried included."""

        def once(client: Any, timeout: float) -> int:
            request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
            responses = client.leasestub.LeaseKeepAlive(
                iter([request]), timeout, metadata=self._metadata
            )
            for response in responses:
                return int(response.TTL)
            return 0

        # Hedged: a node's lease must not wait out a silent member's attempt timeout.
        return await self._hedged(once, budget=deadline)

    async def lease_revoke(self, lease_id: int) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                lambda c, t: c.leasestub.LeaseRevoke(request, t, metadata=self._metadata),
                idempotent=True,  # a second revoke finds nothing, which is fine (below)
            )
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left (-1 if it does not exist)."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = await self._call(
            lambda c, t: c.leasestub.LeaseTimeToLive(request, t, metadata=self._metadata),
            idempotent=True,
        )
        return int(response.TTL)

    # -- watches --------------------------------------------------------------------------------

    @asynccontextmanager
    async def watch_prefix(
        self, prefix: str | bytes, *, start_revision: int = 0, buffer: int = 1024
    ) -> AsyncIterator[trio.MemoryReceiveChannel[list[WatchEvent]]]:
        """Watch every key under ``prefix``, from ``start_revision`` (0: from now).

        Yields a channel of event batches in revision order. The watch survives etcd restarts:
        it reconnects and resumes after the last revision it delivered, so no event is lost or
        repeated. If etcd compacted the revisions it needs, the channel raises :class:`Compacted`
        (as the cause of the nursery's error) because silently skipping would lose events.
        """
        p = key_bytes(prefix)
        send, receive = trio.open_memory_channel[list[WatchEvent]](buffer)
        async with trio.open_nursery() as nursery:
            # Yield only once etcd has created the watch, so "from now" means from this line on.
            await nursery.start(self._watch_loop, p, prefix_range_end(p), start_revision, send)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def watch_each(
        self,
        prefix: str | bytes,
        translate: Callable[[WatchEvent], T | None],
        *,
        start_revision: int = 0,
        first: Sequence[T] = (),
        buffer: int = 1024,
    ) -> AsyncIterator[WatchChannel[T]]:
        """:meth:`watch_prefix` one value at a time: ``first``, then each event through
        ``translate`` (None skips it), in order. Errors of the watch (``Compacted``) reach the
        consumer as they are."""
        send, receive = trio.open_memory_channel[list[T]](buffer)

        async def pump(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # `with send` closes without a checkpoint, so a Compacted error is never replaced
            # by the cancellation that follows the consumer leaving.
            with send:
                async with self.watch_prefix(prefix, start_revision=start_revision) as batches:
                    task_status.started()
                    if first:
                        await send.send(list(first))
                    async for batch in batches:
                        values = [v for event in batch if (v := translate(event)) is not None]
                        if values:
                            await send.send(values)

        async with trio.open_nursery() as nursery:
            await nursery.start(pump)
            try:
                yield WatchChannel(receive)
            finally:
                nursery.cancel_scope.cancel()

    async def _watch_loop(
        self,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        send: trio.MemorySendChannel[list[WatchEvent]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        state = {"next": start_revision, "failed": 0}
        created = False
        backoff = 0.1
        token = trio.lowlevel.current_trio_token()
        # With several members a stream is asked for progress now and then: a frozen member
        # keeps the stream open and silent, and only a missing answer tells it from a quiet one.
        probe = self.attempt_timeout if len(self._clients) > 1 else None

        async def deliver(batch: list[WatchEvent], header_revision: int) -> None:
            nonlocal backoff, created
            backoff = 0.1
            state["failed"] = 0
            if not created:
                created = True
                task_status.started()
            if batch:
                state["next"] = batch[-1].revision + 1
                await send.send(batch)
            else:
                # created / progress notification: nothing at or before this revision is still
                # to come, so a reconnect may resume after it.
                state["next"] = max(state["next"], header_revision + 1)

        # A plain `with`: closing must not checkpoint, or a cancellation arriving as the
        # consumer leaves would replace a Compacted error on its way out.
        with send:
            while True:
                index = self._current
                stream = WatchStream(
                    self._clients[index], key, range_end, state["next"], self._metadata, probe
                )
                try:
                    await stream.run(token, self._limiter, deliver)
                except EtcdUnavailable as exc:
                    log.info("etcd watch interrupted (%s); resuming at %d", exc, state["next"])
                    self._move_on(index, exc)
                # The next member at once; a pause only once every member has failed in a row.
                state["failed"] += 1
                if state["failed"] % len(self._clients) == 0:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)


@asynccontextmanager
async def open_etcd(
    endpoint: str | Sequence[str], *, rpc_timeout: float = 2.0, tls: EtcdTLS | None = None
) -> AsyncIterator[Etcd]:
    """An :class:`Etcd` client (one endpoint, or a cluster's ``"h1:p1,h2:p2"`` or list) that is
    closed on exit; ``tls``: our client certificate, for an etcd that takes TLS clients only."""
    client = Etcd(endpoint, rpc_timeout=rpc_timeout, tls=tls)
    try:
        yield client
    finally:
        client.close()
