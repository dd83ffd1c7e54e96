"""A stream's long frames spliced into pipes on the server's side (`crogia.sandbox.frame_pipe`).

Two kinds of daemon: the real one (`tests/support/local_daemon`), tunnelling to a TCP server this
test runs, for the bytes; and a hostile one, which is this test writing raw frames into the far end
of a real socketpair, for what a daemon may do to the reader while it splices: run past its
window, end or stall inside a frame. The reader splices from the socket only on a plain socket,
and a pipe's fds go when their owner closes them, even while the reader is still splicing into
one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.errors import CrogiaError
from crogia.sandbox.channel import dial
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor_client import ByteStream, ExecutorClient
from crogia.sandbox.frame_pipe import PIPES_MAX, PipeChunk
from crogia.sandbox.tunnel_channel import open_tunnel
from tests.support.local_daemon import LocalDaemon, byte_source, local_daemon, pipes

SIZE = 48 << 20


def _pipes() -> int:
    """Pipe fds this process holds."""
    return pipes(os.getpid())


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[LocalDaemon]:
    (tmp_path / "ws").mkdir()
    async with local_daemon(tmp_path / "ws", tmp_path / "logs") as running:
        yield running


async def test_piped_bytes_arrive_once_and_in_order_whichever_way_they_went(daemon: LocalDaemon) -> None:
    """A slow consumer lets the pipes fill, so frames also come as bytes between the piped ones; a
    chunk is taken by splicing it into a socket, or read as bytes: every byte once, in order."""
    data = os.urandom(SIZE)
    source, port = await byte_source(data)
    sink, far = socket.socketpair()
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # a whole chunk fits: no reader needed
    before = _pipes()
    tunnel = await open_tunnel(daemon.client, port)
    try:
        await asyncio.wait_for(tunnel.connected(), 10)
        assert tunnel.pipe_frames()
        await tunnel.write(b"g")
        digest, got, kinds, spliced = hashlib.sha256(), 0, set(), 0
        while chunk := await asyncio.wait_for(tunnel.read_view(), 10):
            kinds.add(type(chunk).__name__)
            if isinstance(chunk, PipeChunk) and spliced % 2:  # out through a socket, as the front door does
                left = len(chunk)
                while left:
                    left -= os.splice(chunk.fileno(), sink.fileno(), left)
                digest.update(far.recv(len(chunk), socket.MSG_WAITALL))
            else:
                digest.update(bytes(chunk) if isinstance(chunk, PipeChunk) else chunk)
            spliced += isinstance(chunk, PipeChunk)
            got += len(chunk)
            if got % (8 << 20) < len(chunk):
                assert _pipes() > before, "no pipe was made"
                time.sleep(0.1)  # blocks this loop on purpose: the daemon's frames pile up meanwhile
        assert got == SIZE and digest.digest() == hashlib.sha256(data).digest()
        assert "PipeChunk" in kinds and spliced > 10, kinds
        assert kinds - {"PipeChunk"}, "no frame came as bytes while the pipes were full"
    finally:
        await tunnel.close()
        source.close()
        await source.wait_closed()
        sink.close()
        far.close()
    assert _pipes() == before, "the tunnel's pipes outlived it"


# --- a hostile daemon ---


async def _hostile() -> tuple[ExecutorClient, socket.socket]:
    """A client whose daemon is the returned socket: the test writes what it likes there."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    client = ExecutorClient(await dial(lambda factory: loop.create_unix_connection(factory, sock=ours)))
    theirs.setblocking(False)
    return client, theirs


async def _piped_stream(client: ExecutorClient) -> ByteStream:
    stream, reply = await client.open_stream("tunnel_open", lasting=True, port=1)
    reply.add_done_callback(lambda f: f.cancelled() or f.exception())
    assert stream.pipe_frames() is not None
    return stream


def _header(stream: int, length: int) -> bytes:
    return proto.frame_header(stream, length)


async def _send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def test_a_daemon_past_its_window_breaks_the_protocol_though_its_frames_were_piped() -> None:
    client, theirs = await _hostile()
    before = _pipes()
    try:
        stream = await _piped_stream(client)
        pipes = client._lines._pipes[stream.id]
        frame = os.urandom(proto.FRAME_MAX - 4096)
        sending = asyncio.create_task(_send(theirs, (_header(stream.id, len(frame)) + frame) * 6))
        deadline = time.monotonic() + 10
        while not client.closed:  # nothing is taken, so nothing is credited
            assert time.monotonic() < deadline, "a daemon past its window went on"
            await asyncio.sleep(0.01)
        with pytest.raises(CrogiaError) as caught:
            await stream.read_view()
        assert "broke the protocol" in str(caught.value) and "window" in str(caught.value)
        assert len(pipes.pipes) <= PIPES_MAX
        sending.cancel()
        pipes.close()
        assert _pipes() == before
    finally:
        await client.close()
        theirs.close()


async def test_a_daemon_that_ends_inside_a_spliced_frame_fails_its_streams() -> None:
    client, theirs = await _hostile()
    try:
        stream = await _piped_stream(client)
        await _send(theirs, _header(stream.id, 900_000) + b"x" * 300_000)
        await asyncio.sleep(0.05)  # the reader is splicing the frame now, waiting for its rest
        await asyncio.get_running_loop().sock_recv(theirs, 4096)  # the request (unread, a close resets)
        theirs.close()
        deadline = time.monotonic() + 10
        while not client.closed:
            assert time.monotonic() < deadline, "the reader went on waiting for the frame's rest"
            await asyncio.sleep(0.01)
        with pytest.raises(CrogiaError) as caught:
            await stream.read_view()
        assert "broke the protocol" in str(caught.value) and "inside a frame" in str(caught.value)
    finally:
        await client.close()


async def test_a_daemon_that_stalls_inside_a_spliced_frame_costs_only_its_connection() -> None:
    """The reader waits for the frame's rest, as it would for any frame; closing the tunnel's owner
    meanwhile defers the pipe's close until the reader lets go of it, and closing the client ends
    the wait at once."""
    client, theirs = await _hostile()
    before = _pipes()
    stream = await _piped_stream(client)
    pipes = client._lines._pipes[stream.id]
    try:
        await _send(theirs, _header(stream.id, 900_000) + b"x" * 300_000)
        deadline = time.monotonic() + 10
        while not (pipes.pipes and pipes.pipes[0].busy):
            assert time.monotonic() < deadline, "the reader never began to splice"
            await asyncio.sleep(0.01)
        pipes.close()  # the owner is done: the pipe the reader splices into must stay open
        assert pipes.pipes[0].read_end >= 0 and _pipes() == before + 2
    finally:
        started = time.monotonic()
        await client.close()
        theirs.close()
    assert time.monotonic() - started < 3
    assert _pipes() == before, "a pipe outlived its owner and the reader"
