"""Streamed command output for a client slower than the command: memory stays bounded."""

from __future__ import annotations

import asyncio
import json

from crogia.api import sse
from crogia.sandbox.base import OutputListener


async def test_a_slow_client_gets_a_marker_instead_of_unbounded_memory() -> None:
    chunk = "y\n" * 32768  # 64 KiB

    async def start(on_output: OutputListener) -> int:
        for _ in range(320):  # 20 MiB while the client reads nothing
            on_output(chunk)
        await asyncio.sleep(0)
        on_output("the end\n")
        return 0

    frames = []
    async for item in sse.output_events(start, lambda code: sse.frame("result", json.dumps(code))):
        frames.append(item)
        await asyncio.sleep(0)  # a client that reads only after the command has written everything
    texts = [json.loads(f.split("data: ", 1)[1])["data"] for f in frames if f.startswith("event: output")]
    kept = sum(len(t) for t in texts if not t.startswith("\n[..."))
    markers = [t for t in texts if t.startswith("\n[...")]
    assert kept <= sse.PENDING_MAX + len(chunk) and texts[-1] == "the end\n"  # held at once: the cap
    assert len(markers) == 1 and "dropped: the client read too slowly" in markers[0]
    assert int(markers[0].split()[1]) + kept == 320 * len(chunk) + len("the end\n")
    assert frames[-1] == sse.frame("result", "0")


async def test_a_client_that_keeps_up_gets_everything() -> None:
    async def start(on_output: OutputListener) -> int:
        for i in range(100):
            on_output(f"line {i}\n")
            await asyncio.sleep(0)
        return 0

    frames = [f async for f in sse.output_events(start, lambda code: sse.frame("result", json.dumps(code)))]
    text = "".join(json.loads(f.split("data: ", 1)[1])["data"] for f in frames[:-1])
    assert text == "".join(f"line {i}\n" for i in range(100))
