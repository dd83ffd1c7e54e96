"""A terminal's bytes under flow control, between the server's `ExecutorClient` and a real daemon.

The daemon runs on the host over a socketpair, as bubblewrap's does (the protocol is what is
tested here; the tests through a real server and sandboxes are in test_terminal.py). Its credit
is what bounds a flood: a daemon that read past it would break the protocol and lose its connection.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.errors import Unavailable
from crogia.sandbox import pty_channel
from crogia.sandbox.channel import PairChannel
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor import DAEMON_DIR, daemon_command
from crogia.sandbox.executor_client import ByteStream, ExecutorClient

SLACK = 256 * 1024
"""How far short of the full window a stalled flood may stop (the pty hands out a few KiB a read)."""


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ExecutorClient]:
    channel = PairChannel()
    fd = channel.daemon_fd()
    argv = daemon_command(["--fd", str(fd), "--log-dir", str(tmp_path / "logs")], sys.executable)
    argv[argv.index("/opt/crogia")] = str(DAEMON_DIR)
    proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(fd,))
    channel.spawned()
    client = ExecutorClient(await channel.connect(10))
    try:
        yield client
    finally:
        await client.close()
        await channel.close()
        await asyncio.wait_for(proc.wait(), 10)


async def open_terminal(client: ExecutorClient) -> tuple[ByteStream, int]:
    stream, reply = await client.open_stream(
        "pty_open", lasting=True, **pty_channel.open_args(cols=80, rows=24)
    )
    return stream, pty_channel.open_reply(await reply)


async def read_until(stream: ByteStream, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await asyncio.wait_for(stream.read(), 30)
        assert chunk, f"the terminal ended before {marker!r}: {seen[-500:]!r}"
        seen += chunk
    return seen


async def test_a_flood_stops_at_the_window_until_the_server_consumes(client: ExecutorClient) -> None:
    stream, tid = await open_terminal(client)
    await stream.write(b"stty -echo; echo READY-$((6*7)); yes\r")
    await read_until(stream, b"READY-42")
    deadline = asyncio.get_running_loop().time() + 30
    # Nobody reads: the window fills. Received and not yet credited is what the window bounds:
    # what `read_until` took is among it (a flood's first frames carry READY and up to
    # READ_MAX of `y`s, credited only once a quarter window is consumed).
    while stream._outstanding < proto.WINDOW - SLACK:
        assert asyncio.get_running_loop().time() < deadline, (stream._outstanding, stream._held)
        await asyncio.sleep(0.01)  # polling the condition: the daemon sends on its own
    for _ in range(20):  # and stays full: the daemon stopped reading the pty, `yes` is blocked
        await asyncio.sleep(0.01)
        assert stream._held <= stream._outstanding <= proto.WINDOW and not client.closed
    taken = 0
    while taken < 3 * proto.WINDOW:  # consuming gives credit: the flood goes on
        taken += len(await asyncio.wait_for(stream.read(), 30))
    assert not client.closed
    await asyncio.wait_for(client.request(**pty_channel.close_request(tid, grace=0.2)), 30)
    stream.abort()


async def test_input_the_program_does_not_read_waits_for_credit(client: ExecutorClient) -> None:
    stream, tid = await open_terminal(client)
    await stream.write(b"stty -echo -icanon; echo READY-$((6*7)); sleep 1006\r")
    await read_until(stream, b"READY-42")
    typing = asyncio.create_task(stream.write(b"z" * (2 * proto.WINDOW)))
    deadline = asyncio.get_running_loop().time() + 30
    while stream._credit > 0:  # the daemon holds a window of it, unwritten, and credits nothing
        assert asyncio.get_running_loop().time() < deadline, stream._credit
        await asyncio.sleep(0.01)
    assert not typing.done()
    await asyncio.wait_for(client.request(**pty_channel.close_request(tid, grace=0.2)), 30)
    stream.abort()  # as `pty_close` does: the write blocked on it fails instead of waiting forever
    with pytest.raises(Unavailable, match="reset"):
        await asyncio.wait_for(typing, 10)
    assert not client.closed
