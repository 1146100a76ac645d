"""``parley chaos``: faults against a running ``parley up`` while real calls talk, judged from
outside the nodes.

    parley chaos --data-dir DIR [--duration 60] [--sessions 6] [--every 8] [--seed N]
                 [--faults KINDS] [--json FILE] [--bound S]

It finds the cluster from ``DIR`` alone: the ``parley up`` that holds ``DIR/up.lock``, its etcd
members (processes whose ``--data-dir`` lies under ``DIR``, with their client URLs; ``--etcd``
overrides), and the nodes and relays registered there with their pids. It opens ``--sessions``
real WebRTC sessions (aiortc in this process, WHIP offers spread over the nodes, espeak-ng speech
in a loop) and needs the echo agent (``node.agent = "echo"``): the first session must hear its
echo at once, or it refuses.

Then, for ``--duration`` seconds, at most every ``--every`` seconds and only once the cluster is
whole again, one fault chosen at random (``--seed`` repeats a run's choices): SIGKILL or SIGTERM
of a node, SIGKILL of a relay (with two or more), SIGKILL of an etcd member (with three or more),
or SIGSTOP of the etcd leader for 3 s (``--faults`` narrows the choice, e.g.
``kill-node,freeze-etcd``). ``parley up`` restarts what dies. Only processes
descended from that ``parley up`` are signalled (ops/chaos_faults.py).

A fault's bound counts from its end (the signal; the SIGCONT of a freeze): ``--bound``, by
default the nodes' lease TTL + safety margin + 3 s. A killed relay's clients only come back at
their next ICE consent check, 4-6 s apart, so that bound is at least the relay's return + 7 s.
At the end it prints one verdict per invariant (ops/chaos_verdicts.py) and with ``--json`` writes
them, the faults and the figures to a file:

* no session lost: after every fault every client hears its echo again within the bound, no
  other silence is longer than the bound, and every client still hears it at the end;
* never two owners at once: the nodes' media ledgers (``DIR/ledger``, sessions/node/ledger.py);
* no SRTP or SRTCP index twice on the wire: the relays' index audit (``relay.audit``), summed
  over every relay process (a restarted relay begins a new audit);
* relays drop a stale owner's frames: their ``fenced`` counters, summed the same way;
* every failover within its bound: each session of a killed or stopped node owned again at a
  later epoch in etcd within the bound, and the target process back;
* etcd history consistent with claims: an etcd watch of the owner keys from before the first
  session, and the status polls, never show a session's epoch going back, and every (node,
  session, epoch) a ledger shows media for was given to that node in that history.

Exit status: 0 when every verdict is PASS, 1 otherwise (UNCHECKED is not PASS), 2 when the
cluster cannot be tested.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from ops.bench.migration import EchoCall
from ops.bench.sessions import http, loopback_ice, machine, speech_packets
from ops.chaos_faults import (
    KINDS,
    ChaosError,
    Controller,
    check_target,
    etcd_members,
    find_up,
    flag,
)
from ops.chaos_verdicts import BOUND_SLACK, Fault, Plan, judge, render
from ops.config import Config
from ops.status import gather_status
from ops.tokens import create_token
from relay.settings import ClusterSettings
from sessions.node.ledger import read_ledgers
from storage.etcd import EtcdError, EtcdTLS, open_etcd
from storage.keys import Keyspace
from storage.lease import default_margin

__all__ = ["ChaosError", "make_plan", "run_chaos"]

#: the first session's offer to its first echo, at most: the echo agent answers at once;
#: turn-echo only after a whole turn (seconds of speech, then 600 ms of silence)
AGENT_PROBE: Final = 2.5
#: sessions set up at the same time
SETUP_CONCURRENCY: Final = 4
NEEDS_ECHO: Final = (
    'parley chaos needs `parley up` with the echo agent (node.agent = "echo", '
    "PARLEY_NODE_AGENT=echo), whose echo starts at once"
)


def _read_status(endpoint: str, prefix: str, tls: EtcdTLS | None) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        async with open_etcd(endpoint, rpc_timeout=5.0, tls=tls) as etcd:
            return await gather_status(etcd, Keyspace(prefix))

    return trio.run(read)


def make_plan(args: argparse.Namespace, config: Config) -> Plan:
    """What to test, found from ``--data-dir``; raises :class:`ChaosError`."""
    if args.sessions < 1 or args.duration <= 0 or args.every <= 0:
        raise ChaosError("--sessions must be at least 1, --duration and --every above 0")
    kinds = tuple(k.strip() for k in (args.faults or "").split(",") if k.strip())
    if set(kinds) - set(KINDS):
        raise ChaosError(f"--faults takes {','.join(KINDS)}, not {args.faults}")
    data_dir = Path(args.data_dir).resolve()
    up = find_up(data_dir)
    members = etcd_members(data_dir, up)
    endpoint = args.etcd or ",".join(m.endpoint for m in members)
    if not endpoint:
        raise ChaosError(f"found no etcd member of `parley up` (pid {up}) under {data_dir}")
    # etcd, and the token key, with the certificates of that `parley up` unless told others
    certs_dir = config.cluster.certs or str(data_dir / "certs")
    certs = ClusterSettings(etcd=endpoint, certs=certs_dir)
    try:
        tls = certs.etcd_tls("operator")
        status = _read_status(endpoint, config.cluster.prefix, tls)
    except ValueError as exc:  # SettingsError: no operator certificate
        raise ChaosError(str(exc)) from None
    except EtcdError as exc:
        raise ChaosError(f"etcd at {endpoint} did not answer: {exc}") from None
    nodes = {
        str(n["id"]): n
        for n in status["nodes"]
        if n["state"] == "active" and check_target(int(n["pid"]), up, "node", str(n["id"]))
    }
    whip = {i: str(n["addresses"].get("whip", "")) for i, n in nodes.items()}
    if not nodes or not all(whip.values()):
        raise ChaosError(f"no active node of `parley up` (pid {up}) with a WHIP URL is registered")
    # parley up gives every node its lease TTL on the command line
    ttl_flag = flag(int(next(iter(nodes.values()))["pid"]), "--lease-ttl") or ""
    ttl = int(ttl_flag) if ttl_flag.isdigit() else config.node.lease_ttl
    margin = config.node.lease_margin or default_margin(ttl)
    # the sessions are a client's: they need an access token from the cluster's key
    try:
        token = create_token(certs, subject="parley-chaos", ttl=args.duration + 3600)
    except (OSError, ValueError) as exc:  # SettingsError is a ValueError
        raise ChaosError(f"cannot mint an access token for the sessions: {exc}") from None
    return Plan(
        data_dir=str(data_dir),
        up=up,
        endpoint=endpoint,
        prefix=config.cluster.prefix,
        sessions=args.sessions,
        duration=args.duration,
        every=args.every,
        seed=args.seed if args.seed is not None else random.randrange(1 << 31),
        bound=args.bound or round(ttl + margin + BOUND_SLACK, 3),
        ttl=ttl,
        margin=margin,
        nodes=tuple(sorted(nodes)),
        relays=tuple(sorted(str(r["id"]) for r in status["relays"])),
        members=len(members),
        revision=int(status["revision"]),
        whip=whip,
        kinds=kinds,
        token=token,
        certs=certs_dir,
    )


async def _connect(
    calls: list[EchoCall], urls: list[str], packets: list[bytes], n: int, token: str
) -> None:
    """``n`` sessions spread over ``urls``; the first alone, to check that it is echoed at once."""
    first = EchoCall(packets, token)
    calls.append(first)
    started = time.monotonic()
    try:
        await first.connect(urls[0])
    except TimeoutError:
        raise ChaosError(f"the first session ({urls[0]}) heard no echo; {NEEDS_ECHO}") from None
    except (RuntimeError, OSError) as exc:  # refused (an HTTP status) or unreachable
        raise ChaosError(f"the first session could not be set up at {urls[0]}: {exc}") from None
    took = first.first_rtp.result() - started
    if took > AGENT_PROBE:
        raise ChaosError(
            f"the first session's echo came {took:.1f} s after its offer; {NEEDS_ECHO}"
        )
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)
    failed: list[str] = []

    async def one(index: int) -> None:
        url = urls[index % len(urls)]
        async with limit:
            call = EchoCall(packets, token)
            calls.append(call)
            try:
                await call.connect(url)
            except (RuntimeError, TimeoutError, OSError) as exc:
                failed.append(f"{url}: {exc!r}")

    await asyncio.gather(*(one(i) for i in range(1, n)))
    if failed:
        raise ChaosError(
            f"{len(failed)} of {n} sessions could not be set up (first: {failed[0]}); "
            "this machine may not carry that many"
        )


async def _hang_up(calls: list[EchoCall], bases: list[str]) -> None:
    """End every session through whichever node answers (any node takes a session's DELETE)."""

    async def one(call: EchoCall) -> None:
        for base in bases if call.location else []:
            parts = urllib.parse.urlsplit(base)
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                url = f"{parts.scheme}://{parts.netloc}{call.location}"
                code, _, _ = await http("DELETE", url, token=call.token)
                if code < 500:
                    break
        call.location = None
        await call.close("")

    await asyncio.gather(*(one(c) for c in calls))


async def _run(plan: Plan) -> dict[str, Any]:
    loopback_ice()
    packets = await asyncio.to_thread(speech_packets)
    calls: list[EchoCall] = []
    stop = threading.Event()
    ctl = Controller(plan, set(), stop)
    try:
        urls = [plan.whip[n] for n in plan.nodes]
        await _connect(calls, urls, packets, plan.sessions, plan.token)
        ctl.sessions.update(c.session for c in calls)
        try:
            await asyncio.to_thread(trio.run, ctl.run)
        finally:
            stop.set()  # on Ctrl-C: the controller thaws what it froze and returns
    finally:
        nodes = (ctl.status or {}).get("nodes", [])
        bases = [str(n["addresses"]["whip"]) for n in nodes if "whip" in n["addresses"]]
        await _hang_up(calls, bases or list(plan.whip.values()))
    await asyncio.sleep(1.0)  # the nodes write the ended sessions' last ledger lines
    arrivals = {c.session: sorted(at for at, _, _ in c.arrivals) for c in calls}
    ledger = Path(plan.data_dir) / "ledger"
    segments = None
    if ledger.is_dir():
        found = await asyncio.to_thread(read_ledgers, ledger)
        segments = [s for s in found if s.session in arrivals]
    verdicts = judge(plan, ctl.seen, arrivals, segments)

    def relative(fault: Fault) -> dict[str, Any]:
        out = attrs.asdict(fault)
        began = ctl.seen.began
        out.update(at=round(fault.at - began, 3), cleared=round(fault.cleared - began, 3))
        return out

    return {
        "machine": machine(),
        "plan": attrs.asdict(plan, filter=lambda field, _: field.name != "token"),
        "faults": [relative(f) for f in ctl.seen.faults],
        "notes": ctl.seen.notes,
        "verdicts": verdicts,
        "passed": all(v["verdict"] == "PASS" for v in verdicts),
    }


def run_chaos(args: argparse.Namespace, config: Config) -> int:
    """``parley chaos``; the exit status (0: every verdict PASS, 1: not, 2: cannot test)."""
    try:
        plan = make_plan(args, config)
        if not Controller(plan, set(), threading.Event()).possible():
            raise ChaosError("none of those faults fits this cluster (see --help)")
        print(
            f"parley chaos: parley up pid {plan.up}, etcd {plan.endpoint}, nodes "
            f"{','.join(plan.nodes)}, relays {','.join(plan.relays) or '-'}; {plan.sessions} "
            f"sessions for {plan.duration:g} s, a fault at most every {plan.every:g} s, seed "
            f"{plan.seed}, bound {plan.bound:g} s",
            flush=True,
        )
        result = asyncio.run(_run(plan))
    except ChaosError as exc:
        print(f"parley chaos: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1
