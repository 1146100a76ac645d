"""The ops page in an unmodified headless Chromium, plotting a cluster with a real call on it.

A relay and a node (relay mode) beside a real etcd (the fixture of ``test_metrics.py``), an
aiortc client talking through the relay, and the ops view (``ops/opsview.py``) reading that etcd
in a thread of its own, as ``parley opsview`` does. While the call talks, Chromium opens the page;
the test waits until the page says (``window.opsView.plotted``, also on each canvas as
``data-series``) that it plotted the node's sessions, the relay's packet rates both ways and the
sessions' quality, takes a screenshot over the DevTools protocol, keeps it as a PNG, decodes it,
and counts the coloured pixels inside each plot: a page that plots nothing fails, whatever it
claims.

Chromium runs on this host's loopback with every name mapped to nowhere but 127.0.0.1
(``--host-resolver-rules``) and its background traffic off: it reaches nothing but the view.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from ops.opsview import OpsView
from storage.etcd import open_etcd
from storage.keys import Keyspace
from tests.helpers import make_token
from tests.interop.chromium_scenario import (
    Cdp,
    devtools_port,
    page_websocket,
    start_chromium,
    stop_process_group,
)
from tests.interop.conftest import whip_delete, whip_post
from tests.interop.test_metrics import PREFIX, Cluster, cluster, utterance  # noqa: F401 - fixture
from tests.peers import AiortcCall, loopback_ice  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("loopback_ice")]

#: generous: the machine is shared; these bound waits, not what is judged
WITHIN = 60.0
PLOTS = ("plot-nodes", "plot-relays", "plot-loss", "plot-jitter", "plot-rtt")
QUALITY = {"plot-loss": "loss_pct", "plot-jitter": "jitter_ms", "plot-rtt": "rtt_ms"}


@pytest.fixture
def opsview(cluster: Cluster) -> Iterator[str]:  # noqa: F811 - the imported fixture
    """The ops view of ``cluster``'s etcd on a free loopback port; yields its URL."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with open_etcd(cluster.endpoint) as etcd, trio.open_nursery() as nursery:
            box["nursery"] = nursery
            view = OpsView(etcd, Keyspace(PREFIX), interval=0.5)
            await nursery.start(view.run, "127.0.0.1", 0)
            box["url"] = view.url
            ready.set()

    thread = threading.Thread(target=lambda: trio.run(main), daemon=True)
    thread.start()
    assert ready.wait(30), "the ops view did not start"
    try:
        yield str(box["url"])
    finally:
        trio.from_thread.run_sync(box["nursery"].cancel_scope.cancel, trio_token=box["token"])
        thread.join(30)


def api_view(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/view", timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def chromium_command(profile: Path, url: str) -> list[str]:
    binary = shutil.which("chromium")
    assert binary is not None
    return [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in a container; nothing but our own page is loaded
        "--disable-gpu",
        "--window-size=1100,1000",
        "--force-device-scale-factor=1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--password-store=basic",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        url,
    ]


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw pixels) of an 8-bit RGB(A) PNG (RFC 2083)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat = 8, b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    out = bytearray(height * stride)
    previous = bytearray(stride)
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[i - channels] if i >= channels else 0
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                best = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
                line[i] = (line[i] + best) & 0xFF
        out[row * stride : (row + 1) * stride] = line
        previous = line
    return width, height, channels, bytes(out)


def coloured_pixels(png: tuple[int, int, int, bytes], box: dict[str, float]) -> int:
    """Pixels inside ``box`` (CSS pixels, scale 1) in a colour, not white, grey or black: the
    plotted lines (the grid and the labels are grey)."""
    width, height, channels, pixels = png
    count = 0
    for y in range(max(0, int(box["top"])), min(height, int(box["bottom"]))):
        for x in range(max(0, int(box["left"])), min(width, int(box["right"]))):
            at = (y * width + x) * channels
            r, g, b = pixels[at], pixels[at + 1], pixels[at + 2]
            count += max(r, g, b) - min(r, g, b) > 80
    return count


def plotted_enough(plotted: dict[str, dict[str, int]], view: dict[str, Any]) -> bool:
    """The page plotted the node, the relay both ways, and each quality figure the API has."""
    nodes, relays = plotted.get("plot-nodes", {}), plotted.get("plot-relays", {})
    if nodes.get("n1", 0) < 2 or min(relays.get("r1 in", 0), relays.get("r1 out", 0)) < 2:
        return False
    latest = view["points"][-1] if view["points"] else {}
    return all(plotted.get(plot, {}).get("p50", 0) >= 2 for plot, field in QUALITY.items()
               if latest.get(field))  # fmt: skip


