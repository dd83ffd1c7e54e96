"""A tunnel's bytes through the real daemon's splice path (`executor_net.Tunnel.outbound`).

The daemon runs on the host over a socketpair, as bubblewrap's does (`tests/support/local_daemon`),
and tunnels to a TCP server this test runs on 127.0.0.1. Its connection is a plain socket, so it
splices: socket to pipe to channel. A server loop that stops reading now and then (blocking this
test's loop) fills the channel socket, so frames also take the partial path (the rest of a frame
read from the pipe into the daemon's queue). Whatever path a byte took, it must arrive once, in
order; and the pipes go with the tunnel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.sandbox.tunnel_channel import open_tunnel
from tests.support.local_daemon import LocalDaemon, byte_source, local_daemon, pipes

SIZE = 24 << 20


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[LocalDaemon]:
    (tmp_path / "ws").mkdir()
    async with local_daemon(tmp_path / "ws", tmp_path / "logs") as running:
        yield running


async def test_spliced_bytes_arrive_once_and_in_order_and_the_pipes_go_with_the_tunnel(
    daemon: LocalDaemon,
) -> None:
    data = os.urandom(SIZE)
    source, port = await byte_source(data)
    pid = daemon.process.pid
    before = pipes(pid)
    tunnel = await open_tunnel(daemon.client, port)
    try:
        await asyncio.wait_for(tunnel.connected(), 10)
        await tunnel.write(b"g")
        digest, got, stalls = hashlib.sha256(), 0, 0
        while chunk := await asyncio.wait_for(tunnel.read_view(), 10):
            digest.update(chunk)
            got += len(chunk)
            if got > (stalls + 1) * (3 << 20):  # a busy server: the daemon's socket fills meanwhile
                stalls += 1
                time.sleep(0.05)  # blocks this loop on purpose (it is the "server" here)
            if stalls == 1 and got < (4 << 20):
                assert pipes(pid) >= before + 2, "the daemon did not splice"
        assert got == SIZE and digest.digest() == hashlib.sha256(data).digest()
        assert stalls >= 5
    finally:
        await tunnel.close()
        source.close()
        await source.wait_closed()
    deadline = time.monotonic() + 10
    while pipes(pid) > before:  # the daemon closes the tunnel's pipe with it
        assert time.monotonic() < deadline, "the tunnel's pipe outlived it"
        await asyncio.sleep(0.01)
