"""A tunnel's flow control, on every backend, through the real daemon: never past the window, nothing lost.

The flaky 100 MB download (cut at ~19-48 MB) was the daemon sending past its window: it checked the
window before each read of up to a chunk, so a window not a whole number of chunks from full was
overrun by up to a chunk, the server saw a lying daemon and reset the connection. One odd byte
first makes that certain here instead of a matter of timing.
"""

from __future__ import annotations

import asyncio
import time

from tests.previews.helpers import start, wait_port, write_file
from tests.support.server import RunningServer

ODD_THEN_BULK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(4)
while True:
    c, _ = s.accept()
    c.sendall(b"!")
    if c.recv(1) == b"g":
        c.sendall(b"x" * (int(sys.argv[2]) << 20))
    c.close()
"""


async def test_a_stalled_reader_holds_the_daemon_at_its_window_and_loses_nothing(
    server: RunningServer,
) -> None:
    sid = str((await server.create_session())["session_id"])
    await write_file(server, sid, "odd.py", ODD_THEN_BULK)
    await start(server, sid, "python3 odd.py 8100 12")
    await wait_port(server, sid, 8100)
    live = await server.runtime.sessions.live(sid, tenant=None)
    tunnel = await live.sandbox.open_tunnel(8100)
    try:
        assert await asyncio.wait_for(tunnel.read(), 10) == b"!"
        await tunnel.write(b"g")
        # Read nothing until the daemon has filled its window (then it must stop, exactly there).
        deadline = time.monotonic() + 20
        while tunnel.buffered < tunnel.window - (256 << 10) and not tunnel.ended:
            assert time.monotonic() < deadline, f"only {tunnel.buffered} bytes came"
            await asyncio.sleep(0.01)  # polling a condition with a deadline
        assert not tunnel.ended, "the tunnel ended early: the daemon overran its window"
        assert tunnel.buffered <= tunnel.window
        seen = 0
        while chunk := await asyncio.wait_for(tunnel.read(), 10):
            seen += len(chunk)
        assert seen == 12 << 20
    finally:
        await tunnel.close()
