"""What a ``parley chaos`` run saw, and its verdicts: one per invariant, judged from outside.

The run (ops/chaos.py, ops/chaos_faults.py) records a :class:`Plan`, the :class:`Fault` s it
injected and an :class:`Observed` (etcd's owner history as a watch delivered it, the counters
every node and relay process last published, what the status polls saw); the clients record when
each echoed packet arrived; the nodes' media ledgers say what each processed per session and
epoch. :func:`judge` turns them into verdicts, :func:`render` into the table an operator reads.
Nothing here touches a process or the network.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any, Final, final

import attrs

from ops.bench.migration import _spread
from relay.settings import ClusterSettings
from sessions.node.ledger import Segment, check_ledgers
from storage.etcdtls import EtcdTLS

__all__ = ["Fault", "Observed", "Plan", "excused", "judge", "longest_in", "render", "silences"]

#: added to lease TTL + margin for the default bound, seconds
BOUND_SLACK: Final = 3.0
#: seconds after a fault's bound that still belong to its window
SETTLE: Final = 1.0
#: the figures that name what failed, printed under the table
DETAILS: Final = (
    "not_heard",
    "over_the_bound",
    "violations",
    "missing",
    "late",
    "backwards",
    "ungranted",
)
#: silences shorter than this (seconds) are the machine's jitter, not worth keeping
NOTABLE: Final = 0.1
#: a fault's window opens this long before it: on a busy machine the last echo before the
#: fault may have arrived a few frames early, so its silence seems to begin before it
LEAD: Final = 0.5


@final
@attrs.define
class Plan:
    """What a run tests and how (found from the data directory and the command line)."""

    data_dir: str
    up: int
    endpoint: str
    prefix: str
    sessions: int
    duration: float
    every: float
    seed: int
    bound: float
    ttl: int
    margin: float
    nodes: tuple[str, ...]
    relays: tuple[str, ...]
    members: int
    #: etcd's revision before the first session: the owner watch starts after it
    revision: int
    whip: dict[str, str]
    #: the kinds of fault to choose from (ops.chaos_faults.KINDS, or fewer)
    kinds: tuple[str, ...] = ()
    #: the access token the sessions are opened and ended with (never printed or written)
    token: str = attrs.field(default="", repr=False)
    #: the certificate directory whose operator certificate (parley-cli) etcd is read with,
    #: when its endpoints are https://
    certs: str = ""

    def etcd_tls(self) -> EtcdTLS | None:
        """What the run presents to etcd: the operator's certificate, or None (plain)."""
        return ClusterSettings(etcd=self.endpoint, certs=self.certs).etcd_tls("operator")


@final
@attrs.define
class Fault:
    """One fault and what followed it (times on this machine's monotonic clock)."""

    number: int
    kind: str
    target: str
    pid: int
    at: float
    cleared: float
    """when the fault ended: the signal, or the SIGCONT of a freeze"""
    wall: float
    bound: float
    """seconds from ``cleared`` within which every client must hear its echo again"""
    owned: dict[str, int] = attrs.field(factory=dict)
    """our sessions the target node owned at the fault, with their epochs"""
    back: float | None = None
    """seconds from ``cleared`` until the target was back (a new process registered, or a
    running member); None: not seen"""


@final
@attrs.define
class Observed:
    """What the controller recorded over a run."""

    #: (monotonic time, session, owner or None, epoch) as the owner watch delivered them
    history: list[tuple[float, str, str | None, int]] = attrs.field(factory=list)
    #: ("nodes" | "relays", id, pid) -> the counters that process last published
    counters: dict[tuple[str, str, int], dict[str, int]] = attrs.field(factory=dict)
    #: a session's epoch seen lower in a status poll than in an earlier one
    regressions: list[str] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    watch_error: str | None = None
    began: float = 0.0
    ended: float = 0.0

    def total(self, kind: str, name: str) -> int:
        """A counter summed over every process of ``kind`` that published it (a restarted
        process starts from zero, so each incarnation adds what it last published)."""
        return sum(c.get(name, 0) for (k, _, _), c in self.counters.items() if k == kind)


def silences(times: Sequence[float], begin: float, end: float) -> list[tuple[float, float]]:
    """The silences longer than :data:`NOTABLE` between echoes in [begin, end], with the edges
    (``begin`` to the first echo, the last to ``end``). ``times``: one client's echo arrivals,
    sorted."""
    inside = times[bisect.bisect_right(times, begin) : bisect.bisect_left(times, end)]
    points = [begin, *inside, end]
    return [(a, b) for a, b in itertools.pairwise(points) if b - a > NOTABLE]


def excused(silence: tuple[float, float], faults: Sequence[Fault], bound: float) -> bool:
    """A silence no longer than ``bound``, or one inside a fault's window that ended by that
    fault's own bound (a killed relay's is longer)."""
    a, b = silence
    return b - a <= bound or any(f.at - LEAD <= a and b <= f.cleared + f.bound for f in faults)


