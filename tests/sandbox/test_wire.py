"""`WireReader`: the daemon channel's lines and frames, read straight from a real socket's transport.

Each test runs on both event loops the server can use (asyncio's and uvloop's), over a real
socketpair whose far end the test writes raw bytes to, in whatever pieces it likes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from crogia.sandbox import channel
from crogia.sandbox.channel import Frame, Stream, WireReader, dial
from crogia.sandbox.daemon import executor_proto as proto

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return LOOPS[request.param]


async def _pair(limit: int = channel.HELLO_LIMIT) -> tuple[Stream, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    stream = await dial(lambda factory: loop.create_unix_connection(factory, sock=ours), limit)
    theirs.setblocking(False)
    return stream, theirs


async def _send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


def frame(stream: int, data: bytes) -> bytes:
    return proto.frame_header(stream, len(data)) + data


def test_lines_and_frames_arrive_whole_whatever_the_pieces(run: Callable[..., None]) -> None:
    big = bytes(range(256)) * (proto.FRAME_MAX // 256)  # a long frame: read into its own buffer
    wire = b'{"a":1}\n' + frame(7, b"short") + frame(9, big) + b'{"b":2}\n' + frame(7, b"") + b"last\n"

    async def main() -> None:
        for piece in (1, 7, 4096, 65537, len(wire)):
            (lines, writer), theirs = await _pair(limit=1 << 20)

            async def feed(theirs: socket.socket = theirs, piece: int = piece) -> None:
                for at in range(0, len(wire), piece):
                    await _send(theirs, wire[at : at + piece])

            feeding = asyncio.create_task(feed())
            got = [await lines.next() for _ in range(6)]
            await feeding
            assert got == [b'{"a":1}', Frame(7, b"short"), Frame(9, big), b'{"b":2}', Frame(7, b""), b"last"]
            assert isinstance(got[1], Frame) and type(got[1].data) is bytes
            theirs.close()
            assert await lines.next() is None  # a clean end
            writer.close()

    run(main())


def test_a_run_of_long_frames_is_read_into_their_own_buffers() -> None:
    """After a long frame the next read is short (`PEEK_READ`): a following long frame's rest then
    goes straight to its own buffer, instead of arriving whole in the shared one and being copied.

    Driven through the reader's transport side by hand, as a transport with all of it waiting
    would: each read fills what it is offered, and the reader parses all it can in between."""
    frames = [bytes([n]) * proto.FRAME_MAX for n in range(16)]
    wire, at = b"".join(frame(5, data) for data in frames), 0
    reader, got = WireReader(), []
    while len(got) < len(frames):
        with reader._get_buffer() as room:
            n = min(len(room), len(wire) - at)
            room[:n] = wire[at : at + n]
        at += n
        reader._updated(n)
        while (item := reader._parse()) is not None:
            got.append(item)
    assert [item.data for item in got] == frames
    copied = [n for n, item in enumerate(got) if isinstance(item.data, bytes)]
    # Only the first few: those the first full-size reads took whole or nearly whole.
    assert copied == list(range(len(copied))) and len(copied) <= 4, copied


def test_a_long_frames_buffer_is_read_into_again_only_once_nothing_holds_it() -> None:
    """Long frames land in spare buffers (memory already mapped); one is used again only when no
    frame, view or slice of it is left, whatever else the program does with the bytes."""
    reader = WireReader()

    def long_frame(fill: int) -> memoryview:
        wire = frame(3, bytes([fill]) * (proto.FRAME_MAX - fill))
        with reader._get_buffer() as room:  # the header and a little: the rest goes direct
            room[: proto.FRAME_HEADER + 10] = wire[: proto.FRAME_HEADER + 10]
        reader._updated(proto.FRAME_HEADER + 10)
        assert reader._parse() is None
        with reader._get_buffer() as room:
            room[:] = wire[proto.FRAME_HEADER + 10 :]
        reader._updated(len(wire) - proto.FRAME_HEADER - 10)
        item = reader._parse()
        assert isinstance(item, Frame) and isinstance(item.data, memoryview)
        assert item.data == bytes([fill]) * (proto.FRAME_MAX - fill)
        return item.data

    first = long_frame(1)
    under = id(first.obj)  # (only its id: a name for it would hold it)
    held = first[100:200]  # a slice still refers to it
    del first
    second = long_frame(2)
    assert id(second.obj) != under and bytes(held) == b"\x01" * 100  # not written over
    del held
    third = long_frame(3)
    assert id(third.obj) == under, "a buffer nobody holds was not used again"
    assert bytes(second[:5]) == b"\x02" * 5 and len(third) == proto.FRAME_MAX - 3


def test_a_line_over_the_limit_and_a_frame_over_frame_max_break_the_protocol(
    run: Callable[..., None],
) -> None:
    async def main() -> None:
        (lines, writer), theirs = await _pair(limit=100)
        await _send(theirs, b"x" * 101)  # no newline yet: already too long
        with pytest.raises(proto.ProtocolError, match="longer than 100"):
            await lines.next()
        writer.close()
        theirs.close()

        (lines, writer), theirs = await _pair()
        await _send(
            theirs, proto.FRAME.to_bytes() + (1).to_bytes(4, "big") + (proto.FRAME_MAX + 1).to_bytes(4, "big")
        )
        with pytest.raises(proto.ProtocolError, match="frame of"):
            await lines.next()
        writer.close()
        theirs.close()

    run(main())


def test_an_end_inside_a_frame_is_a_violation_and_a_reset_an_error(run: Callable[..., None]) -> None:
    async def main() -> None:
        for cut in (5, proto.FRAME_HEADER + 10, proto.FRAME_HEADER + 200_000):  # header, short, long
            (lines, writer), theirs = await _pair()
            await _send(theirs, frame(3, b"y" * 250_000)[:cut])
            theirs.close()
            with pytest.raises(proto.ProtocolError, match="ended inside"):
                await lines.next()
            writer.close()

        (lines, writer), theirs = await _pair()
        writer.write(b"never read\n")  # the peer closes with this unread: the kernel resets us
        await writer.drain()
        await _send(theirs, b"half a li")
        theirs.close()
        with pytest.raises(ConnectionResetError):
            await lines.next()
        writer.close()

    run(main())


def test_a_flood_nobody_reads_is_held_back_by_the_socket_not_buffered(run: Callable[..., None]) -> None:
    """While nothing calls next(), the reader stops reading past PAUSE_AT: the sender blocks."""

    async def main() -> None:
        (lines, writer), theirs = await _pair()
        block = frame(5, b"z" * 60_000)
        total = 64 << 20

        async def flood() -> None:
            for _ in range(total // len(block)):
                await _send(theirs, block)

        flooding = asyncio.create_task(flood())
        first = await lines.next()  # reading has started; now nobody reads for a while
        assert isinstance(first, Frame)
        wire: WireReader = lines
        deadline = asyncio.get_running_loop().time() + 10
        while not wire._paused:  # the flood runs until the reader pauses its transport
            assert asyncio.get_running_loop().time() < deadline, "the reader never paused"
            await asyncio.sleep(0.001)
        held = wire._end - wire._start
        assert held <= channel.PAUSE_AT + channel.READ_BUFFER, held
        assert not flooding.done()  # the socket holds the rest back
        frames = 1
        while frames < total // len(block):
            item = await lines.next()
            assert isinstance(item, Frame) and item.stream == 5 and len(item.data) == 60_000
            frames += 1
        await flooding
        writer.close()
        theirs.close()

    run(main())
