"""etcd for Trio.

python-etcd3 is a blocking gRPC client. Every call here runs in a worker thread (bounded by a
capacity limiter, abandoned on cancellation) with a gRPC deadline, so the Trio loop never blocks and
a frozen etcd cannot hang a caller beyond ``timeout``. Watches are our own: one bidirectional gRPC
stream pumped by a thread, restarted after any failure from the revision after the last one seen,
so an etcd restart loses no event.

Only the generated protobuf messages and stubs of etcd3 are used; its helpers hide the response
header, and the header revision is what we use as a fencing epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, final

import attrs
import trio

# etcd3's generated protobuf modules predate protobuf 4 and only import with the pure-Python
# implementation. Choose it before anything imports google.protobuf; if someone imported protobuf
# first with another backend, the import below fails and we say why instead of a protobuf trace.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

try:
    # The generated code uses descriptor APIs protobuf has deprecated; that is etcd3's to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import etcd3
        import grpc
        from etcd3 import etcdrpc
except TypeError as exc:  # pragma: no cover - depends on import order in the host program
    raise ImportError(
        "storage.etcd must be imported before google.protobuf is loaded with a native backend "
        "(etcd3's generated code needs PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)"
    ) from exc

log = logging.getLogger("parley.etcd")

T = TypeVar("T")


class EtcdError(Exception):
    """An etcd call failed."""


class EtcdUnavailable(EtcdError):
    """etcd did not answer in time or could not be reached; the call may be retried."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has already compacted away; events were lost."""


@final
@attrs.frozen
class KeyValue:
    """One key as etcd returns it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        return cls(
            key=bytes(kv.key),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            version=int(kv.version),
            lease=int(kv.lease),
        )


@final
@attrs.frozen
class WatchEvent:
    """A put or a delete seen by a watch; ``kv.mod_revision`` is the event's revision."""

    kind: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@final
@attrs.frozen
class TxnResult:
    """Outcome of a transaction: which branch ran, at which revision, and any range results."""

    succeeded: bool
    revision: int
    ranges: tuple[tuple[KeyValue, ...], ...]


# -- transaction building blocks (thin, typed wrappers over the protobuf messages) ---------------


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``prefix`` (etcd range end)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # etcd: every key
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _b(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def cmp_create_revision(key: str | bytes, revision: int) -> Any:
    """Compare: the key's create revision equals ``revision`` (0 = the key does not exist)."""
    return etcdrpc.Compare(
        result=etcdrpc.Compare.EQUAL,
        target=etcdrpc.Compare.CREATE,
        key=_b(key),
        create_revision=revision,
    )


def cmp_mod_revision(key: str | bytes, revision: int) -> Any:
    """Compare: the key was last modified at ``revision``."""
    return etcdrpc.Compare(
        result=etcdrpc.Compare.EQUAL,
        target=etcdrpc.Compare.MOD,
        key=_b(key),
        mod_revision=revision,
    )


def op_put(key: str | bytes, value: bytes, *, lease: int = 0) -> Any:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=_b(key), value=value, lease=lease))


def op_delete(key: str | bytes) -> Any:
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_b(key)))


def op_get(key: str | bytes) -> Any:
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=_b(key)))


_RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"}


def _translate(exc: grpc.RpcError) -> EtcdError:
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", str(code))
    detail = exc.details() if hasattr(exc, "details") else ""
    if name in _RETRYABLE:
        return EtcdUnavailable(f"etcd {name}: {detail}")
    return EtcdError(f"etcd {name}: {detail}")


