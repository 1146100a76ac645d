"""The ops port (relay/opsport.py), the histogram value under it (actors/histogram.py), and what
a relay exposes there (relay/metrics.py): names, types, HELP, the text format, bounded HTTP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from actors.histogram import Histogram
from actors.lag import LoopLag
from relay.addresses import parse_listen
from relay.daemon import Relay
from relay.metrics import RELAY_DROPS, RelayCollector
from relay.opsport import MAX_CONNECTIONS, OpsPort, new_registry
from tests.metrics_support import exposition, families, relay_credentials

# -- the histogram value ------------------------------------------------------------------------


def test_histogram_counts_each_value_at_or_below_its_bound() -> None:
    hist = Histogram((0.1, 0.5, 1.0))
    for value in (0.05, 0.1, 0.3, 0.5, 2.0):
        hist.observe(value)
    assert hist.cumulative() == [(0.1, 2), (0.5, 4), (1.0, 4), (math.inf, 5)]
    assert hist.count == 5 and hist.sum == pytest.approx(2.95)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf)])
def test_histogram_refuses_bounds_that_are_not_finite_and_increasing(
    bounds: tuple[float, ...],
) -> None:
    with pytest.raises(ValueError, match="histogram"):
        Histogram(bounds)


async def test_the_loop_monitor_observes_every_wakeup_and_a_stall_in_its_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lag = LoopLag(interval=0.02, stall=0.1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        await trio.sleep(1.0)
        on_time = lag.lateness.count
        assert on_time >= 45 and lag.lateness.cumulative()[0][1] == on_time  # all ≤ 1 ms
        autojump_clock.jump(0.3)  # one step holds the loop for 0.3 s
        await trio.sleep(0.1)
        buckets = dict(lag.lateness.cumulative())
        total = lag.lateness.count
        assert total > on_time + 1  # and on time again after it
        assert buckets[0.25] == total - 1 and buckets[0.5] == total
        assert lag.stalls == 1
        nursery.cancel_scope.cancel()


# -- the listen setting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9", ("::1", 9)),
    ],
)
def test_listen_addresses_parse(text: str, address: tuple[str, int]) -> None:
    assert parse_listen(text, "x.ops_listen") == address


@pytest.mark.parametrize("text", ["localhost:9100", "127.0.0.1", "127.0.0.1:70000", ":9100"])
def test_bad_listen_addresses_name_their_setting(text: str) -> None:
    with pytest.raises(ValueError, match=r"x\.ops_listen"):
        parse_listen(text, "x.ops_listen")


# -- the HTTP endpoint --------------------------------------------------------------------------


class OneCounter:
    def __init__(self) -> None:
        self.value = 0.0

    def collect(self) -> list[Metric]:
        return [
            CounterMetricFamily("parley_test_things_total", "Things counted.", value=self.value)
        ]


async def request(address: tuple[str, int], raw: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(raw)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: ops\r\n\r\n".encode()


async def test_metrics_are_served_in_the_text_format_from_a_private_registry() -> None:
    things = OneCounter()
    healthy = [True]
    port = OpsPort(new_registry(things), healthy=lambda: healthy[0])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(port.run)
        assert port.url == f"http://127.0.0.1:{address[1]}/metrics"
        things.value = 3
        head, _, body = (await request(address, get("/metrics"))).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-type: {CONTENT_TYPE_LATEST}".encode() in head.lower()
        parsed = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert parsed["parley_test_things"].type == "counter"
        assert parsed["parley_test_things"].documentation == "Things counted."
        assert parsed["parley_test_things"].samples[0].value == 3
        assert "process_cpu_seconds" in parsed and "python_info" in parsed
        # ... and read again at each scrape: the collector, not a copy
        things.value = 5
        body = (await request(address, get("/metrics?x=1"))).partition(b"\r\n\r\n")[2]
        assert b"parley_test_things_total 5.0" in body
        assert port.scrapes == 2

        assert (await request(address, get("/healthz"))).endswith(b"\r\n\r\nok\n")
        healthy[0] = False
        assert (await request(address, get("/healthz"))).startswith(b"HTTP/1.1 503 ")
        assert (await request(address, get("/nope"))).startswith(b"HTTP/1.1 404 ")
        refused = await request(address, get("/metrics", "POST"))
        assert refused.startswith(b"HTTP/1.1 405 ") and b"allow: get" in refused.lower()
        assert (await request(address, b"NONSENSE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        head = await request(address, get("/metrics", "HEAD"))
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        nursery.cancel_scope.cancel()


class Broken:
    def collect(self) -> list[Metric]:
        raise RuntimeError("a bug in a collector")


async def test_a_failing_collector_costs_a_scrape_not_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = OpsPort(new_registry(Broken()))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(port.run)
        assert (await request(address, get("/metrics"))).startswith(b"HTTP/1.1 500 ")
        assert (await request(address, get("/healthz"))).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()
    assert "metrics collection failed" in caplog.text


async def test_a_silent_scraper_is_dropped_and_connections_are_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    port = OpsPort(new_registry(OneCounter()))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(port.run)
        silent = [await trio.open_tcp_stream(*address) for _ in range(MAX_CONNECTIONS + 1)]
        # One over the bound is closed at once, without an answer.
        assert await silent[-1].receive_some(100) == b""
        # The others get nothing, and are closed when their time is up.
        with trio.fail_after(10):
            assert await silent[0].receive_some(100) == b""
        for stream in silent:
            await stream.aclose()
        assert (await request(address, get("/healthz"))).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


# -- what a relay exposes -----------------------------------------------------------------------


def make_relay(tmp_path: Path) -> Relay:
    credentials, secrets = relay_credentials(tmp_path, "r1")
    return Relay(
        "r1",
        etcd_endpoint="127.0.0.1:1",
        prefix="/parley-test",
        credentials=credentials,
        secrets=secrets,
        listen=[("127.0.0.1", 0)],
    )


def test_a_relay_exposes_its_edge_counters_under_conventional_names(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    relay.edge.counters.update(client_in=7, client_out=5, fenced=2, new_clients=1)
    found = families(exposition(new_registry(RelayCollector(relay))))
    parley = {name: f for name, f in found.items() if name.startswith("parley_")}
    for name, family in parley.items():
        assert family.documentation, name
        if family.type == "counter":
            # the parser gives a counter's family name without _total; its samples have it
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        assert not any({"session", "client"} & set(s.labels) for s in family.samples), name
    assert parley["parley_relay_packets"].type == "counter"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in parley.values()
        for s in f.samples
    }
    assert samples["parley_relay_packets_total", (("direction", "in"),)] == 7
    assert samples["parley_relay_packets_total", (("direction", "out"),)] == 5
    reasons = {s.labels["reason"] for s in parley["parley_relay_drops"].samples}
    assert reasons == set(RELAY_DROPS)
    assert samples["parley_relay_drops_total", (("reason", "fenced"),)] == 2
    assert samples["parley_relay_client_events_total", (("event", "admitted"),)] == 1
    # not running: no lease, no tunnels, but every family is there
    assert samples["parley_lease_seconds_left", ()] == 0
    assert samples["parley_tunnels_open", ()] == 0
    assert parley["parley_event_loop_lag_seconds"].type == "histogram"
    assert parley["parley_lease_seconds_left"].type == "gauge"
