"""What the Trio etcd client (storage/etcd.py) sends and receives: etcd3's generated messages,
our typed views of them, errors, endpoints, member status, and one watch stream.

Only the generated protobuf messages and stubs of etcd3 are used; its helpers hide the response
header, and the header revision is what we use as a fencing epoch. The gRPC channels are ours
too: plain, or TLS with a client certificate (:mod:`storage.etcdtls`). Import these names from
:mod:`storage.etcd`, which re-exports them.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, final

import attrs
import trio

from storage.etcdtls import EtcdTLS, check_client, endpoints_use_tls, parse_endpoints

__all__ = [
    "Compacted",
    "EtcdError",
    "EtcdTLS",
    "EtcdUnavailable",
    "KeyValue",
    "MemberClient",
    "MemberStatus",
    "TxnResult",
    "WatchEvent",
    "WatchStream",
    "check_client",
    "cmp_create_revision",
    "cmp_mod_revision",
    "endpoints_use_tls",
    "etcdrpc",
    "grpc",
    "grpc_client",
    "key_bytes",
    "op_delete",
    "op_get",
    "op_put",
    "parse_endpoints",
    "prefix_range_end",
    "read_member_status",
    "translate_rpc_error",
]

# etcd3's generated protobuf modules predate protobuf 4 and only import with the pure-Python
# implementation. Choose it before anything imports google.protobuf; if someone imported protobuf
# first with another backend, the import below fails and we say why instead of a protobuf trace.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

try:
    # The generated code uses descriptor APIs protobuf has deprecated; that is etcd3's to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import grpc
        from etcd3 import etcdrpc
except TypeError as exc:  # pragma: no cover - depends on import order in the host program
    raise ImportError(
        "storage.etcd must be imported before google.protobuf is loaded with a native backend "
        "(etcd3's generated code needs PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python)"
    ) from exc


class EtcdError(Exception):
    """An etcd call failed."""


class EtcdUnavailable(EtcdError):
    """etcd did not answer in time or could not be reached; the call may be retried.

    ``never_sent``: the failure shows the request reached no member's raft (no connection, or the
    member had no leader), so even a write may be sent again. ``answered``: a live member refused
    it (during an election, say), as opposed to a member that is gone or silent."""

    def __init__(self, message: str, *, never_sent: bool = False, answered: bool = False) -> None:
        super().__init__(message)
        self.never_sent = never_sent
        self.answered = answered


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


def key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def cmp_create_revision(key: str | bytes, revision: int) -> Any:
    """Compare: the key's create revision equals ``revision`` (0 = the key does not exist)."""
    return etcdrpc.Compare(
        result=etcdrpc.Compare.EQUAL,
        target=etcdrpc.Compare.CREATE,
        key=key_bytes(key),
        create_revision=revision,
    )


def cmp_mod_revision(key: str | bytes, revision: int) -> Any:
    """Compare: the key was last modified at ``revision``."""
    return etcdrpc.Compare(
        result=etcdrpc.Compare.EQUAL,
        target=etcdrpc.Compare.MOD,
        key=key_bytes(key),
        mod_revision=revision,
    )


def op_put(key: str | bytes, value: bytes, *, lease: int = 0) -> Any:
    return etcdrpc.RequestOp(
        request_put=etcdrpc.PutRequest(key=key_bytes(key), value=value, lease=lease)
    )


def op_delete(key: str | bytes) -> Any:
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key_bytes(key)))


def op_get(key: str | bytes) -> Any:
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key_bytes(key)))


_RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"}
#: UNAVAILABLE details after which the request reached no member's raft: gRPC found no connection
#: (a dead member refuses at once), or the member refused it before proposing anything.
_NEVER_SENT = ("failed to connect", "connection refused", "etcdserver: no leader")
#: WatchRequest.progress_request (field 3, an empty WatchProgressRequest; etcd >= 3.4), newer
#: than etcd3's generated messages: its wire form, sent as is through our own Watch callable.
_PROGRESS_REQUEST = b"\x1a\x00"


def translate_rpc_error(exc: grpc.RpcError) -> EtcdError:
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", str(code))
    detail = exc.details() if hasattr(exc, "details") else ""
    if name in _RETRYABLE:
        never_sent = name == "UNAVAILABLE" and any(m in detail.lower() for m in _NEVER_SENT)
        answered = detail.startswith("etcdserver:")
        return EtcdUnavailable(f"etcd {name}: {detail}", never_sent=never_sent, answered=answered)
    return EtcdError(f"etcd {name}: {detail}")


#: gRPC channel options: reconnect quickly after an etcd restart (gRPC's default backoff grows to
#: two minutes), and no retries of gRPC's own (the client decides what may be sent again).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)


def _channel(endpoint: str, tls: EtcdTLS | None) -> grpc.Channel:
    """A gRPC channel to one member: TLS with our client certificate when ``tls`` is given
    (``https://`` endpoints need it), plain otherwise."""
    check_client(endpoint, tls)
    (target,) = parse_endpoints(endpoint)
    if tls is None:
        return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem
    )
    return grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)


