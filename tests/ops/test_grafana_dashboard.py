"""The Grafana dashboard (ops/deploy/grafana/parley-dashboard.json) queries only what relays and
nodes expose, uses each metric as its type allows, and has the panels an operator looks for."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.metrics_support import node_exposition, relay_exposition

DASHBOARD = Path(__file__).resolve().parents[2] / "ops/deploy/grafana/parley-dashboard.json"
_NAME = re.compile(r"\bparley_[a-z0-9_]+\b")
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exposed(text: str) -> dict[str, str]:
    """Every series name an exposition can carry, with its family's type (from ``# TYPE``, so a
    labelled family without samples yet counts too)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for suffix in _SUFFIXES.get(kind, ("",)):
                out[name + suffix] = kind
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_metric_the_dashboard_queries_is_exposed(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    series = exposed(node_exposition()) | exposed(relay_exposition(tmp_path))
    queried = {name for _, expr in expressions(dashboard) for name in _NAME.findall(expr)}
    assert queried, "the dashboard queries nothing"
    assert queried <= set(series), sorted(queried - set(series))
    # every metric in a rate() or increase() is a counter (or a histogram's series)
    for title, expr in expressions(dashboard):
        for inner in re.findall(r"(?:rate|increase)\((parley_[a-z0-9_]+)", expr):
            assert series[inner] in ("counter", "histogram"), (title, inner)
            assert series[inner] == "counter" or inner.endswith("_bucket"), (title, inner)
        for inner in re.findall(r"histogram_quantile\(.*?\b(parley_\w+)", expr):
            assert inner.endswith("_bucket") and series[inner] == "histogram", (title, inner)


def test_it_has_the_panels_an_operator_looks_for(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in (
        "sessions per node",
        "relay packet rates",
        "packet loss",
        "jitter",
        "round-trip",
        "setup latency",
        "moves and adoptions",
        "lease time left",
        "event-loop lag",
    ):
        assert wanted in titles, wanted
    uses = " ".join(expr for _, expr in expressions(dashboard))
    for metric in (
        "parley_sessions",
        "parley_relay_packets_total",
        "parley_media_loss_ratio_bucket",
        "parley_media_jitter_seconds_bucket",
        "parley_media_rtt_seconds_bucket",
        "parley_session_setup_seconds_bucket",
        "parley_moves_total",
        "parley_adoptions_total",
        "parley_lease_seconds_left",
        "parley_event_loop_lag_seconds_bucket",
    ):
        assert metric in uses, metric


def test_it_is_importable_as_it_stands(dashboard: dict[str, Any]) -> None:
    """Grafana takes it as a file (provisioning) or through Import: unique panel ids, every query
    on the dashboard's Prometheus variable, every panel on the grid."""
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["refId"] for t in panel["targets"]), panel["title"]