async def look_at_the_page(url: str, work: Path) -> dict[str, Any]:
    """Chromium on the ops page until it plotted the call; the screenshot and what it says."""
    profile, log = work / "chromium-profile", work / "chromium.log"
    chromium = await trio.to_thread.run_sync(start_chromium, chromium_command(profile, url), log)
    try:
        port = await devtools_port(profile, chromium)
        target = await page_websocket(port, url)
        async with trio_websocket.open_websocket_url(target, max_message_size=64 << 20) as ws:
            cdp = Cdp(ws)
            plotted: dict[str, dict[str, int]] = {}
            view: dict[str, Any] = {}
            with trio.move_on_after(WITHIN):
                while True:
                    plotted = await cdp.evaluate("window.opsView && window.opsView.plotted") or {}
                    view = await trio.to_thread.run_sync(api_view, url)
                    if plotted_enough(plotted, view):
                        break
                    await trio.sleep(0.25)
            assert plotted_enough(plotted, view), (plotted, view["points"][-1:])
            await trio.sleep(1.0)  # a redraw or two more, then the picture
            shot = await cdp.call("Page.captureScreenshot", format="png")
            boxes = await cdp.evaluate(
                "Object.fromEntries([...document.querySelectorAll('canvas')].map(c => "
                "[c.id, (({left, top, right, bottom}) => ({left, top, right, bottom}))"
                "(c.getBoundingClientRect())]))"
            )
            # What the canvases drew and what the page says it plotted, read in one go: a figure
            # that first came during the second above (an RTT, with the client's first RTCP
            # report) is then in both, not only in the drawing.
            both = await cdp.evaluate(
                "[Object.fromEntries([...document.querySelectorAll('canvas')].map(c => "
                "[c.id, JSON.parse(c.dataset.series || '{}')])), window.opsView.plotted]"
            )
            series, plotted = both
            state = await cdp.evaluate("document.getElementById('state').textContent")
            changes = await cdp.evaluate(
                "[...document.querySelectorAll('#changes tbody tr')].map(r => r.textContent)"
            )
    finally:
        stop_process_group(chromium)
    return {
        "png": base64.b64decode(shot["data"]),
        "boxes": boxes,
        "plotted": plotted,
        "series": series,
        "state": state,
        "changes": changes,
    }


def test_the_ops_page_plots_a_live_call(cluster: Cluster, opsview: str, tmp_path: Path) -> None:  # noqa: F811
    token = make_token(cluster.certs, subject="opsview")

    async def call() -> dict[str, Any]:
        peer = AiortcCall(utterance())
        try:
            offer = await peer.offer()
            whip = cluster.node.addresses["whip"]
            status, location, answer = await asyncio.to_thread(whip_post, whip, offer, token)
            assert status == 201
            await peer.answer(answer)
            seen = await asyncio.to_thread(trio.run, look_at_the_page, opsview, tmp_path)
            assert await asyncio.to_thread(whip_delete, whip, location, token) == 200
            return seen
        finally:
            await peer.close()

    seen = asyncio.run(call())
    screenshot = tmp_path / "opsview.png"
    screenshot.write_bytes(seen["png"])  # kept with the test's files, for a person to look at
    assert "samples" in seen["state"], seen["state"]
    # the call's session was claimed by n1: the ownership table says so, and why
    assert any(
        "claimed" in row and "n1" in row and "new session" in row for row in seen["changes"]
    ), seen["changes"]
    # what each canvas says it drew (later, after a redraw or two) agrees with the page's report
    for plot in PLOTS:
        drawn, reported = seen["series"][plot], seen["plotted"][plot]
        assert set(drawn) == set(reported), plot
        assert all(drawn[name] >= reported[name] for name in drawn), plot

    started = time.monotonic()
    png = decode_png(seen["png"])
    decoded_in = time.monotonic() - started
    assert png[0] >= 1000 and png[1] >= 700, png[:2]
    for plot in ("plot-nodes", "plot-relays", "plot-jitter"):
        box = dict(seen["boxes"][plot])
        box["top"] += 20  # below the legend (its names are in the series' colours)
        box["bottom"] -= 18  # above the time labels
        assert coloured_pixels(png, box) >= 40, (plot, box, screenshot, decoded_in)
    # and the picture is not coloured everywhere: outside the plots, a white page
    margin = {"left": 0.0, "top": 0.0, "right": 8.0, "bottom": float(png[1])}
    assert coloured_pixels(png, margin) == 0
