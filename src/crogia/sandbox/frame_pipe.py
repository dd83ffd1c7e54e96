"""Pipes a stream's long frames are spliced into, so that the server never copies their bytes.

A long download through a preview (`services.previews`) asks its tunnel's stream for one
(`ByteStream.pipe_frames`). From then on the channel's reader (`channel.WireReader`) moves each
long frame of that stream from the daemon's socket into the pipe with `splice`, and the front door
moves it from the pipe into the client's socket (`http.response.zerocopysend`): the kernel hands
the pages on, this process copies none of them. What waits in a pipe is a `PipeChunk` in the
stream's queue, in order with the chunks that came as bytes.

Only a plain socket can be spliced from (not TLS), and a frame goes only into an empty pipe (a
splice fills pages less than full, so one that holds some bytes may take far fewer than its size
says); the rest of the frame, when the pipe fills meanwhile, comes as bytes after it, and so does a
frame that finds no pipe empty. Bytes in a pipe count against the stream's window like any others.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import termios
from typing import Protocol

from crogia.sandbox.daemon import executor_proto as proto

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
MIN_CAPACITY = 256 * 1024
"""A pipe smaller than this (the user is over `pipe-user-pages-soft`) is not worth a splice per frame."""
PIPES_MAX = proto.WINDOW // proto.FRAME_MAX
"""Pipes a stream may have: a window's frames, while the client's socket is full and the first
pipe waits on it (pipe-max-size, 1 MiB by default, is as large as one can be made without
CAP_SYS_RESOURCE)."""


class FramePipes:
    """A stream's pipes: a frame goes into one with room for it, made when none has, up to PIPES_MAX."""

    def __init__(self) -> None:
        self.pipes: list[FramePipe] = []
        self.closed = False

    def take(self, n: int) -> FramePipe | None:
        """An empty pipe for a frame of `n` bytes; None if none is empty and no more can be made."""
        for pipe in self.pipes:
            if pipe.empty():
                return pipe if pipe.capacity >= n else None
        if len(self.pipes) >= PIPES_MAX or self.closed:
            return None
        made = FramePipe.make()
        if made is None:
            return None
        self.pipes.append(made)
        return made if made.capacity >= n else None

    def close(self) -> None:
        """Done with them (idempotent): see `FramePipe.close`."""
        self.closed = True
        for pipe in self.pipes:
            pipe.close()


class FramePipe:
    """One stream's pipe: the reader splices frames in, the stream's consumer takes them out.

    Closing it while the reader is splicing a frame in waits for that frame (`release`): the reader
    must finish reading the frame off the channel whatever happens to the stream.
    """

    def __init__(self, read_end: int, write_end: int, capacity: int) -> None:
        self.read_end, self.write_end, self.capacity = read_end, write_end, capacity
        self.busy = False
        """The reader is splicing a frame into it."""
        self.closed = False

    @classmethod
    def make(cls) -> FramePipe | None:
        """A pipe that holds a whole frame or close to it; None if none can be had (then: bytes)."""
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:  # noqa: SIM105 (over pipe-max-size, or the user's pipes are over pipe-user-pages-soft)
            fcntl.fcntl(write_end, F_SETPIPE_SZ, proto.FRAME_MAX)
        except OSError:
            pass
        capacity = fcntl.fcntl(write_end, F_GETPIPE_SZ)
        if capacity < MIN_CAPACITY:
            os.close(read_end)
            os.close(write_end)
            return None
        return cls(read_end, write_end, capacity)

    def empty(self) -> bool:
        held = bytearray(4)
        fcntl.ioctl(self.read_end, termios.FIONREAD, held)
        return held == b"\0\0\0\0"

    def full(self) -> bool:
        """No page of the pipe is free (a splice into it would wait)."""
        poller = select.poll()
        poller.register(self.write_end, select.POLLOUT)
        return not poller.poll(0)

    def put(self, data: memoryview) -> int:
        """Write `data` into the pipe (an empty one, as large as a frame); how much went in."""
        if not data:
            return 0
        try:
            return os.write(self.write_end, data)
        except BlockingIOError:
            return 0

    def read(self, n: int) -> bytes:
        """The next `n` bytes, which are in the pipe already (a `PipeChunk`'s)."""
        parts, left = [], n
        while left:
            part = os.read(self.read_end, left)
            if not part:
                raise BlockingIOError(f"the pipe held {n - left} of {n} bytes")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        """Done with it (idempotent); its fds go now, or once the reader's frame is in."""
        self.closed = True
        if not self.busy:
            self._close_fds()

    def release(self) -> None:
        """The reader's frame is in (or abandoned)."""
        self.busy = False
        if self.closed:
            self._close_fds()

    def _close_fds(self) -> None:
        if self.read_end >= 0:
            os.close(self.read_end)
            os.close(self.write_end)
            self.read_end = self.write_end = -1


class PipeChunk:
    """`n` bytes of a stream waiting in its pipe: splice them out from `fileno()`, or take `bytes()`.

    Chunks of one pipe must be taken in their order, and each whole (or the pipe dropped after).
    """

    __slots__ = ("n", "pipe")

    def __init__(self, pipe: FramePipe, n: int) -> None:
        self.pipe, self.n = pipe, n

    def __len__(self) -> int:
        return self.n

    def fileno(self) -> int:
        return self.pipe.read_end

    def __bytes__(self) -> bytes:
        return self.pipe.read(self.n)

    def after(self, n: int) -> PipeChunk:
        """What is left of it once its first `n` bytes are taken out of the pipe."""
        return PipeChunk(self.pipe, self.n - n)

    def head(self, n: int) -> PipeChunk:
        """Its first `n` bytes (what is behind them is left in the pipe: drop the pipe after)."""
        return PipeChunk(self.pipe, min(n, self.n))


class Sink(Protocol):
    """Where a stream's long frames (in a pipe, or a view of their own buffer) may go the moment
    they are in, rather than waiting in its queue (`ByteStream.read_view(sink=...)`): the preview
    proxy's lane into the client's socket."""

    def __call__(self, chunk: PipeChunk | memoryview, /) -> int:
        """Move what can go now of `chunk` (from its start, without waiting); how many bytes went.
        It must not raise: whatever it cannot move waits in the stream's queue as before."""

    @property
    def full(self) -> bool:
        """It wants no more: the stream's reader must wake."""


async def wait_ready(dup: int, *, write: bool) -> None:
    """Until `dup` is readable (or writable). It must be a duplicate of a transport's fd, owned by the
    caller: the loop refuses to watch an fd one of its transports holds, even a paused one."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    try:
        if write:
            loop.add_writer(dup, wake)
        else:
            loop.add_reader(dup, wake)
        await ready
    finally:
        if write:
            loop.remove_writer(dup)
        else:
            loop.remove_reader(dup)