def longest_in(found: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """The longest of ``found`` that overlaps [lo, hi] (0 when none does)."""
    return max((b - a for a, b in found if a < hi and b > lo), default=0.0)


def _verdict(invariant: str, ok: bool | None, text: str, **figures: Any) -> dict[str, Any]:
    verdict = "UNCHECKED" if ok is None else "PASS" if ok else "FAIL"
    return {"invariant": invariant, "verdict": verdict, "text": text, "figures": figures}


def _ms(spread: dict[str, Any]) -> str:
    if not spread.get("n"):
        return "(none)"
    return f"p50 {spread['p50']:g} ms, p99 {spread['p99']:g} ms, max {spread['max']:g} ms"


def judge(
    plan: Plan,
    seen: Observed,
    arrivals: dict[str, list[float]],
    segments: list[Segment] | None,
) -> list[dict[str, Any]]:
    """One verdict per invariant, each with its figures. ``arrivals``: each session's echo
    arrival times, sorted; ``segments``: the ledgers' segments of those sessions (None: the
    nodes write no ledger)."""
    return [
        _lost_verdict(plan, seen, arrivals),
        _ledger_verdict(segments, arrivals.keys()),
        _audit_verdict(seen),
        _fenced_verdict(seen),
        _failover_verdict(seen),
        _history_verdict(seen, segments),
    ]


def _lost_verdict(plan: Plan, seen: Observed, arrivals: dict[str, list[float]]) -> dict[str, Any]:
    gaps, missed, unexcused, notable = [], [], {}, {}
    for session, times in arrivals.items():
        found = silences(times, seen.began, seen.ended)
        bad = [x for x in found if not excused(x, seen.faults, plan.bound)]
        for fault in seen.faults:
            lo, hi = fault.at - LEAD, fault.cleared + fault.bound + SETTLE
            gaps.append(1000 * longest_in(found, lo, hi))
            if any(a < hi and b > lo for a, b in bad):
                missed.append(f"{session} after fault {fault.number} ({fault.kind})")

        def rel(pairs: list[tuple[float, float]]) -> list[list[float]]:
            return [[round(a - seen.began, 2), round(b - a, 2)] for a, b in pairs]

        if bad:
            unexcused[session] = rel(bad)
        notable[session] = rel([x for x in found if x[1] - x[0] > 0.5][:50])
    # the nodes' adoption counters (sessions/node/failover.py), where they publish them
    published = any("unrestorable" in c for (k, _, _), c in seen.counters.items() if k == "nodes")
    adopted = seen.total("nodes", "adopted") if published else None
    unrestorable = seen.total("nodes", "unrestorable") if published else None
    text = (
        f"{len(arrivals)} sessions x {len(seen.faults)} faults: heard again within the bound "
        f"{len(gaps) - len(missed)}/{len(gaps)}; longest silence per fault and client "
        f"{_ms(_spread(gaps))}; {sum(map(len, unexcused.values()))} silences over the bound"
        + (f"; nodes adopted {adopted}, unrestorable {unrestorable}" if published else "")
    )
    return _verdict(
        "no session lost",
        not unexcused and bool(arrivals),
        text,
        gap_ms=_spread(gaps),
        not_heard=missed,
        over_the_bound=unexcused,
        silences_over_500ms=notable,
        adopted=adopted,
        unrestorable=unrestorable,
    )


def _ledger_verdict(segments: list[Segment] | None, sessions: Collection[str]) -> dict[str, Any]:
    name = "never two owners at once"
    if segments is None:
        return _verdict(name, None, "no media ledger: the nodes write none (node.ledger_dir)")
    violations = check_ledgers(segments)
    covered = {s.session for s in segments}
    missing = sorted(set(sessions) - covered)
    text = (
        f"{len(segments)} ledger segments of {len(covered)} sessions on "
        f"{len({s.node for s in segments})} nodes; {len(violations)} violations"
        + (f"; {len(missing)} sessions without a segment" if missing else "")
    )
    return _verdict(
        name,
        not violations and not missing,
        text,
        segments=len(segments),
        epochs_per_session=_spread([sum(s.session == x for s in segments) for x in covered]),
        violations=violations[:20],
        missing=missing,
    )


def _audit_verdict(seen: Observed) -> dict[str, Any]:
    name = "no SRTP/SRTCP index twice on the wire"
    names = ("srtp_audited", "srtcp_audited", "srtp_index_reused", "srtcp_index_reused")
    figures = {k: seen.total("relays", k) for k in (*names, "audit_unchecked")}
    if not any("srtp_audited" in c for (k, _, _), c in seen.counters.items() if k == "relays"):
        return _verdict(name, None, "the relays' audit is off (relay.audit, PARLEY_RELAY_AUDIT=1)")
    text = (
        f"relays audited {figures['srtp_audited']} SRTP and {figures['srtcp_audited']} SRTCP "
        f"packets; indexes seen twice {figures['srtp_index_reused']} SRTP, "
        f"{figures['srtcp_index_reused']} SRTCP; {figures['audit_unchecked']} too old to check"
    )
    ok = not figures["srtp_index_reused"] and not figures["srtcp_index_reused"]
    return _verdict(name, ok and figures["srtp_audited"] > 0, text, **figures)


def _fenced_verdict(seen: Observed) -> dict[str, Any]:
    name = "relays drop a stale owner's frames"
    if not any(k == "relays" for k, _, _ in seen.counters):
        return _verdict(name, None, "no relay published its counters")
    fenced = seen.total("relays", "fenced")
    routes = seen.total("relays", "routes_fenced")
    text = f"{fenced} frames fenced at the edge, {routes} by the routes (stale epoch or node)"
    return _verdict(name, True, text, fenced=fenced, routes_fenced=routes)


def _failover_verdict(seen: Observed) -> dict[str, Any]:
    late, took = [], []
    for fault in seen.faults:
        for session, epoch in fault.owned.items():
            taken = next(
                (t for t, s, n, e in seen.history if s == session and n and e > epoch),
                None,
            )
            if taken is not None:
                took.append(1000 * (taken - fault.cleared))
            if taken is None or taken - fault.cleared > fault.bound:
                late.append(f"{session} after fault {fault.number} ({fault.kind})")
        if fault.back is None:
            late.append(f"{fault.target} not back after fault {fault.number}")
    back = [1000 * f.back for f in seen.faults if f.back is not None]
    kinds = Counter(f.kind for f in seen.faults)
    text = (
        f"{len(seen.faults)} faults ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
        f"{len(took)} sessions owned again after their node went, {_ms(_spread(took))}; "
        f"targets back {_ms(_spread(back))}"
    )
    return _verdict(
        "every failover within its bound",
        not late and bool(seen.faults),
        text,
        owned_again_ms=_spread(took),
        back_ms=_spread(back),
        late=late,
        faults=dict(kinds),
    )


def _history_verdict(seen: Observed, segments: list[Segment] | None) -> dict[str, Any]:
    name = "etcd history consistent with claims"
    if seen.watch_error:
        return _verdict(name, None, f"the owner watch failed: {seen.watch_error}")
    granted: set[tuple[str, str, int]] = set()
    last: dict[str, int] = {}
    backwards = list(seen.regressions)
    for _, session, node, epoch in seen.history:
        if node is None:
            continue
        if epoch <= last.get(session, 0):
            backwards.append(f"{session}: {last[session]} -> {epoch}")
        last[session] = epoch
        granted.add((node, session, epoch))
    ungranted = [
        f"{s.node} {s.session} epoch {s.epoch}"
        for s in segments or []
        if s.first is not None and (s.node, s.session, s.epoch) not in granted
    ]
    writes = sum(1 for _, _, n, _ in seen.history if n)
    text = (
        f"{writes} owner writes watched; epochs went backwards {len(backwards)} times; "
        f"{len(ungranted)} ledger segments at an epoch etcd never gave that node"
    )
    ok = not backwards and not ungranted and bool(writes)
    return _verdict(name, ok, text, backwards=backwards, ungranted=ungranted, writes=writes)


def render(result: dict[str, Any]) -> str:
    """The verdict table and the faults, for people."""
    rows = result["verdicts"]
    width = max(len(r["invariant"]) for r in rows)
    lines = [f"{'invariant':<{width}}  verdict    figures"]
    lines += [f"{r['invariant']:<{width}}  {r['verdict']:<9}  {r['text']}" for r in rows]
    p = result["plan"]
    lines.append(
        f"\n{len(result['faults'])} faults in {p['duration']:g} s, at most one every "
        f"{p['every']:g} s (seed {p['seed']}); {p['sessions']} sessions; bound {p['bound']:g} s "
        f"(lease TTL {p['ttl']} s + margin {p['margin']:g} s + {BOUND_SLACK:g} s unless "
        f"--bound); {len(p['nodes'])} nodes, {len(p['relays'])} relays, {p['members']} etcd "
        "members"
    )
    for f in result["faults"]:
        back = "-" if f["back"] is None else f"{f['back']:.1f} s"
        lines.append(
            f"  {f['number']:>3} at {f['at']:6.1f} s  {f['kind']:<11} {f['target']:<9} "
            f"pid {f['pid']:<7} sessions {len(f['owned']):>3}  back {back:>7}  "
            f"bound {f['bound']:.1f} s"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    for row in rows:
        if row["verdict"] == "FAIL":
            for key in DETAILS:
                found = row["figures"].get(key)
                if found:
                    lines.append(f"{row['invariant']}: {key}: {json.dumps(found)[:600]}")
    return "\n".join(lines)