@final
class Etcd:
    """A Trio client for one etcd endpoint (``host:port``).

    Open it with :func:`open_etcd`. Every method raises :class:`EtcdUnavailable` when etcd does
    not answer within ``rpc_timeout`` seconds and :class:`EtcdError` for other failures.
    """

    def __init__(self, endpoint: str, *, rpc_timeout: float = 2.0, max_threads: int = 32) -> None:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, not {endpoint!r}")
        self.endpoint = endpoint
        self.timeout = rpc_timeout
        # Reconnect quickly after an etcd restart: gRPC's default backoff grows to two minutes.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        self._client = etcd3.client(host=host.strip("[]"), port=int(port), grpc_options=options)
        self._limiter = trio.CapacityLimiter(max_threads)

    def close(self) -> None:
        self._client.close()

    async def _call(self, fn: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return fn()
            except grpc.RpcError as exc:
                raise _translate(exc) from None

        # abandon_on_cancel: a cancelled caller must not wait for a frozen etcd; the gRPC
        # deadline still bounds the abandoned thread.
        return await trio.to_thread.run_sync(guarded, abandon_on_cancel=True, limiter=self._limiter)

    # -- KV -------------------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> KeyValue | None:
        kvs, _ = await self.get_range(_b(key))
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str | bytes) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` and the store revision they were read at."""
        p = _b(prefix)
        return await self.get_range(p, prefix_range_end(p))

    async def get_range(self, key: bytes, range_end: bytes = b"") -> tuple[list[KeyValue], int]:
        request = etcdrpc.RangeRequest(key=key, range_end=range_end)
        response = await self._call(lambda: self._client.kvstub.Range(request, self.timeout))
        return [KeyValue.from_pb(kv) for kv in response.kvs], int(response.header.revision)

    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int:
        """Store ``value``; returns the revision of the write."""
        request = etcdrpc.PutRequest(key=_b(key), value=value, lease=lease)
        response = await self._call(lambda: self._client.kvstub.Put(request, self.timeout))
        return int(response.header.revision)

    async def delete(self, key: str | bytes) -> bool:
        request = etcdrpc.DeleteRangeRequest(key=_b(key))
        response = await self._call(lambda: self._client.kvstub.DeleteRange(request, self.timeout))
        return int(response.deleted) > 0

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> TxnResult:
        """One atomic transaction; ``revision`` is the store revision after it ran."""
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=failure)
        response = await self._call(lambda: self._client.kvstub.Txn(request, self.timeout))
        ranges = tuple(
            tuple(KeyValue.from_pb(kv) for kv in r.response_range.kvs)
            for r in response.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnResult(bool(response.succeeded), int(response.header.revision), ranges)

    # -- leases ---------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; returns (lease id, granted TTL in seconds)."""
        request = etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0)
        response = await self._call(
            lambda: self._client.leasestub.LeaseGrant(request, self.timeout)
        )
        if response.error:
            raise EtcdError(f"lease grant refused: {response.error}")
        return int(response.ID), int(response.TTL)

    async def lease_keepalive(self, lease_id: int, *, deadline: float | None = None) -> int:
        """Send one keepalive; returns the TTL etcd granted (0: the lease no longer exists)."""
        rpc_deadline = self.timeout if deadline is None else deadline

        def once() -> int:
            request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
            for response in self._client.leasestub.LeaseKeepAlive(iter([request]), rpc_deadline):
                return int(response.TTL)
            return 0

        return await self._call(once)

    async def lease_revoke(self, lease_id: int) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(lambda: self._client.leasestub.LeaseRevoke(request, self.timeout))
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds the lease has left (-1 if it does not exist)."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = await self._call(
            lambda: self._client.leasestub.LeaseTimeToLive(request, self.timeout)
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
        p = _b(prefix)
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
    ) -> AsyncIterator[trio.MemoryReceiveChannel[T]]:
        """:meth:`watch_prefix` one value at a time: ``first``, then each event through
        ``translate`` (None skips it), in order. Errors of the watch (``Compacted``) reach the
        consumer as they are."""
        send, receive = trio.open_memory_channel[T](buffer)

        async def pump(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # `with send` closes without a checkpoint, so a Compacted error is never replaced
            # by the cancellation that follows the consumer leaving.
            with send:
                async with self.watch_prefix(prefix, start_revision=start_revision) as batches:
                    task_status.started()
                    for value in first:
                        await send.send(value)
                    async for batch in batches:
                        for event in batch:
                            translated = translate(event)
                            if translated is not None:
                                await send.send(translated)

        async with trio.open_nursery() as nursery:
            await nursery.start(pump)
            try:
                yield receive
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
        state = {"next": start_revision}
        created = False
        backoff = 0.1
        token = trio.lowlevel.current_trio_token()

        async def deliver(batch: list[WatchEvent], header_revision: int) -> None:
            nonlocal backoff, created
            backoff = 0.1
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
                stream = _WatchStream(self._client, key, range_end, state["next"])
                try:
                    await stream.run(token, self._limiter, deliver)
                except EtcdUnavailable as exc:
                    log.info("etcd watch interrupted (%s); resuming at %d", exc, state["next"])
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


class _WatchStream:
    """One gRPC watch stream, pumped by a worker thread into Trio."""

    def __init__(self, client: Any, key: bytes, range_end: bytes, start_revision: int) -> None:
        self._client = client
        self._request = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=key,
                range_end=range_end,
                start_revision=start_revision,
                progress_notify=True,
            )
        )
        self._closed = threading.Event()
        self._call: Any = None

    def _requests(self) -> Iterator[Any]:
        yield self._request
        # The stream stays open as long as the request iterator does not end.
        self._closed.wait()

    async def run(
        self,
        token: trio.lowlevel.TrioToken,
        limiter: trio.CapacityLimiter,
        deliver: Callable[[list[WatchEvent], int], Awaitable[None]],
    ) -> None:
        """Pump responses into ``deliver`` until the stream fails (raises) or is cancelled."""
        # Unbounded, and handed over with run_sync_soon: the thread never waits for the Trio
        # loop, so a busy loop takes every response that came meanwhile in one turn (a
        # round trip per response made a loaded node's watch fall seconds behind). FIFO, so
        # order holds; watch responses are small.
        send, receive = trio.open_memory_channel[tuple[list[WatchEvent], int] | BaseException](
            math.inf
        )

        def put(item: tuple[list[WatchEvent], int] | BaseException) -> None:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                send.send_nowait(item)

        def pump() -> None:
            error: BaseException
            try:
                self._call = etcdrpc.WatchStub(self._client.channel).Watch(self._requests())
                for response in self._call:
                    if response.compact_revision:
                        raise Compacted(
                            f"watch start revision compacted (now {response.compact_revision})"
                        )
                    if response.canceled:
                        raise EtcdUnavailable(f"watch canceled by etcd: {response.cancel_reason}")
                    batch = [
                        WatchEvent("delete" if ev.type == 1 else "put", KeyValue.from_pb(ev.kv))
                        for ev in response.events
                    ]
                    token.run_sync_soon(put, (batch, int(response.header.revision)))
                error = EtcdUnavailable("watch stream ended")
            except grpc.RpcError as exc:
                error = _translate(exc)
            except Exception as exc:  # Compacted, or Trio gone / channel closed: report and end
                error = exc
            # A closed channel or a finished run means nobody listens any more.
            with contextlib.suppress(Exception):
                token.run_sync_soon(put, error)

        async def pump_in_thread() -> None:
            await trio.to_thread.run_sync(pump, abandon_on_cancel=True, limiter=limiter)

        failure: BaseException | None = None
        with receive:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_in_thread)
                try:
                    async for item in receive:
                        if isinstance(item, BaseException):
                            failure = item
                            break
                        await deliver(*item)
                finally:
                    self.close()
                    nursery.cancel_scope.cancel()
        # Raised outside the nursery so callers see the error itself, not an exception group.
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()


@asynccontextmanager
async def open_etcd(endpoint: str, *, rpc_timeout: float = 2.0) -> AsyncIterator[Etcd]:
    """An :class:`Etcd` client that is closed on exit."""
    client = Etcd(endpoint, rpc_timeout=rpc_timeout)
    try:
        yield client
    finally:
        client.close()
