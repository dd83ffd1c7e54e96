"""A hostile WebSocket client on a session whose task is streaming: garbage, binary, huge frames and
a flood of thousands of frames. The server (a separate process) stays up and answers health fast,
and the other clients of the session receive every event, in order, with nothing lost."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.support.scripted_openai import Reply, ScriptedOpenAI
from tests.support.subprocess_server import ServerProcess

pytestmark = pytest.mark.slow

WORDS = [f"w{i} " for i in range(500)]
FLOOD_ROUND = 1000
MAX_FLOOD = 20_000
MAX_ECHO = 64 * 1024
WS_MAX = 4 * 1024 * 1024


@pytest.fixture
async def model() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI(responder=lambda _: Reply(WORDS, delay=0.01)) as scripted:
        yield scripted


@pytest.fixture
async def server(data_dir: Path, model: ScriptedOpenAI) -> AsyncIterator[ServerProcess]:
    env = {
        "BASE_DIRECTORY": str(data_dir),
        "SANDBOX_BACKEND": "bubblewrap",
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": model.base_url,
        "MODEL_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
    }
    process = ServerProcess(data_dir, env)
    await process.start()
    try:
        yield process
    finally:
        if process.proc is not None and process.proc.returncode is None:
            await process.stop()


async def observe(url: str, until: str) -> list[dict[str, Any]]:
    """Every event a well-behaved client receives until `until`."""
    events: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "connection_established"
        while not events or events[-1]["type"] != until:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
    return events


async def watch_health(base_url: str, stop: asyncio.Event) -> list[float]:
    """Seconds each health check took, every 50 ms until `stop`."""
    took: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            answer = await client.get("/api/health")
            took.append(time.perf_counter() - started)
            assert answer.status_code == 200 and answer.json()["status"] == "healthy"
            await asyncio.sleep(0.05)
    return took


class Abuser:
    """One client that sends junk and keeps what comes back (replies and events apart)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.replies: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.streaming = asyncio.Event()
        """Set at the first `text_delta`: the task is talking."""
        self._arrived = asyncio.Event()
        self.flooded_while_streaming = 0
        """Flood frames answered before the other clients had seen the task end."""
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                message = json.loads(frame)
                (self.events if "seq" in message else self.replies).append(message)
                if message.get("type") == "text_delta":
                    self.streaming.set()
                self._arrived.set()
        except ConnectionClosed:
            pass

    async def replies_until(self, count: int) -> None:
        async with asyncio.timeout(60):
            while len(self.replies) < count:
                self._arrived.clear()
                await self._arrived.wait()


JUNK: list[tuple[str | bytes, str]] = [
    ("not json {", "echo"),
    ("[1, 2, 3]", "echo"),
    ('{"type": "ping"}', "pong"),
    (b"\x00\xff binary", "error"),
    ("", "echo"),
    ("\u202e\U0001f4a5 unicode", "echo"),
    ("x" * MAX_ECHO, "echo"),
    ("y" * (MAX_ECHO + 1), "error"),
    ("z" * (1024 * 1024), "error"),
    (bytes(1024 * 1024), "error"),
]
"""Frames and the type of the answer each gets."""


async def abuse(url: str, done: asyncio.Event) -> tuple[list[dict[str, Any]], Abuser, int | None]:
    """Junk, then floods of `FLOOD_ROUND` frames while the task streams, then one frame over the limit."""
    async with websockets.connect(url, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "connection_established"
        abuser = Abuser(ws)
        for frame, _ in JUNK:
            await ws.send(frame)
        await abuser.replies_until(len(JUNK))
        await asyncio.wait_for(abuser.streaming.wait(), 30)
        sent = 0
        while not done.is_set() and sent < MAX_FLOOD:
            for _ in range(FLOOD_ROUND):
                await ws.send(json.dumps({"n": sent}))
                sent += 1
            await abuser.replies_until(len(JUNK) + sent)
            if not done.is_set():
                abuser.flooded_while_streaming = sent
        await ws.send("q" * (WS_MAX + 1))  # over the server's frame limit: this socket goes
        await asyncio.wait_for(abuser.reader, 30)
        return abuser.replies, abuser, ws.close_code


@pytest.mark.serial  # the session's answers within 1 s: alone
async def test_hostile_client_does_not_disturb_the_session(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        sid = (await client.post("/api/sessions", json={"task": "abuse"})).json()["session_id"]
        try:
            url = f"{server.ws_url}/ws/{sid}?since=0"
            observing = asyncio.gather(*(observe(url, "task_completed") for _ in range(3)))
            done = asyncio.Event()
            observing.add_done_callback(lambda _: done.set())
            await asyncio.sleep(0.3)
            stop = asyncio.Event()
            health = asyncio.create_task(watch_health(server.base_url, stop))
            posted = await client.post(f"/api/sessions/{sid}/tasks", json={"task": "talk for a while"})
            task_id = posted.json()["task_id"]
            replies, abuser, close_code = await abuse(url, done)
            seen = await observing
            stop.set()
            took = await health
            # The server is still up: a new client gets the whole story from the store.
            replay = await observe(url, "task_completed")
            assert server.proc is not None and server.proc.returncode is None
        finally:
            await client.delete(f"/api/sessions/{sid}")

    # Every junk frame got an answer, in order; none broke the socket.
    assert [r["type"] for r in replies[: len(JUNK)]] == [kind for _, kind in JUNK]
    assert replies[3]["message"].startswith("Binary frames") and "limit" in replies[7]["message"]
    assert replies[6]["data"] == "x" * MAX_ECHO
    # The floods came back whole and in order, while the task streamed to everyone.
    flood = [json.loads(r["data"])["n"] for r in replies[len(JUNK) :]]
    assert flood == list(range(len(flood)))
    assert abuser.flooded_while_streaming >= 3 * FLOOD_ROUND
    # Over ws_max_size the socket is closed with 1009 (message too big); only that one.
    assert close_code == 1009
    # The others saw every event, in order, no gap, no duplicate, the same as the store holds.
    for events in [*seen, abuser.events]:
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for events in seen:
        assert events == replay
        assert "".join(e["content"] for e in events if e["type"] == "text_delta") == "".join(WORDS)
        assert events[-1]["task_id"] == task_id
    assert abuser.events == replay[: len(abuser.events)]
    print(f"ws abuse: {len(flood)} frames echoed; health max {max(took) * 1000:.0f} ms ({len(took)} checks)")
    assert len(took) > 20 and max(took) < 1.0, sorted(took)[-5:]
