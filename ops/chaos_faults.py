"""The faults of ``parley chaos``, and what it watches while they happen.

Everything the faults may touch is found from the data directory of one ``parley up``: the pid in
its ``up.lock``, the etcd processes whose ``--data-dir`` lies under it, and the nodes and relays
that register in that etcd with their pids. Before each signal the target is checked again in
/proc: it must descend from that ``parley up`` and be the process it claims to be (a node or
relay with that ``--id``, an etcd with its data there). Nothing else is ever signalled.

:class:`Controller` runs under Trio in a thread of its own while the clients talk (aiortc needs
asyncio): it keeps a watch on the owner keys from before the first session, polls
``parley status`` data twice a second (nodes' and relays' counters, each incarnation apart), and
injects the faults: at most one every ``every`` seconds, and only once the cluster is whole
again (every node, relay and etcd member back, every session owned by an active node, no move
under way), so that each fault's window is its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, final

import attrs
import trio

from ops.chaos_verdicts import SETTLE, Fault, Observed, Plan
from ops.status import gather_status
from storage.etcd import Etcd, EtcdError, EtcdTLS, open_etcd, read_member_status
from storage.keys import Keyspace
from storage.ownership import Owners

__all__ = ["KINDS", "ChaosError", "Controller", "Member", "etcd_members", "find_up"]

KINDS: Final = ("kill-node", "term-node", "kill-relay", "kill-etcd", "freeze-etcd")
#: a killed relay's clients come back at their next ICE consent check (aioice: every 4-6 s)
#: once it is back: its bound is at least its return plus this, seconds
CONSENT: Final = 7.0
#: how long the etcd leader stays frozen, seconds
FREEZE: Final = 3.0
#: seconds from the clients' start to the first fault
WARMUP: Final = 2.0
POLL: Final = 0.5
#: seconds the cluster may take to be whole again; after that, no more faults
WHOLE_WITHIN: Final = 60.0
#: nodes and relays publish their counters every 2 s: the last ones need this long to arrive
LAST_COUNTERS: Final = 2.5


class ChaosError(Exception):
    """The cluster cannot be tested (not found, not answering, not the echo agent)."""


# --- processes of DIR's parley up -------------------------------------------------------------


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] or None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid``'s parent, grandparent... (a live chain in /proc)."""
    for _ in range(64):
        parent = _parent(pid)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False


def flag(pid: int, name: str) -> str | None:
    """The value after ``name`` on ``pid``'s command line."""
    args = _cmdline(pid) or []
    return args[args.index(name) + 1] if name in args[:-1] else None


