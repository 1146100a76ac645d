"""``parley opsview``: a live view of the cluster for a person, served over HTTP.

``GET /`` is the page (``ops/opsview.html``: small plots drawn on ``<canvas>``, no library, no
network beyond this server); ``GET /api/view`` is what it plots, as JSON: a bounded history
(``ops/opsview_history.py``) of sessions per node, packet rates per relay and the spread of
loss, jitter and RTT over the live sessions, plus the recent ownership changes with their
reasons.

Like every ops command it reads the cluster through etcd only, never a node's or relay's port:
every ``interval`` seconds what ``parley status`` reads (:func:`ops.status.gather_status`), and,
all the time, a watch of the ownership keys (owners, moves, checkpoints, end and drain requests)
so that no change is missed between two samples.

HTTP/1.1 by the processes' ops ports' server (``relay.opsport.OneRequestHttp``): one request a
connection, which must arrive whole within a few seconds and bytes, a bounded number served at
once, and a malformed one answered with a 4xx and a line saying why. The page is for whoever
runs the cluster: the listen address defaults to loopback (``up.opsview_listen``, ``--listen``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final, final

import trio

from ops.opsview_history import SPAN, History, OwnershipEvent, OwnershipLog
from ops.status import gather_status
from relay.opsport import OneRequestHttp
from storage.etcd import Etcd, EtcdError, WatchEvent
from storage.keys import Keyspace
from storage.moves import BadMoveValue, Move
from storage.ownership import BadOwnershipValue, Owners, decode_ownership

__all__ = ["DEFAULT_LISTEN", "PAGE", "OpsView", "parse_listen"]

log = logging.getLogger("parley.opsview")

#: where ``parley opsview`` and ``parley up`` serve the page unless told otherwise
DEFAULT_LISTEN: Final = "127.0.0.1:8770"
PAGE: Final = Path(__file__).with_name("opsview.html")
_TEXT: Final = "text/plain; charset=utf-8"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); raises ValueError with a clear message."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
        raise ValueError(f"listen address must be HOST:PORT, not {value!r}")
    return host, int(port)


@final
class OpsView:
    """Samples the cluster behind ``etcd`` and serves the page; start :meth:`run` with
    ``nursery.start``, which reports the bound (host, port)."""

    def __init__(
        self,
        etcd: Etcd,
        keys: Keyspace,
        *,
        interval: float = 1.0,
        span: float = SPAN,
        read: Callable[[Etcd, Keyspace], Awaitable[dict[str, Any]]] = gather_status,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.interval = interval
        #: what one sample reads (tests give their own), and the time stamped on it
        self.read = read
        self.clock = clock
        self.history = History(span=span, max_points=int(span / interval) + 2)
        self.ownership = OwnershipLog()
        self.page = PAGE.read_bytes()
        #: the last etcd error of the sampler or the watch, until the next success ("" if none)
        self.error = ""
        self.samples = 0
        self.watch_restarts = 0
        self.address: tuple[str, int] = ("", 0)
        # a bug of the view costs one request, never the server
        self._http = OneRequestHttp(self.route, failed="the ops page's view failed")

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        name = listeners[0].socket.getsockname()
        self.address = (name[0], name[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample)
            nursery.start_soon(self._watch)
            await nursery.start(trio.serve_listeners, self._http, listeners)
            log.info("ops page open", extra={"url": self.url})
            task_status.started(self.address)

    # -- what it reads ----------------------------------------------------------------------------

    async def _sample(self) -> None:
        while True:
            started = trio.current_time()
            status: dict[str, Any] | None = None
            try:
                status = await self.read(self.etcd, self.keys)
            except* EtcdError as group:  # gather_status reads leases in a nursery: a group
                self.error = f"etcd did not answer: {group.exceptions[0]}"
            if status is not None:
                self.history.add(status, self.clock())
                self.samples += 1
                self.error = ""
            await trio.sleep_until(started + self.interval)

    async def _watch(self) -> None:
        """Follow the ownership keys; after an error (etcd compacted what we need, or went
        away for good) read the owners afresh and follow again from there."""
        while True:
            try:
                await self._follow()
            except* EtcdError as group:
                self.error = f"ownership watch: {group.exceptions[0]}"
            self.watch_restarts += 1
            await trio.sleep(self.interval)

    async def _follow(self) -> None:
        owned, revision = await Owners(self.etcd, self.keys).list()
        self.ownership.owners = {o.session: o.node for o in owned}
        prefix = self.keys.prefix + "/"
        async with self.etcd.watch_prefix(prefix, start_revision=revision + 1) as batches:
            async for batch in batches:
                self.ownership.apply(self.translate(batch), self.clock())

    def translate(self, batch: Iterable[WatchEvent]) -> list[OwnershipEvent]:
        """The ownership facts in a watch batch; anything unreadable is skipped."""
        keys, out = self.keys, []
        for event in batch:
            key, revision, deleted = event.kv.key, event.revision, event.kind == "delete"
            if (session := keys.session_of_owner_key(key)) is not None:
                node = None
                if not deleted:
                    try:
                        node = decode_ownership(session, event.kv).node
                    except BadOwnershipValue:
                        continue
                out.append(OwnershipEvent("owner", revision, session, node=node))
            elif (session := keys.session_of_move_key(key)) is not None and not deleted:
                try:
                    move = Move.decode(session, event.kv)
                except BadMoveValue:
                    continue
                out.append(
                    OwnershipEvent(
                        "move",
                        revision,
                        session,
                        node=move.target,
                        source=move.source,
                        state=move.state,
                        reason=move.reason,
                    )
                )
            elif (session := keys.session_of_end_key(key)) is not None and not deleted:
                out.append(OwnershipEvent("end_requested", revision, session))
            elif key.startswith(keys.checkpoints_prefix.encode()) and deleted:
                session = key[len(keys.checkpoints_prefix) :].decode(errors="replace")
                out.append(OwnershipEvent("checkpoint_deleted", revision, session))
            elif key.startswith(keys.drains_prefix.encode()):
                node_id = key[len(keys.drains_prefix) :].decode(errors="replace")
                state = None if deleted else "requested"
                out.append(OwnershipEvent("drain", revision, node=node_id, state=state))
        return out

    def view(self) -> dict[str, Any]:
        """What ``GET /api/view`` answers."""
        return {
            **self.history.view(),
            "now": self.clock(),
            "interval": self.interval,
            "samples": self.samples,
            "error": self.error,
            "changes": self.ownership.view(),
        }

    # -- HTTP -------------------------------------------------------------------------------------

    def route(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        path = target.split(b"?", 1)[0]
        if path not in (b"/", b"/index.html", b"/api/view", b"/healthz"):
            return 404, _TEXT, b"not found: GET / (the page) or /api/view (its data)\n"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"only GET\n"
        if path == b"/api/view":
            body = json.dumps(self.view(), separators=(",", ":"), allow_nan=False)
            return 200, "application/json", body.encode()
        if path == b"/healthz":
            return 200, _TEXT, b"ok\n"
        return 200, "text/html; charset=utf-8", self.page


def run_opsview(config: Any, *, interval: float = 1.0) -> int:
    """``parley opsview``: serve the page on ``up.opsview_listen`` until Ctrl-C (exit 0)."""
    import signal
    import sys

    from ops.config import ConfigError
    from storage.etcd import open_etcd

    try:
        tls = config.cluster.etcd_tls("operator")
        host, port = parse_listen(config.up.opsview_listen or DEFAULT_LISTEN)
    except (ConfigError, ValueError) as exc:
        print(f"parley opsview: {exc}", file=sys.stderr)
        return 2
    if not interval > 0:
        print("parley opsview: --interval must be above 0", file=sys.stderr)
        return 2

    async def main() -> None:
        async with open_etcd(config.cluster.etcd, tls=tls) as etcd, trio.open_nursery() as nursery:
            view = OpsView(etcd, Keyspace(config.cluster.prefix), interval=interval)
            await nursery.start(view.run, host, port)
            print(f"ops page: {view.url}  (etcd {config.cluster.etcd}; Ctrl-C stops)", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    failed: list[str] = []
    try:
        trio.run(main)
    except* OSError as group:
        failed.append(f"parley opsview: cannot serve on {host}:{port}: {group.exceptions[0]}")
    except* KeyboardInterrupt:
        pass
    if failed:
        print(failed[0], file=sys.stderr)
        return 2
    return 0
