"""Binary frames and flow control between the server's `ExecutorClient` and a real daemon.

The daemon runs on the host (the protocol is what is tested, not a sandbox), over a socketpair as
bubblewrap's does, with test ops (`tests/support/stream_ops.py`) that source and sink bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crogia.errors import CrogiaError
from crogia.sandbox.channel import PairChannel
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.executor import DAEMON_DIR
from crogia.sandbox.executor_client import ExecutorClient

SUPPORT = Path(__file__).resolve().parents[1] / "support"
BOOT = (
    "import sys; sys.path[0:0] = [sys.argv.pop(1), sys.argv.pop(1)];"
    "import executor, stream_ops; stream_ops.install(executor); executor.main()"
)
TEST_RESULTS = {
    "source": {"sent": proto.Field(int, 0)},
    "sink": {"received": proto.Field(int, 0), "sha256": proto.TEXT},
    "counters": {name: proto.Field(int, 0) for name in ("sent", "received", "buffered")},
}


@pytest.fixture
async def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ExecutorClient]:
    for op, fields in TEST_RESULTS.items():
        monkeypatch.setitem(proto.RESULTS, op, fields)
    channel = PairChannel()
    fd = channel.daemon_fd()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-S", "-c", BOOT, str(DAEMON_DIR), str(SUPPORT),
        "--fd", str(fd), "--log-dir", str(tmp_path / "logs"),
        pass_fds=(fd,),
    )  # fmt: skip
    channel.spawned()
    client = ExecutorClient(await channel.connect(10))
    try:
        yield client
    finally:
        await client.close()
        await channel.close()
        await asyncio.wait_for(proc.wait(), 10)


async def wait_for(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll an async `condition` until true (each poll is a round trip to the daemon)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_download_arrives_whole_and_ends(client: ExecutorClient) -> None:
    size = 3 * proto.WINDOW + 12345
    stream, reply = await client.open_stream("source", size=size)
    got = 0
    while chunk := await stream.read():
        assert set(chunk) == {ord("x")}
        got += len(chunk)
    assert got == size
    assert (await reply) == {"sent": size}
    assert stream.over and not client._streams


async def test_upload_arrives_whole(client: ExecutorClient) -> None:
    data = os.urandom(3 * proto.WINDOW + 999)
    stream, reply = await client.open_stream("sink")
    await stream.write(data)
    await stream.end()
    values = await reply
    assert values == {"received": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_the_daemon_sends_no_more_than_the_window_to_a_slow_reader(client: ExecutorClient) -> None:
    stream, reply = await client.open_stream("source", size=16 * proto.WINDOW)

    async def window_full() -> bool:
        return stream._held >= proto.WINDOW

    await wait_for(window_full, "the window to fill")
    counters = await client.request("counters")
    assert counters["sent"] == proto.WINDOW  # it stopped at the window: nothing queues on its side
    total = 0
    while chunk := await stream.read():
        total += len(chunk)
    assert total == 16 * proto.WINDOW
    await reply


async def test_an_upload_waits_for_credit_when_the_daemon_does_not_consume(client: ExecutorClient) -> None:
    await client.request("counters", hold=True)
    stream, reply = await client.open_stream("sink")
    writing = asyncio.create_task(stream.write(b"z" * (3 * proto.WINDOW)))

    async def window_sent() -> bool:
        return (await client.request("counters"))["buffered"] >= proto.WINDOW

    await wait_for(window_sent, "the window to be sent")
    assert not writing.done() and stream._credit == 0
    assert (await client.request("counters"))["buffered"] == proto.WINDOW
    await client.request("counters", hold=False)
    await writing
    await stream.end()
    assert (await reply)["received"] == 3 * proto.WINDOW


async def test_a_reset_stops_the_daemon_and_frees_the_stream(client: ExecutorClient) -> None:
    async with (await client.open_stream("source", size=1 << 40))[0] as stream:
        assert await stream.read()
    assert stream.over and not client._streams
    before = (await client.request("counters"))["sent"]
    assert (await client.request("counters"))["sent"] == before  # the source task stopped
    assert (await client.request("ping"))["version"] == proto.VERSION


async def test_a_cancelled_caller_resets_its_stream(client: ExecutorClient) -> None:
    stream, reply = await client.open_stream("sink")
    reply.cancel()
    await asyncio.sleep(0)
    assert stream.over and not client._streams
    with pytest.raises(CrogiaError):
        await stream.write(b"late")
    assert (await client.request("ping"))["version"] == proto.VERSION


async def test_a_daemon_past_its_window_breaks_the_protocol(client: ExecutorClient) -> None:
    stream, _ = await client.open_stream("overrun")  # 5 MiB at once against a 4 MiB window, unread

    async def closed() -> bool:
        return client.closed

    await wait_for(closed, "the connection to be reset")
    with pytest.raises(CrogiaError, match="broke the protocol"):
        await stream.read()


async def test_frames_for_unknown_streams_are_dropped_and_lines_still_flow(client: ExecutorClient) -> None:
    client._writer.write(proto.frame_header(999_999, 4) + b"abcd" + proto.frame_header(999_999, 0))
    client._writer.write(b'{"op": "credit", "stream": 5, "bytes": 10}\n{"op": "reset", "stream": 6}\n')
    assert (await client.request("ping"))["version"] == proto.VERSION


def test_frame_headers_round_trip_and_refuse_oversize() -> None:
    header = proto.frame_header(7, proto.FRAME_MAX)
    assert header[0] == proto.FRAME and len(header) == proto.FRAME_HEADER
    assert proto.parse_frame_header(header) == (7, proto.FRAME_MAX)
    with pytest.raises(proto.ProtocolError):
        proto.parse_frame_header(proto.frame_header(7, proto.FRAME_MAX + 1))
