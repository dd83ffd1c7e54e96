"""The preview proxy through a real server, on every backend: HTTP and WebSocket to servers in the sandbox."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import websockets

from crogia.sandbox.frame_pipe import PipeChunk
from crogia.sandbox.tunnel_socket import SocketTunnel
from crogia.services import previews
from tests.conftest import make_settings
from tests.hostile.support import rss_mb
from tests.previews.helpers import WS_ECHO, serve_app, start, wait_port, write_file
from tests.support.local_daemon import pipes
from tests.support.server import RunningServer, run_server


async def test_get_and_post_reach_a_server_in_the_sandbox(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    pid = await serve_app(server, sid, 8000)
    entry = await wait_port(server, sid, 8000)
    assert entry["url"].endswith(f"/api/sessions/{sid}/ports/8000/") and entry["process"] == pid, entry

    response = await server.client.get(
        f"/api/sessions/{sid}/ports/8000/some/page?q=1", headers={"Connection": "X-Drop", "X-Drop": "1"}
    )
    assert response.status_code == 200, response.text
    text = response.text
    assert "hello from the sandbox" in text and "path=/some/page?q=1" in text
    assert f"x-forwarded-prefix: /api/sessions/{sid}/ports/8000" in text
    assert "x-forwarded-for: 127.0.0.1" in text and "x-forwarded-proto: http" in text
    assert "host: localhost:8000" in text and "x-drop" not in text  # named by Connection: one hop only
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert "x-secret" not in response.headers  # the sandbox's Connection named it

    body = bytes(range(256)) * 4096  # 1 MiB
    response = await server.client.post(f"/api/sessions/{sid}/ports/8000/upload", content=body)
    assert response.status_code == 201
    assert response.text == f"got {len(body)} {hashlib.sha256(body).hexdigest()}"

    response = await server.client.get(f"/api/sessions/{sid}/ports/8000", follow_redirects=True)  # no slash
    assert response.status_code == 200 and "path=/" in response.text


async def test_large_bodies_stream_both_ways_in_bounded_memory(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    await serve_app(server, sid, 8001)
    size, seen = 100 << 20, 0
    before, peak = rss_mb(), 0.0
    async with server.client.stream("GET", f"/api/sessions/{sid}/ports/8001/big/{size}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        async for chunk in response.aiter_raw():
            seen += len(chunk)
            if seen % (8 << 20) < len(chunk):
                peak = max(peak, rss_mb())
    assert seen == size
    assert peak - before < 60, f"the server grew by {peak - before:.0f} MB for a 100 MB download"

    async def upload() -> AsyncIterator[bytes]:
        nonlocal peak
        block = b"u" * (1 << 20)
        for i in range(80):
            if i % 8 == 0:
                peak = max(peak, rss_mb())
            yield block

    before, peak = rss_mb(), 0.0
    response = await server.client.post(f"/api/sessions/{sid}/ports/8001/upload", content=upload())
    assert response.status_code == 201 and response.text.startswith(f"got {80 << 20} ")
    assert peak - before < 60, f"the server grew by {peak - before:.0f} MB for an 80 MB upload"


async def test_errors_are_clear(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    response = await server.client.get(f"/api/sessions/{sid}/ports/8999/")
    assert response.status_code == 502 and "Nothing listens on port 8999" in response.json()["detail"]
    for bad in ("0", "65536", "http"):
        assert (await server.client.get(f"/api/sessions/{sid}/ports/{bad}/")).status_code == 422
    response = await server.client.get("/api/sessions/no-such-session/ports/8000/")
    assert response.status_code == 404
    await serve_app(server, sid, 8002)
    response = await server.client.get(f"/api/sessions/{sid}/ports/8002/garbage")
    assert response.status_code == 502 and "broken HTTP response" in response.json()["detail"]
    big = b"x" * (server.settings.request_max_bytes + 1)
    response = await server.client.post(f"/api/sessions/{sid}/ports/8002/upload", content=big)
    assert response.status_code == 413
    # the server still answers the next request
    assert (await server.client.get(f"/api/sessions/{sid}/ports/8002/")).status_code == 200


async def test_websocket_echo_through_the_proxy(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    await write_file(server, sid, "ws.py", WS_ECHO)
    await start(server, sid, "python3 ws.py 8765")
    await wait_port(server, sid, 8765)
    url = f"{server.ws_url}/api/sessions/{sid}/ports/8765/hmr?x=1"
    async with websockets.connect(url, subprotocols=["vite-hmr"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "vite-hmr"
        assert await asyncio.wait_for(ws.recv(), 10) == "path /hmr?x=1"
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 10) == "echo:hi"
        await ws.send(b"\x00\x01" * 40000)
        assert await asyncio.wait_for(ws.recv(), 10) == b"echo:" + b"\x00\x01" * 40000
    async with websockets.connect(url) as ws:  # a second one after the first closed
        assert await asyncio.wait_for(ws.recv(), 10) == "path /hmr?x=1"


async def test_a_fresh_sandbox_lists_no_ports(server: RunningServer) -> None:
    """Nothing the sandbox started listens: Docker's embedded DNS (127.0.0.11, made by the engine in
    the container's namespace) is not the sandbox's, and must not show as a port or a port_opened."""
    sid = str((await server.create_session())["session_id"])
    assert (await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": "true"})).status_code == 200
    ports = (await server.client.get(f"/api/sessions/{sid}/ports")).json()["ports"]
    assert ports == []


async def test_port_events_on_the_session_stream(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
        await ws.recv()  # connection_established
        pid = await serve_app(server, sid, 8003)
        await _next_event(ws, "port_opened", 8003)
        assert (await server.client.post(f"/api/sessions/{sid}/processes/{pid}/stop")).status_code == 200
        await _next_event(ws, "port_closed", 8003)


async def _next_event(ws: websockets.ClientConnection, kind: str, port: int) -> None:
    """Until that event for that port (other ports may open: the sandbox's own helpers listen too)."""
    async with asyncio.timeout(30):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == kind and event["port"] == port:
                return


def _pipes() -> int:
    """Pipe fds this process (the server, in the test's own loop) holds."""
    return pipes(os.getpid())


@pytest.mark.selector_loop  # (the lane's share is asserted: under uvloop it may not engage)
@pytest.mark.parametrize("path", ["handoff", "frames", "splice"])
async def test_a_long_download_goes_whole_to_a_slow_client(
    data_dir: Path, backend: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download's bytes go from the sandbox's server straight into the client's socket: with the
    socket handed over, from a relay thread that waits in the kernel (`SocketTunnel.relay`), else
    while it can take them (the lane: `zero_copy.Lent`, from the tunnel's reader); a client that stops
    reading now and then makes the rest wait in the tunnel's queue and go as ASGI messages. The
    tunnel is the socket the daemon handed over (`tunnel_socket`), or with PREVIEW_HANDOFF off the
    daemon's frames; with PREVIEW_SPLICE too they go by splice (`frame_pipe`): the client that
    stalls fills the pipes, so frames come as bytes between the piped ones, and the pipes go with
    the response. Every byte once, in order, whichever way."""
    splice = path == "splice"
    laned, handed = [0], [0]
    lane_call = previews._Lane.__call__
    over = SocketTunnel.over.__func__  # type: ignore[attr-defined]

    async def counted_over(cls: type[SocketTunnel], sock: socket.socket) -> SocketTunnel:
        handed[0] += 1
        return await over(cls, sock)  # type: ignore[no-any-return]

    monkeypatch.setattr(SocketTunnel, "over", classmethod(counted_over))  # a spy as well
    relayed = [0]
    relay = SocketTunnel.relay

    async def counted_relay(tunnel: SocketTunnel, to: int, count: int, idle: float) -> tuple[int, bool]:
        moved, whole = await relay(tunnel, to, count, idle)
        relayed[0] += moved
        return moved, whole

    monkeypatch.setattr(SocketTunnel, "relay", counted_relay)  # and the relay thread's share

    def counted(lane: previews._Lane, chunk: PipeChunk | memoryview) -> int:
        moved = lane_call(lane, chunk)
        laned[0] += moved
        return moved

    monkeypatch.setattr(previews._Lane, "__call__", counted)  # a spy: the lane itself does the work
    settings = make_settings(data_dir, backend, preview_splice=splice, preview_handoff=path == "handoff")
    async with run_server(settings) as server:
        sid = str((await server.create_session())["session_id"])
        size = 48 << 20
        response = await server.client.post(
            f"/api/sessions/{sid}/shell",
            json={"cmd": f"head -c {size} /dev/urandom > blob && sha256sum blob", "timeout": 60},
        )
        assert response.status_code == 200, response.text
        expected = response.json()["output"].split()[0]
        await start(server, sid, "python3 -m http.server 8003 --bind 127.0.0.1")
        await wait_port(server, sid, 8003)
        before = _pipes()
        host, port = server.base_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /api/sessions/{sid}/ports/8003/blob HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200") and f"content-length: {size}".encode() in head.lower()
            digest, got, most = hashlib.sha256(), 0, 0
            while got < size:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
                assert chunk, f"the body ended after {got} bytes"
                digest.update(chunk)
                got += len(chunk)
                most = max(most, _pipes() - before)
                if got % (8 << 20) < len(chunk):
                    await asyncio.sleep(0.2)  # the client stops reading: its socket (and the pipes) fill
            assert digest.hexdigest() == expected
            if splice:
                assert most >= 2, "no pipe was made for the download"
            else:
                assert most == 0, "a pipe was made without PREVIEW_SPLICE"
            if path == "handoff":  # the relay thread takes the body once the head is out
                assert 0 < relayed[0] <= size and laned[0] == 0, (relayed, laned)
            else:
                assert 0 < laned[0] < size, f"the lane moved {laned[0]} of {size} bytes"
            assert handed[0] == (path == "handoff"), f"{handed[0]} sockets handed over"
        finally:
            writer.close()
        deadline = asyncio.get_running_loop().time() + 10
        while _pipes() > before:
            assert asyncio.get_running_loop().time() < deadline, "the download's pipes outlived it"
            await asyncio.sleep(0.02)
