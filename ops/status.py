"""``parley status``: what the cluster's etcd says about nodes, relays and sessions."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, TextIO

import trio

from storage.etcd import Etcd, EtcdError
from storage.keys import Keyspace
from storage.members import Members
from storage.moves import Moves
from storage.ownership import Owners


async def gather_status(etcd: Etcd, keys: Keyspace) -> dict[str, Any]:
    """The cluster as JSON-ready data: ``{"nodes": [..], "relays": [..], "sessions": [..]}``."""
    members = Members(etcd, keys)
    owners = Owners(etcd, keys)
    nodes = await members.nodes()
    owned, revision = await owners.list()
    live = await members.session_stats()
    per_node = Counter(o.node for o in owned)
    ttls: dict[int, int] = {}

    async def ttl_of(lease: int) -> None:
        ttls[lease] = await etcd.lease_time_to_live(lease)

    async with trio.open_nursery() as nursery:
        for lease in {m.lease for m in nodes}:
            nursery.start_soon(ttl_of, lease)

    now = time.time()
    return {
        "revision": revision,
        "nodes": [
            {
                "id": m.info.id,
                "state": m.info.state,
                "lease": f"{m.lease:x}",
                "lease_ttl_left": ttls.get(m.lease, -1),
                "sessions": per_node.get(m.info.id, 0),
                "capacity": m.info.capacity,
                "region": m.info.region,
                "signaling": m.info.addresses.get("signaling"),
                # its ops port, where Prometheus scrapes it (relay/opsport.py)
                "metrics": m.info.addresses.get("metrics"),
                "addresses": m.info.addresses,
                "host": m.info.host,
                "pid": m.info.pid,
                "counters": m.info.counters,
                "uptime": round(max(0.0, now - m.info.started_at), 1)
                if m.info.started_at
                else None,
            }
            for m in sorted(nodes, key=lambda m: m.info.id)
        ],
        "relays": await members.relays(),
        "moves": [
            {
                "session": m.session,
                "from": m.source,
                "to": m.target,
                "state": m.state,
                "reason": m.reason,
                "age": round(max(0.0, now - m.requested_at), 1),
            }
            for m in sorted((await Moves(etcd, keys).list())[0], key=lambda m: m.requested_at)
        ],
        "sessions": [
            {"id": o.session, "owner": o.node, "epoch": o.epoch, "stats": live.get(o.session)}
            for o in sorted(owned, key=lambda o: o.session)
        ],
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _session_columns(session: dict[str, Any]) -> list[str]:
    stats = session.get("stats") or {}

    def num(key: str, unit: str, scale: float = 1.0) -> str:
        value = stats.get(key)
        return f"{scale * value:.1f}{unit}" if isinstance(value, int | float) else "-"

    def packets(direction: str) -> str:
        count, size = stats.get(f"packets_{direction}"), stats.get(f"bytes_{direction}")
        if not isinstance(count, int) or not isinstance(size, int):
            return "-"
        return f"{count}p/{size // 1024}KiB"

    moves = stats.get("moves")
    blackout = stats.get("last_move_blackout_ms")
    moved = "-"
    if isinstance(moves, int) and moves:
        moved = f"{moves} ({blackout:.0f}ms)" if isinstance(blackout, int | float) else str(moves)
    return [
        str(stats.get("state", "-")),
        moved,
        packets("in"),
        packets("out"),
        num("loss_fraction", "%", scale=100),
        num("jitter_ms", "ms"),
        num("rtt_ms", "ms"),
        # the client's relay and region, and its first hop's round trip (client to relay)
        str(stats.get("relay") or "-"),
        str(stats.get("region") or "-"),
        num("first_hop_rtt_ms", "ms"),
    ]


def _address(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) == 2:
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "?"


def _relay_columns(relay: dict[str, Any]) -> list[str]:
    public = relay.get("public")
    tunnels = relay.get("tunnels")
    return [
        str(relay.get("id", "?")),
        str(relay.get("region") or "-"),
        ",".join(_address(a) for a in public) if isinstance(public, list) and public else "-",
        ",".join(map(str, tunnels)) if isinstance(tunnels, list) and tunnels else "-",
        str(relay.get("sessions", "-")),
        str(relay.get("pps_in", "-")),
        str(relay.get("pps_out", "-")),
        str(relay.get("metrics") or "-"),
    ]


def format_status(status: dict[str, Any]) -> str:
    """Plain-text tables for people."""
    nodes = [
        [
            n["id"],
            n.get("region") or "-",
            n["state"],
            f"{n['lease_ttl_left']}s" if n["lease_ttl_left"] >= 0 else "expired",
            str(n["sessions"]),
            # who may open sessions there: "token" or "open" (node.auth, issue #15)
            str((n.get("addresses") or {}).get("auth", "-")),
            n["signaling"] or "-",
            n.get("metrics") or "-",
        ]
        for n in status["nodes"]
    ]
    relays = [_relay_columns(r) for r in sorted(status["relays"], key=lambda r: str(r.get("id")))]
    sessions = [
        [s["id"], s["owner"], str(s["epoch"]), *_session_columns(s)] for s in status["sessions"]
    ]
    parts = [
        f"nodes ({len(nodes)})",
        _table(
            ["id", "region", "state", "lease", "sessions", "auth", "signaling", "metrics"], nodes
        ),
        "",
        f"relays ({len(relays)})",
        _table(
            ["id", "region", "address", "tunnels", "sessions", "pkt/s in", "pkt/s out", "metrics"],
            relays,
        ),
        "",
        f"sessions ({len(sessions)})",
        _table(
            [
                *("id", "owner", "epoch", "state", "moves", "in", "out", "loss", "jitter", "rtt"),
                *("relay", "region", "hop"),
            ],
            sessions,
        ),
    ]
    moves = status.get("moves") or []
    if moves:
        rows = [
            [m["session"], m["from"], m["to"], m["state"], f"{m['age']}s", m["reason"] or "-"]
            for m in moves
        ]
        parts += ["", f"moves under way ({len(rows)})"]
        parts.append(_table(["session", "from", "to", "state", "age", "reason"], rows))
    return "\n".join(parts)


#: ANSI: cursor home, then clear the screen (a redraw in place on a terminal)
CLEAR_HOME = "\x1b[H\x1b[2J"


def watch_frame(text: str, *, at: float, interval: float, tty: bool) -> str:
    """One refresh of ``parley status --watch``: on a terminal the screen is cleared and redrawn
    under a title line; anywhere else (a pipe, a file) snapshots follow one another, each after
    a separator line with its time, so that the stream reads as a log."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    if tty:
        return f"{CLEAR_HOME}parley status  {stamp}  every {interval:g}s, Ctrl-C stops\n\n{text}\n"
    return f"--- {stamp} ---\n{text}\n\n"


async def watch_status(
    etcd: Etcd, keys: Keyspace, *, interval: float, out: TextIO, tty: bool
) -> None:
    """``parley status --watch``: the tables of :func:`format_status` every ``interval`` seconds,
    until cancelled. An etcd that does not answer costs one refresh (it says so), not the watch."""
    while True:
        started = trio.current_time()
        text = ""
        try:
            text = format_status(await gather_status(etcd, keys))
        except* EtcdError as group:  # lease reads run in a nursery: errors come as a group
            text = f"etcd did not answer: {group.exceptions[0]}"
        out.write(watch_frame(text, at=time.time(), interval=interval, tty=tty))
        out.flush()
        await trio.sleep_until(started + interval)
