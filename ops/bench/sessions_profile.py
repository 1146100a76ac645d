"""What bounds a node, for ops/bench/sessions.py: the codec floor (libopus decoding and
re-encoding the clients' speech, what a session would cost if Python cost nothing) and py-spy
profiles of the node under load, reduced to their top entries."""

from __future__ import annotations

import asyncio
import collections
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Final

from ops.bench.sessions_report import FloorFigures, ProfileTop

__all__ = ["codec_floor", "configured_codec", "parse_raw", "profile_node"]

#: seconds of audio each floor run decodes and encodes; the best of FLOOR_RUNS is kept (the
#: machine may be shared: the least CPU is the codec's own)
FLOOR_SECONDS: Final = 10.0
FLOOR_RUNS: Final = 3
FRAMES_PER_SECOND: Final = 50
#: py-spy's sampling rate (per second)
PROFILE_RATE: Final = 200
_LINE: Final = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def configured_codec(complexity: int | None = None) -> tuple[int, int]:
    """(complexity, bitrate) of the encoder a node's session makes: ``node.opus_complexity``
    (``complexity``, or the setting's default) and ``node.opus_bitrate``'s default."""
    from sessions.node.settings import NodeSettings

    node = NodeSettings()
    return node.opus_complexity if complexity is None else complexity, node.opus_bitrate


def codec_floor(packets: list[bytes], complexity: int, bitrate: int) -> FloorFigures:
    """Decode each of the clients' Opus packets and encode the PCM again, as an echo session
    does every 20 ms, at ``complexity``; CPU time of this thread (libopus runs in it)."""
    from sessions.audio.opus import OpusDecoder, OpusEncoder

    frames = max(len(packets), round(FLOOR_SECONDS * FRAMES_PER_SECOND))
    best = math.inf
    for _ in range(FLOOR_RUNS):
        decoder = OpusDecoder()
        encoder = OpusEncoder(complexity=complexity, bitrate=bitrate)
        started = time.thread_time()
        for index in range(frames):
            encoder.encode(decoder.decode(packets[index % len(packets)]))
        best = min(best, time.thread_time() - started)
    return FloorFigures(
        complexity=complexity,
        bitrate=bitrate,
        frames=frames,
        cpu_per_session=best / (frames / FRAMES_PER_SECOND),
    )


def _short(path: str) -> str:
    """A frame's file without the checkout's or the virtualenv's prefix."""
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    root = str(Path(__file__).resolve().parents[2]) + "/"
    return path.removeprefix(root)


def _frame(text: str) -> str:
    match = _LINE.match(text)
    return f"{match[1]} ({_short(match[2])})" if match else text


def parse_raw(text: str, kind: str, path: str, *, main_only: bool = False) -> ProfileTop:
    """py-spy's ``--format raw`` (one ``outer;...;inner COUNT`` line per distinct stack):
    samples per function (lines merged) as the innermost frame, and anywhere on the stack.

    ``main_only``: leave out the stacks of threads started with :mod:`threading` (the node's
    Trio loop is its main thread; its worker threads mostly wait in C, which a profile without
    ``--gil`` counts as running)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = other = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if main_only and frames[0].startswith("Thread._bootstrap "):
            other += samples
            continue
        total += samples
        own[frames[-1]] += samples
        for name in set(frames):
            anywhere[name] += samples
    return ProfileTop(
        kind=kind,
        path=path,
        samples=total,
        other_threads=other,
        self_time=own.most_common(40),
        inclusive=anywhere.most_common(40),
    )


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


async def profile_node(pid: int, directory: Path, seconds: float) -> list[ProfileTop]:
    """Two py-spy profiles of ``pid``, one after the other, ``seconds`` each: one of the thread
    holding the GIL (``--gil``: the Python work), one of every running thread (libopus runs
    in ctypes calls that release the GIL, so only this one shows the codec)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (it is in the test extra)")
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    tops = []
    for kind in ("gil", "all"):
        out = directory / f"node-{kind}.txt"
        argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
        argv += ["--rate", str(PROFILE_RATE), "--format", "raw", "--output", str(out)]
        if kind == "gil":
            argv.append("--gil")
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await process.communicate()
        if process.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed ({process.returncode}): {err.decode()[-500:]}")
        text = await asyncio.to_thread(out.read_text, errors="replace")
        tops.append(parse_raw(text, kind, str(out), main_only=kind == "all"))
    return tops
