"""First-hop RTT and client-to-agent round trip per region, steered versus unsteered.

    python -m ops.bench.regions [--clients 3] [--priority-clients 3] [--talk 10] [--json]

Runs the simulated globe (ops/bench/globe.py: three regions 10 ms across, 60, 100 and 150 ms
apart, emulated in user space by ops/wan.py; a relay and a node per region, etcd in one)
twice in the same run: with ``node.steering`` off (today: every relay offered, rotated per
session) and on. ``--clients`` aiortc clients per region call their own region's node and beep
for ``--talk`` seconds; they nominate as aioice does, the first pair whose check succeeds (the
fastest path, whatever the answer's order). ``--priority-clients`` more per region nominate the
best-ranked pair that answers, as browsers do: the answer's order decides where they go.

Figures per region and run:

* **first hop**: the round trip between the client and the relay of the candidate pair it uses
  (aioice's nominated pair), from the emulator's matrix; p50/p99 over the region's clients;
* **local**: the clients whose pair is their own region's relay;
* **echo**: client → relay → tunnel → node's echo agent → back, timed at the client from each
  burst it sent to the first loud echoed packet's kernel arrival (no client jitter buffer);
  p50/p99 over every burst of the region's clients.

Until ``node.steering`` exists (issue #19) the nodes are not told, and the steered run says
"steering not available": its figures are today's a second time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ops.bench.common import percentile
from ops.bench.globe import REGIONS, RTTS, GlobeParams, run_globe, scratch

__all__ = ["main", "measure", "render", "summarize"]


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per region name and nomination (``eu/first``, ``eu/priority``...): first-hop and echo
    p50/p99 (ms), clients and local clients."""
    out: dict[str, dict[str, Any]] = {}
    kinds = sorted({c["nomination"] for c in result["clients"]})
    for (region, name), kind in itertools.product(REGIONS.items(), kinds):
        clients = [
            c for c in result["clients"] if c["region"] == region and c["nomination"] == kind
        ]
        hops = [float(c["first_hop_rtt_ms"]) for c in clients if c["first_hop_rtt_ms"]]
        echo = [float(t) for c in clients for t in c["echo_rtt_ms"]]
        out[f"{name}/{kind}"] = {
            "clients": len(clients),
            "local": sum(bool(c["local"]) for c in clients),
            "first_hop_p50_ms": _ms(percentile(hops, 50)),
            "first_hop_p99_ms": _ms(percentile(hops, 99)),
            "echo_p50_ms": _ms(percentile(echo, 50)),
            "echo_p99_ms": _ms(percentile(echo, 99)),
            "echo_n": len(echo),
        }
    return out


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


def measure(
    clients: int, talk: float, priority_clients: int = 0, work: Path | None = None
) -> dict[str, Any]:
    """Both runs, unsteered first; the raw outcomes and their summaries."""
    runs: dict[str, Any] = {}
    for steering in (False, True):
        params = GlobeParams(
            clients_per_region=clients,
            talk=talk,
            steering=steering,
            priority_clients=priority_clients,
        )
        label = "steered" if steering else "unsteered"
        if work is not None:
            outcome = run_globe(work / label, params)
        else:
            with scratch() as scratch_dir:
                outcome = run_globe(scratch_dir, params)
        if outcome["errors"]:
            raise RuntimeError(f"{label}: " + "\n".join(outcome["errors"]))
        runs[label] = {
            "regions": summarize(outcome),
            "wan_lateness": outcome["wan_lateness"],
            "clients": outcome["clients"],
        }
    return {
        "machine": {"python": platform.python_version(), "kernel": platform.release()},
        "rtts_ms": {f"{REGIONS[a]}-{REGIONS[b]}": 1000 * rtt for (a, b), rtt in RTTS.items()},
        "clients_per_region": clients,
        "priority_clients_per_region": priority_clients,
        "talk_s": talk,
        "runs": runs,
    }


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"regions bench: python {m['python']}, linux {m['kernel']}; "
        f"aiortc clients per region: {result['clients_per_region']} nominating the first pair "
        f"to answer, {result['priority_clients_per_region']} by priority; "
        f"{result['talk_s']:.0f} s each",
        "RTT between regions (ms): "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["rtts_ms"].items()),
    ]
    header = (
        f"{'run':<11}{'region/nomination':<19}{'local':>7}{'1st hop p50':>13}{'p99':>8}"
        f"{'echo p50':>10}{'p99':>8}{'n':>6}"
    )
    lines.append(header)
    for label, run in result["runs"].items():
        for name, r in run["regions"].items():
            lines.append(
                f"{label:<11}{name:<19}{r['local']:>4}/{r['clients']:<2}"
                f"{_fmt(r['first_hop_p50_ms']):>13}{_fmt(r['first_hop_p99_ms']):>8}"
                f"{_fmt(r['echo_p50_ms']):>10}{_fmt(r['echo_p99_ms']):>8}{r['echo_n']:>6}"
            )
    for label, run in result["runs"].items():
        late = run["wan_lateness"]
        lines.append(
            f"{label}: WAN emulator lateness p50 {late['p50_ms']} ms, p99 {late['p99_ms']} ms, "
            f"max {late['max_ms']} ms over {late['n']} datagrams"
        )
    lines.append(
        "local: clients whose nominated pair is their own region's relay; 1st hop: client-relay "
        "RTT of that pair (emulator matrix); echo: burst sent -> its echo's first loud packet "
        "at the client's socket; first: aioice's nomination (fastest check wins), priority: the "
        "best-ranked pair that answers, as browsers do"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench.regions", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--clients", type=int, default=3, help="aiortc clients per region")
    parser.add_argument(
        "--priority-clients",
        type=int,
        default=3,
        help="more clients per region that nominate by priority, as browsers do",
    )
    parser.add_argument("--talk", type=float, default=10.0, help="seconds each client talks")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.talk < 1 or args.priority_clients < 0:
        parser.error("--clients and --talk are at least 1, --priority-clients at least 0")
    result = measure(args.clients, args.talk, args.priority_clients)
    if args.json:
        json.dump({k: v for k, v in result.items()}, sys.stdout, default=str)
        print()
    else:
        print(render(result))
    return result


if __name__ == "__main__":
    main()
