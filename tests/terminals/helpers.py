"""A terminal client for tests: a real WebSocket on `/ws/shells/{id}`, reading until output shows up."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from tests.support.server import RunningServer

WAIT = 30.0


class TermClient:
    """One socket on a terminal; `text` is everything it has shown so far (output decoded)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.text = ""
        self.raw = b""
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls, server: RunningServer, shell_id: str, query: str = "", *, max_queue: int = 16
    ) -> TermClient:
        url = f"{server.ws_url}/ws/shells/{shell_id}{query}"
        ws = await websockets.connect(url, max_size=None, max_queue=max_queue)
        client = cls(ws)
        hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert hello["type"] == "shell_connected", hello
        client.events.append(hello)
        return client

    async def type(self, data: str) -> None:
        await self.ws.send(json.dumps({"type": "shell_input", "data": data}))

    async def resize(self, rows: object, cols: object) -> None:
        await self.ws.send(json.dumps({"type": "shell_resize", "rows": rows, "cols": cols}))

    async def next(self) -> dict[str, Any]:
        """The next non-output message (output is added to `text` / `raw` meanwhile)."""
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), WAIT)
            if isinstance(frame, bytes):
                self.raw += frame
                continue
            msg: dict[str, Any] = json.loads(frame)
            if msg["type"] == "shell_output":
                self.text += msg["data"]
                continue
            self.events.append(msg)
            return msg

    async def expect(self, pattern: str, *, raw: bool = False) -> re.Match[str]:
        """Read until `pattern` (a regex) matches the output; returns the match."""
        try:
            return await asyncio.wait_for(self._expect(pattern, raw), WAIT)
        except TimeoutError:
            raise AssertionError(f"{pattern!r} not seen in {self.text[-2000:]!r}") from None

    async def _expect(self, pattern: str, raw: bool) -> re.Match[str]:
        while True:
            found = re.search(pattern, self.raw.decode("utf-8", "replace") if raw else self.text)
            if found:
                return found
            frame = await self.ws.recv()
            if isinstance(frame, bytes):
                self.raw += frame
                continue
            msg = json.loads(frame)
            if msg["type"] == "shell_output":
                self.text += msg["data"]
            else:
                self.events.append(msg)

    async def run(self, cmd: str, token: str) -> str:
        """Type `cmd; echo <token>-$((6*7))` and return the output up to the marker."""
        start = len(self.text)
        await self.type(f"{cmd}; echo {token}-$((6*7))\r")
        await self.expect(rf"{token}-42")
        return self.text[start:]

    async def closed(self) -> tuple[int, str]:
        """Read until the server closes the socket; its close code and reason."""
        try:
            while True:
                await self.next()
        except websockets.ConnectionClosed as exc:
            return _code(exc)

    async def close(self) -> None:
        await self.ws.close()


async def new_shell(server: RunningServer, sid: str, **body: object) -> dict[str, Any]:
    response = await server.client.post(f"/api/sessions/{sid}/shells", json=body or None)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def run_in_sandbox(server: RunningServer, sid: str, cmd: str) -> str:
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    output: str = response.json()["output"]
    return output


def _code(exc: websockets.ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is None:
        raise AssertionError(f"the server sent no close frame: {exc}")
    return exc.rcvd.code, exc.rcvd.reason


async def refused(server: RunningServer, shell_id: str, query: str = "") -> tuple[int, str]:
    """Connect to a terminal the server must refuse: its close code and reason."""
    async with websockets.connect(f"{server.ws_url}/ws/shells/{shell_id}{query}") as ws:
        try:
            await asyncio.wait_for(ws.recv(), WAIT)
        except websockets.ConnectionClosed as exc:
            return _code(exc)
    raise AssertionError("the socket stayed open")
