"""The front door's ASGI `http.response.zerocopysend` (`crogia.frontdoor.zero_copy`).

A real uvicorn server with the front door's protocol on a free port, in this test's loop, serving a
small ASGI app that sends parts of its bodies from pipes and files; real clients read them over TCP.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from crogia.frontdoor.limits import FrontDoorConfig, FrontDoorLimits
from crogia.frontdoor.serve import uvicorn_options
from crogia.frontdoor.zero_copy import ZERO_COPY
from tests.conftest import make_settings

LIMITS = FrontDoorLimits(
    max_connections=64, headroom=8, header_timeout=10, body_timeout=10, body_min_rate=1,
    max_header_bytes=16384, max_headers=100, shutdown_timeout=10,
)  # fmt: skip
MIB = 1 << 20

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class App:
    """Routes by path; records what each request's app saw and how it ended."""

    data: bytes = field(default_factory=lambda: os.urandom(16 * MIB))
    seen: list[dict[str, Any]] = field(default_factory=list)
    ended: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.seen.append(scope.get("extensions", {}))
        try:
            await getattr(self, scope["path"].strip("/"))(send)
        except Exception as exc:
            await self.ended.put(f"{type(exc).__name__}: {exc}")
            raise
        await self.ended.put("done")

    async def _start(self, send: Send, length: int | None) -> None:
        headers = [(b"content-length", str(length).encode())] if length is not None else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _piped(self, send: Send, data: bytes, *, more_body: bool = True) -> None:
        """`data` through pipes, a MiB each (a send to a client that left leaves a pipe full)."""
        for at in range(0, len(data), MIB):
            piece = data[at : at + MIB]
            read_end, write_end = os.pipe()
            try:
                _fill(write_end, piece)
                with os.fdopen(os.dup(read_end), "rb", buffering=0) as file:
                    last = at + MIB >= len(data)
                    await send({"type": ZERO_COPY, "file": file, "count": len(piece),
                                "more_body": more_body or not last})  # fmt: skip
            finally:
                os.close(read_end)
                os.close(write_end)

    async def mixed(self, send: Send) -> None:
        """Bytes, then a pipe's, then a file's at an offset, then bytes."""
        with tempfile.TemporaryFile() as file:
            file.write(b"-" * 1000 + self.data[: 3 * MIB])
            file.flush()
            await self._start(send, 5 + 2 * MIB + 3 * MIB + 4)
            await send({"type": "http.response.body", "body": b"head:", "more_body": True})
            await self._piped(send, self.data[: 2 * MIB])
            await send({"type": ZERO_COPY, "file": file, "count": 3 * MIB, "offset": 1000, "more_body": True})
            await send({"type": "http.response.body", "body": b":end", "more_body": False})

    async def big(self, send: Send) -> None:
        await self._start(send, len(self.data))
        await self._piped(send, self.data, more_body=False)

    async def endless(self, send: Send) -> None:
        """64 MiB for a client that leaves after one."""
        await self._start(send, 64 * MIB)
        for _ in range(4):
            await self._piped(send, self.data)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def over(self, send: Send) -> None:
        await self._start(send, MIB)
        await self._piped(send, self.data[: 2 * MIB], more_body=False)

    async def chunked(self, send: Send) -> None:
        await self._start(send, None)
        await self._piped(send, self.data[: 2 * MIB], more_body=False)


def _fill(fd: int, data: bytes) -> None:
    """Write `data` into a pipe made big enough for it."""
    import fcntl

    fcntl.fcntl(fd, 1031, MIB)  # F_SETPIPE_SZ
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@pytest.fixture
async def served(tmp_path: Any) -> AsyncIterator[tuple[App, int]]:
    app = App()
    options = {**uvicorn_options(make_settings(tmp_path, "bubblewrap")), "log_level": "critical"}
    config = FrontDoorConfig(app, front_door=LIMITS, host="127.0.0.1", port=0, lifespan="off", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    try:
        yield app, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def test_a_body_from_bytes_a_pipe_and_a_file_arrives_whole(served: tuple[App, int]) -> None:
    app, port = served
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/mixed")
    assert response.status_code == 200, app.ended
    assert response.content == b"head:" + app.data[: 2 * MIB] + app.data[: 3 * MIB] + b":end"
    assert ZERO_COPY in app.seen[0]
    assert app.ended.get_nowait() == "done"


async def test_a_client_that_reads_slowly_gets_every_byte(served: tuple[App, int]) -> None:
    """Its socket fills, so the splice waits for room again and again."""
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"content-length: {len(app.data)}".encode() in head.lower()
    digest, got = hashlib.sha256(), 0
    while got < len(app.data):
        chunk = await reader.read(256 * 1024)
        assert chunk
        digest.update(chunk)
        got += len(chunk)
        if got % (4 * MIB) < len(chunk):
            await asyncio.sleep(0.2)
    assert digest.digest() == hashlib.sha256(app.data).digest()
    assert await app.ended.get() == "done"
    writer.close()


async def test_a_client_that_leaves_mid_body_costs_nothing_but_its_response(served: tuple[App, int]) -> None:
    app, port = served
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    got = 0
    while got < 2 * MIB:
        got += len(await asyncio.get_running_loop().run_in_executor(None, sock.recv, MIB))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, with the body's most still to come
    assert await asyncio.wait_for(app.ended.get(), 10) == "done"  # its sends returned, none raised
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/mixed")
    assert response.status_code == 200 and len(response.content) == 5 * MIB + 9


async def test_more_than_the_content_length_is_refused(served: tuple[App, int]) -> None:
    app, port = served
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/over")
    assert response.content == app.data[:MIB]  # what the head declared, and not a byte more
    assert (await app.ended.get()).startswith("RuntimeError: Response content longer than Content-Length")


async def test_a_chunked_body_is_read_from_the_file_and_sent_as_chunks(served: tuple[App, int]) -> None:
    app, port = served
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/chunked")
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content == app.data[: 2 * MIB]