def find_up(data_dir: Path) -> int:
    """The pid of the ``parley up`` that holds ``data_dir/up.lock``."""
    path = data_dir / "up.lock"
    try:
        with open(path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = int(lock.read().strip() or 0)
            else:  # nobody holds it: the lock goes when the file closes
                raise ChaosError(f"no `parley up` runs with data directory {data_dir}")
    except (OSError, ValueError) as exc:
        raise ChaosError(f"no `parley up` found with data directory {data_dir} ({exc})") from None
    if _cmdline(pid) is None:
        raise ChaosError(f"{path} names pid {pid}, which is not running")
    return pid


@final
@attrs.frozen
class Member:
    """An etcd member of a ``parley up``."""

    #: its data directory's name, as ``parley up`` calls it (``etcd``; ``etcd-1``, ...)
    name: str
    pid: int
    #: ``host:port``, or ``https://host:port`` for a member with client-certificate TLS
    endpoint: str


def etcd_members(data_dir: Path, up: int) -> list[Member]:
    """The etcd processes descended from ``up`` whose data lies under ``data_dir``, by name."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (args := _cmdline(pid := int(entry.name))) is None:
            continue
        data, url = flag(pid, "--data-dir"), flag(pid, "--listen-client-urls")
        if data is None or url is None or not Path(args[0]).name.startswith("etcd"):
            continue
        if Path(data).resolve().is_relative_to(data_dir) and descends_from(pid, up):
            endpoint = url.split(",")[0].removeprefix("http://")  # https:// stays: TLS
            found.append(Member(Path(data).name, pid, endpoint))
    return sorted(found, key=lambda m: m.name)


def check_target(pid: int, up: int, role: str, ident: str | None = None) -> bool:
    """Whether ``pid`` descends from ``up`` and runs ``role`` (``node``, ``relay``, or
    ``--data-dir`` for etcd), as ``--id ident`` when given (a relay worker ``relay-1.w0``
    runs as ``--id relay-1``)."""
    args = _cmdline(pid)
    if args is None or role not in args or not descends_from(pid, up):
        return False
    return ident is None or flag(pid, "--id") == ident.split(".")[0]


def leader(members: Sequence[Member], tls: EtcdTLS | None = None) -> Member:
    """The member most members follow (a lone member leads itself); ``tls``: our client
    certificate, for members with client-certificate TLS."""
    votes: Counter[int] = Counter()
    ids: dict[int, Member] = {}
    for member in members:
        with contextlib.suppress(EtcdError):
            status = read_member_status(member.endpoint, timeout=1.0, tls=tls)
            ids[status.member_id] = member
            votes[status.leader_id] += 1
    for found, _ in votes.most_common():
        if found in ids:
            return ids[found]
    raise ChaosError("no etcd member names a leader")


# --- the controller ----------------------------------------------------------------------------


async def _sleep_until(deadline: float) -> None:
    """Sleep until ``deadline`` on ``time.monotonic()`` (the clients' clock; Trio's own clock
    runs at an offset)."""
    await trio.sleep(max(0.0, deadline - time.monotonic()))


@final
class Controller:
    """Watches ownership, polls status and injects faults, under Trio in its own thread."""

    def __init__(self, plan: Plan, sessions: set[str], stop: threading.Event) -> None:
        self.plan = plan
        #: the run's sessions; the watch records only these
        self.sessions = sessions
        #: set from another thread to end the run early (Ctrl-C)
        self.stop = stop
        self.seen = Observed()
        #: one generator for the kinds of fault and one for their targets, so that a seed
        #: repeats the sequence of kinds whatever the targets turn out to be
        self.kinds = random.Random(plan.seed)
        self.rng = random.Random(plan.seed + 1)
        self.keys = Keyspace(plan.prefix)
        self.data_dir = Path(plan.data_dir)
        #: each session's owner and epoch now, as the watch says
        self.owner: dict[str, tuple[str, int]] = {}
        self._polled: dict[str, int] = {}
        #: the latest ``parley status`` data
        self.status: dict[str, Any] | None = None
        #: the operator's certificate, for an etcd with client-certificate TLS
        self.tls = plan.etcd_tls()

    async def run(self) -> None:
        """Until the plan's duration has passed (or :attr:`stop` is set)."""
        async with (
            open_etcd(self.plan.endpoint, rpc_timeout=2.0, tls=self.tls) as etcd,
            trio.open_nursery() as n,
        ):
            await n.start(self._watch, etcd)
            n.start_soon(self._poll, etcd)
            n.start_soon(self._stop_when_asked, n.cancel_scope)
            await self._faults()
            n.cancel_scope.cancel()

    async def _stop_when_asked(self, scope: trio.CancelScope) -> None:
        await trio.to_thread.run_sync(self.stop.wait, abandon_on_cancel=True)
        self.seen.notes.append("stopped early")
        scope.cancel()

    async def _watch(self, etcd: Etcd, *, task_status: trio.TaskStatus[None]) -> None:
        history = self.seen.history
        try:
            start = self.plan.revision + 1
            async with Owners(etcd, self.keys).watch(start_revision=start) as changes:
                task_status.started()
                async for change in changes:
                    if change.session not in self.sessions:
                        continue
                    history.append((time.monotonic(), change.session, change.node, change.epoch))
                    if change.node is None:
                        self.owner.pop(change.session, None)
                    else:
                        self.owner[change.session] = (change.node, change.epoch)
        except EtcdError as exc:  # Compacted included: the history has a hole
            self.seen.watch_error = f"{type(exc).__name__}: {exc}"
            task_status.started()

    async def _poll(self, etcd: Etcd) -> None:
        while True:
            # etcd frozen or a member down: the next poll
            with trio.move_on_after(5.0), contextlib.suppress(EtcdError):
                self._polled_status(await gather_status(etcd, self.keys))
            await trio.sleep(POLL)

    def _polled_status(self, status: dict[str, Any]) -> None:
        self.status = status
        for kind in ("nodes", "relays"):
            for member in status[kind]:
                key = (kind, str(member.get("id")), int(member.get("pid") or 0))
                self.seen.counters[key] = dict(member.get("counters") or {})
        for s in status["sessions"]:
            session, epoch = s["id"], int(s["epoch"])
            if session in self.sessions:
                if epoch < self._polled.get(session, 0):
                    self.seen.regressions.append(f"{session}: {self._polled[session]} -> {epoch}")
                self._polled[session] = epoch

    # -- faults ---------------------------------------------------------------------------------

    def possible(self) -> list[str]:
        """The kinds of fault this cluster can take without losing what it needs."""
        plan = self.plan
        able = {
            "kill-node": len(plan.nodes) >= 2,  # someone must adopt
            "term-node": len(plan.nodes) >= 2,
            "kill-relay": len(plan.relays) >= 2,  # the clients need a relay meanwhile
            "kill-etcd": plan.members >= 3,  # a majority must remain
            "freeze-etcd": plan.members >= 1,
        }
        return [k for k in KINDS if able[k] and k in (plan.kinds or KINDS)]

    async def _faults(self) -> None:
        seen, plan = self.seen, self.plan
        seen.began = time.monotonic()
        end = seen.began + plan.duration
        kinds = self.possible()
        room = plan.bound + SETTLE + (CONSENT if "kill-relay" in kinds else 0.0)
        next_at = seen.began + WARMUP
        while kinds:
            await _sleep_until(next_at)
            last_start = end - room
            why = await self._wait_whole(until=min(last_start, time.monotonic() + WHOLE_WITHIN))
            if why:
                if time.monotonic() < last_start:
                    seen.notes.append(f"no more faults: the cluster was not whole again ({why})")
                break
            fault = await self._inject(self.kinds.choice(kinds), len(seen.faults) + 1)
            if fault is not None:
                seen.faults.append(fault)
                await self._follow(fault)
                next_at = max(fault.at + plan.every, time.monotonic())
        await _sleep_until(end)
        seen.ended = time.monotonic()  # the last fault's window may have run past the end
        await trio.sleep(LAST_COUNTERS)

    async def _wait_whole(self, until: float) -> str:
        """'' once the cluster is whole; else, at ``until``, what it still lacks."""
        why = "past the last moment for a fault"
        while time.monotonic() < until:
            why = await trio.to_thread.run_sync(self._not_whole)
            if not why:
                return ""
            await trio.sleep(POLL)
        return why

    def _not_whole(self) -> str:
        """What keeps the cluster from being whole ('' when it is); blocking."""
        plan, status = self.plan, self.status
        if status is None:
            return "no status yet"
        members = etcd_members(self.data_dir, plan.up)
        if len(members) < plan.members:
            return f"{len(members)} of {plan.members} etcd members run"
        try:
            if any(read_member_status(m.endpoint, tls=self.tls).leader_id == 0 for m in members):
                return "an etcd member knows no leader"
        except EtcdError as exc:
            return f"an etcd member does not answer ({exc})"
        nodes = {n["id"]: n for n in status["nodes"] if n["state"] == "active"}
        for node in plan.nodes:
            if node not in nodes or not check_target(int(nodes[node]["pid"]), plan.up, "node"):
                return f"{node} is not back"
        tunnels = {str(r.get("id")): set(r.get("tunnels") or ()) for r in status["relays"]}
        for relay in status["relays"]:
            if not check_target(int(relay.get("pid") or 0), plan.up, "relay"):
                return f"{relay.get('id')} is still registered by a process that is gone"
        for relay in plan.relays:
            if not set(plan.nodes) <= tunnels.get(relay, set()):
                return f"{relay} is not back with a tunnel from every node"
        owners = {s["id"]: s["owner"] for s in status["sessions"]}
        orphans = sorted(s for s in self.sessions if owners.get(s) not in nodes)
        if orphans:
            return f"{len(orphans)} sessions not owned by an active node ({orphans[0]}...)"
        return "moves under way" if status.get("moves") else ""

    async def _inject(self, kind: str, number: int) -> Fault | None:
        """Send the fault's signal (for a freeze: SIGSTOP, then SIGCONT after FREEZE)."""
        plan, status = self.plan, self.status
        assert status is not None
        if kind in ("kill-node", "term-node"):
            mine = Counter(node for node, _ in self.owner.values())
            pool = sorted(n for n in plan.nodes if mine[n]) or list(plan.nodes)
            target = self.rng.choice(pool)
            pid = next(int(n["pid"]) for n in status["nodes"] if n["id"] == target)
            role, signum = "node", signal.SIGKILL if kind == "kill-node" else signal.SIGTERM
        elif kind == "kill-relay":
            relay = self.rng.choice(sorted(status["relays"], key=lambda r: str(r.get("id"))))
            target, pid, role, signum = str(relay["id"]), int(relay["pid"]), "relay", signal.SIGKILL
        else:
            members = await trio.to_thread.run_sync(etcd_members, self.data_dir, plan.up)
            if kind == "kill-etcd":
                member = self.rng.choice(members)
            else:
                member = await trio.to_thread.run_sync(leader, members, self.tls)
            target, pid, role = member.name, member.pid, "--data-dir"
            signum = signal.SIGKILL if kind == "kill-etcd" else signal.SIGSTOP
        if not check_target(pid, plan.up, role, None if role == "--data-dir" else target):
            self.seen.notes.append(f"fault {number}: {target} (pid {pid}) is not ours; skipped")
            return None
        owned = {s: epoch for s, (node, epoch) in self.owner.items() if node == target}
        at, wall = time.monotonic(), time.time()
        os.kill(pid, signum)
        if signum == signal.SIGSTOP:
            try:
                await trio.sleep(FREEZE)
            finally:
                os.kill(pid, signal.SIGCONT)  # never leave etcd frozen, even when stopped early
        return Fault(number, kind, target, pid, at, time.monotonic(), wall, plan.bound, owned)

    async def _follow(self, fault: Fault) -> None:
        """Until the target is back and the fault's window has passed."""
        until = fault.cleared + WHOLE_WITHIN
        while fault.back is None and time.monotonic() < until:
            if await trio.to_thread.run_sync(self._is_back, fault):
                fault.back = time.monotonic() - fault.cleared
            else:
                await trio.sleep(POLL / 2)
        if fault.kind == "kill-relay":
            fault.bound = max(fault.bound, (fault.back or WHOLE_WITHIN) + CONSENT)
        await _sleep_until(fault.cleared + fault.bound + SETTLE)

    def _is_back(self, fault: Fault) -> bool:
        if fault.kind == "freeze-etcd":
            return True
        if fault.kind == "kill-etcd":
            members = etcd_members(self.data_dir, self.plan.up)
            return any(m.name == fault.target and m.pid != fault.pid for m in members)
        kind = "nodes" if fault.kind.endswith("node") else "relays"
        return any(
            m.get("id") == fault.target and int(m.get("pid") or 0) != fault.pid
            for m in (self.status or {}).get(kind, [])
        )
