"""The relay thread of a handed-over preview socket (`SocketTunnel.relay`) ends with its download,
whatever the client does: stalls past PREVIEW_TIMEOUT (the response is cut short), goes away
mid-body, or is cancelled (its request's task ends). None outlives it, on either backend."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

from crogia.sandbox.tunnel_socket import SocketTunnel
from tests.conftest import make_settings
from tests.previews.helpers import serve_app
from tests.support.server import RunningServer, run_server

Writer = asyncio.StreamWriter
SIZE = 256 << 20
"""Far more than the sockets between here and the sandbox's server hold: the relay must wait."""


def _relays() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "preview-relay")


async def _no_relays_within(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _relays():
        assert time.monotonic() < deadline, f"{_relays()} relay threads outlived their downloads"
        await asyncio.sleep(0.02)  # polling a condition with a deadline


async def _start_download(
    server: RunningServer, sid: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client that has the response head and the start of the body, and reads no more."""
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /api/sessions/{sid}/ports/8000/big/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.wait_for(reader.readexactly(1 << 20), 30)
    deadline = time.monotonic() + 10
    while not _relays():
        assert time.monotonic() < deadline, "the download never took the relay"
        await asyncio.sleep(0.01)  # polling a condition with a deadline
    return reader, writer


@pytest.mark.selector_loop
async def test_a_client_that_stops_reading_is_cut_off_after_the_timeout(data_dir: Path, backend: str) -> None:
    async with run_server(make_settings(data_dir, backend, preview_timeout=1.0)) as server:
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid)
        reader, writer = await _start_download(server, sid)
        try:
            await _no_relays_within(8)  # PREVIEW_TIMEOUT with nothing taken, and a margin
            got = 0
            async with asyncio.timeout(30):
                while chunk := await reader.read(1 << 20):  # what was in the sockets, then the end
                    got += len(chunk)
            assert got < SIZE, "the stalled client still got the whole body"
        finally:
            writer.close()
        assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 200


@pytest.mark.selector_loop
async def test_a_client_that_goes_away_mid_body_ends_its_relay(data_dir: Path, backend: str) -> None:
    async with run_server(make_settings(data_dir, backend)) as server:  # PREVIEW_TIMEOUT 30 s
        sid = str((await server.create_session())["session_id"])
        await serve_app(server, sid)
        _reader, writer = await _start_download(server, sid)
        writer.transport.abort()  # a reset: the relay's next write fails
        await _no_relays_within(5)
        assert (await server.client.get(f"/api/sessions/{sid}/ports/8000/")).status_code == 200


async def test_cancelling_a_relay_stops_its_thread_at_once() -> None:
    """A request cancelled mid-body (its client's task, or the server going): the thread stops
    within one poll, though the client reads nothing and the sender has plenty more."""
    listener = socket.create_server(("127.0.0.1", 0))
    source_peer = socket.create_connection(listener.getsockname())
    source, _ = listener.accept()
    sink_peer = socket.socket()
    sink_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # small: the relay soon waits
    sink_peer.connect(listener.getsockname())
    sink, _ = listener.accept()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    listener.close()
    tunnel = await SocketTunnel.over(source)
    try:
        relaying = asyncio.create_task(tunnel.relay(sink.fileno(), 1 << 30, idle=60))
        deadline = time.monotonic() + 5
        while not _relays():
            assert time.monotonic() < deadline, "the relay thread never started"
            await asyncio.sleep(0.01)  # polling a condition with a deadline
        await asyncio.to_thread(source_peer.sendall, b"x" * (1 << 20))  # more than the sink takes
        await asyncio.sleep(0.2)  # the thread is waiting on the sink now
        assert not relaying.done()
        relaying.cancel()
        await asyncio.sleep(0)
        relaying.cancel()  # again, as anyio's cancel scopes do: nothing may be closed under the thread
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await relaying
        assert time.monotonic() - started < 1, "the cancel waited on the relay"
        await _no_relays_within(1)
    finally:
        await tunnel.close()
        for sock in (source_peer, sink_peer, sink):
            sock.close()