@final
class MemberClient:
    """One member's gRPC channel and the etcd services on it."""

    def __init__(self, endpoint: str, tls: EtcdTLS | None = None) -> None:
        self.channel = _channel(endpoint, tls)
        self.kvstub = etcdrpc.KVStub(self.channel)
        self.leasestub = etcdrpc.LeaseStub(self.channel)
        self.maintenancestub = etcdrpc.MaintenanceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def grpc_client(endpoint: str, tls: EtcdTLS | None = None) -> MemberClient:
    """A client of the member at ``endpoint`` (``host:port``, or ``https://host:port``)."""
    return MemberClient(endpoint, tls)


@final
@attrs.frozen
class MemberStatus:
    """One member's view of its cluster (etcd's maintenance Status)."""

    endpoint: str
    member_id: int
    #: the member it follows (itself when it leads); 0 while it knows no leader
    leader_id: int
    raft_term: int
    raft_index: int
    revision: int

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.member_id


def read_member_status(
    endpoint: str, *, timeout: float = 1.0, tls: EtcdTLS | None = None
) -> MemberStatus:
    """Ask the member at ``endpoint`` for its status (blocking; for ops tools and tests).
    ``tls``: our client certificate, for a member with client-certificate TLS."""
    client = MemberClient(endpoint, tls)
    try:
        response = client.maintenancestub.Status(etcdrpc.StatusRequest(), timeout)
    except grpc.RpcError as exc:
        raise translate_rpc_error(exc) from None
    finally:
        client.close()
    return MemberStatus(
        endpoint=endpoint,
        member_id=int(response.header.member_id),
        leader_id=int(response.leader),
        raft_term=int(response.raftTerm),
        raft_index=int(response.raftIndex),
        revision=int(response.header.revision),
    )


class WatchStream:
    """One gRPC watch stream, pumped by a worker thread into Trio (for storage.etcd.Etcd)."""

    def __init__(
        self,
        client: Any,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        metadata: Any = None,
        probe: float | None = None,
    ) -> None:
        self._client = client
        self._metadata = metadata
        #: seconds between progress requests, and to wait for any answer to one (None: never)
        self._probe = probe
        self._heard = time.monotonic()
        request = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=key,
                range_end=range_end,
                start_revision=start_revision,
                progress_notify=True,
            )
        )
        # The stream stays open as long as the request iterator does not end; None ends it.
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outbox.put(request.SerializeToString())
        self._call: Any = None

    def _requests(self) -> Iterator[bytes]:
        while (request := self._outbox.get()) is not None:
            yield request

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
                # Our own callable: it sends requests already serialized (see _PROGRESS_REQUEST).
                watch = self._client.channel.stream_stream(
                    "/etcdserverpb.Watch/Watch",
                    request_serializer=bytes,
                    response_deserializer=etcdrpc.WatchResponse.FromString,
                )
                self._call = watch(self._requests(), metadata=self._metadata)
                for response in self._call:
                    self._heard = time.monotonic()
                    if response.compact_revision:
                        raise Compacted(
                            f"watch start revision compacted (now {response.compact_revision})"
                        )
                    if response.canceled:
                        raise EtcdUnavailable(
                            f"watch canceled by etcd: {response.cancel_reason}", answered=True
                        )
                    if response.watch_id == -1 and not response.events:
                        # The answer to a progress request: proof of life only. etcd 3.4 sends
                        # its current revision even while our watcher is still catching up, so
                        # resuming after it could skip events.
                        continue
                    batch = [
                        WatchEvent("delete" if ev.type == 1 else "put", KeyValue.from_pb(ev.kv))
                        for ev in response.events
                    ]
                    token.run_sync_soon(put, (batch, int(response.header.revision)))
                error = EtcdUnavailable("watch stream ended")
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc)
            except Exception as exc:  # Compacted, or Trio gone / channel closed: report and end
                error = exc
            # A closed channel or a finished run means nobody listens any more.
            with contextlib.suppress(Exception):
                token.run_sync_soon(put, error)

        async def pump_in_thread() -> None:
            await trio.to_thread.run_sync(pump, abandon_on_cancel=True, limiter=limiter)

        async def watchdog(interval: float) -> None:
            # One question at a time, asked every half interval once the last one was answered:
            # a member silent for a whole interval after a question is taken for gone, within
            # 1.5 intervals of its going silent.
            asked = -math.inf
            while True:
                await trio.sleep(interval / 2)
                now = time.monotonic()
                if self._heard >= asked:
                    asked = now
                    self._outbox.put(_PROGRESS_REQUEST)
                elif now - asked >= interval:
                    put(EtcdUnavailable(f"watch: no answer to a progress request in {interval}s"))
                    return

        failure: BaseException | None = None
        with receive:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_in_thread)
                if self._probe is not None:
                    nursery.start_soon(watchdog, self._probe)
                try:
                    async for item in receive:
                        # Every response that came while the loop was busy, as one batch: one
                        # trip through the scheduler for all of them (a loaded node fell
                        # seconds behind taking one response per trip).
                        events: list[WatchEvent] = []
                        revision = 0
                        while True:
                            if isinstance(item, BaseException):
                                failure = item
                                break
                            events.extend(item[0])
                            revision = max(revision, item[1])
                            try:
                                item = receive.receive_nowait()
                            except trio.WouldBlock:
                                break
                        if events or failure is None:
                            await deliver(events, revision)
                        if failure is not None:
                            break
                finally:
                    self.close()
                    nursery.cancel_scope.cancel()
        # Raised outside the nursery so callers see the error itself, not an exception group.
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
