"""A server in the sandbox that hangs, resets or sends garbage costs only that request, on every backend.

Each case must end within PREVIEW_TIMEOUT (1 s here) plus a margin, with a 502/504 that says what
happened (or, once the response head is out, the response cut short), and the next request works.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import make_settings
from tests.previews.helpers import start, wait_port, write_file
from tests.support.server import RunningServer, run_server

BAD = r"""
import base64, hashlib, socket, struct, sys, threading, time

def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        data = c.recv(65536)
        if not data:
            return
        head += data
    path = head.split(b" ")[1]
    if path == b"/reset":  # an RST instead of an answer
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif path == b"/half":  # a head, a little of the body, then nothing
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        time.sleep(3600)
    elif path == b"/endless":  # a head that never ends
        c.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            c.sendall(b"X-A: " + b"a" * 1000 + b"\r\n")
    elif path in (b"/deaf", b"/ws-deaf"):  # never reads again (a WebSocket one answers the upgrade)
        if path == b"/ws-deaf":
            lines = head.split(b"\r\n")
            key = [l.split(b":", 1)[1].strip() for l in lines if l.lower().startswith(b"sec-websocket-k")][0]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        time.sleep(3600)
    elif path == b"/ws-garbage":
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\xff\xff\xff")
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
LIMIT = 8.0
"""Seconds each bad case may take: PREVIEW_TIMEOUT (1 s) and a generous margin for a loaded machine."""


async def raw_upload_to_a_deaf_server(server: RunningServer, path: str) -> bytes:
    """Send a 64 MiB body to a server that reads none of it; the status line we get back."""
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    size = 64 << 20
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())

    async def pour() -> None:
        block = b"u" * (1 << 20)
        for _ in range(64):
            writer.write(block)
            await writer.drain()

    pouring = asyncio.create_task(pour())
    try:
        return await asyncio.wait_for(reader.readline(), LIMIT)
    finally:
        pouring.cancel()
        await asyncio.gather(pouring, return_exceptions=True)
        writer.transport.abort()  # close() would wait for what is still queued to go out


async def _read_all(server: RunningServer, path: str) -> None:
    async with server.client.stream("GET", path) as response:
        assert response.status_code == 200
        async for _ in response.aiter_raw():
            pass


async def _pour_into_a_deaf_websocket(url: str) -> None:
    async with websockets.connect(url, max_size=None, close_timeout=1) as ws:
        async with asyncio.timeout(LIMIT * 2):
            for _ in range(256):
                await ws.send(b"w" * (1 << 20))
            await ws.recv()


async def test_hanging_resetting_and_garbage_servers_cost_only_their_request(
    backend: str, data_dir: Path
) -> None:
    async with run_server(make_settings(data_dir, backend, preview_timeout=1.0)) as server:
        sid = str((await server.create_session())["session_id"])
        await write_file(server, sid, "bad.py", BAD)
        await start(server, sid, "python3 bad.py 8200")
        await wait_port(server, sid, 8200)
        base = f"/api/sessions/{sid}/ports/8200"

        cases = {"/reset": (502, "closed the connection"), "/endless": (502, "broken HTTP response")}
        for path, (status, detail) in cases.items():
            started = time.monotonic()
            response = await server.client.get(base + path)
            assert response.status_code == status and detail in response.json()["detail"], response.text
            assert time.monotonic() - started < LIMIT

        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # the head came, the body is cut short
            await _read_all(server, base + "/half")
        assert time.monotonic() - started < LIMIT

        started = time.monotonic()
        assert (await raw_upload_to_a_deaf_server(server, base + "/deaf")).startswith(b"HTTP/1.1 504")
        assert time.monotonic() - started < LIMIT

        started = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):  # the proxy gives up on it, not hangs
            await _pour_into_a_deaf_websocket(f"{server.ws_url}{base}/ws-deaf")
        assert time.monotonic() - started < LIMIT * 2

        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}{base}/ws-garbage", open_timeout=LIMIT):
                pass
        assert refused.value.response.status_code == 502

        assert (await server.client.get(base + "/fine")).text == "ok"  # the server is still good
