"""How the server reaches a sandbox's daemon: channels the server makes, and the daemon's hello.

A `Channel` answers one question, "give me a connected stream to this sandbox's daemon, which
has proven who it is". Nothing here follows, opens or connects to a path the sandbox can write:

* `PairChannel` (bubblewrap): a socketpair; the daemon inherits its end at spawn (`--fd N`).
  No file at all; spent once its connection ends (the sandbox then restarts).
* `ListenerChannel` (Docker): the server listens on `executor.sock` in a server-only folder
  that the container sees read-only; the daemon dials in (`--dial`), and again after the server
  restarts. It proves itself with a secret the server wrote beside the socket (mode 0400),
  renewed at each listen, and the server checks the peer's cgroup (SO_PEERCRED) where it can.

* `TcpChannel` (`tcp_channel.py`, Docker with SANDBOX_TRANSPORT=tcp): the daemon listens on the
  sandbox's own address, the server dials it; both prove a per-sandbox secret (HMAC over a nonce
  from each side) before the hello.

Each `connect` returns a stream on which `handshake` has passed.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import json
import logging
import mmap
import os
import socket
import struct
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NamedTuple, cast

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.frame_pipe import SPLICE, FramePipe, FramePipes, PipeChunk, wait_ready

log = logging.getLogger(__name__)

SOCKET_NAME = "executor.sock"
SECRET_NAME = "secret"
HELLO_LIMIT = 4096
HELLO_TIMEOUT = 5.0
SOCKET_BUFFER = proto.WINDOW
"""A socketpair end's send buffer (the daemon's dialled end sets its own alike): a stream's window fits."""
MAX_HANDSHAKES = 4
"""Connections a listener lets say hello at once; more are closed at once (a dial flood costs nothing)."""


class ProtocolViolation(SandboxError):
    """The daemon broke the protocol: its session's request fails (502) and its channel is reset."""


class Frame(NamedTuple):
    """A binary frame: `data` on stream `stream` (empty: its sender's end of the stream).

    A long frame's `data` is a view of the buffer the transport read it into (`WireReader`),
    which is read into again once nothing refers to it: whoever keeps the bytes copies them
    (`bytes(data)`), or passes the view on without a copy and drops it when done. On a stream
    with a pipe (`WireReader.pipe`) it may be a `PipeChunk` (its bytes wait in the pipe), and one
    long frame may come as more than one `Frame`.
    """

    stream: int
    data: bytes | memoryview | PipeChunk


READ_MIN = 64 * 1024
"""The least room `WireReader` offers the transport for one read (it grows the buffer to keep it)."""
READ_BUFFER = 1 << 20
"""The buffer a `WireReader` starts with: a read can take several full frames at once."""
PAUSE_AT = 4 << 20
"""Bytes read and not yet parsed past which reading pauses, while nobody waits on `next()`."""
DIRECT_AT = 64 * 1024
"""A frame with this much still to come is read straight into a buffer of its own (no copy after)."""
PEEK_READ = 16 * 1024
"""The most read into the shared buffer right after a long frame: another long one is likely to
follow, and its header is all that needs to land there before the rest goes straight to its own.
Right after a frame that went into a pipe, the read takes only a header (`FRAME_HEADER`): the next
frame of that stream most likely goes into a pipe too, and what lands in the buffer with its header
would be copied twice (in, and into the pipe) where splicing moves it for nothing."""


SPARE_FRAMES = 8
"""Long frames' buffers (FRAME_MAX each) a thread keeps to read into again once nobody holds them."""
_spares = threading.local()
_FREE_REFS = 3
"""`sys.getrefcount` of a spare nobody holds: the spares' list, the loop's name, the call's argument."""


def _read_room(size: int) -> mmap.mmap:
    """A reader's buffer: an anonymous mapping, whose pages are resident only once written (a
    bytearray is zeroed at once, and a channel's 1 MiB was most of an idle session's server memory)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _frame_buffer(length: int) -> memoryview:
    """Room for a long frame: a spare buffer nobody holds any more (memory already mapped, and
    written over without zeroing), else a new one. A fresh 1 MiB bytearray costs 256 page faults,
    which were most of the server's system time in a download."""
    spares: list[bytearray] = _spares.__dict__.setdefault("buffers", [])
    for buf in spares:
        if sys.getrefcount(buf) == _FREE_REFS:  # no frame, view or reader refers to it
            return memoryview(buf)[:length]
    if len(spares) >= SPARE_FRAMES:
        return memoryview(bytearray(length))
    buf = bytearray(proto.FRAME_MAX)
    spares.append(buf)
    return memoryview(buf)[:length]


class WireReader:
    """JSON lines (none longer than `limit` bytes, which may change between lines) and binary frames.

    The transport reads straight into one buffer (`WireProtocol` is a `BufferedProtocol`), and
    `next()` parses in place, copying a short frame's bytes out once. A frame with at least
    `DIRECT_AT` bytes still to come gets a buffer of its own (a spare one nothing refers to any
    more, `_frame_buffer`), which the transport then reads the rest into: its bytes are never
    copied in this process. Right after a long frame a read
    takes only a little past the frame begun in the buffer (`PEEK_READ`), so that in a run of
    long frames (a download) each next one's rest goes to its own buffer rather than arriving
    whole in the shared one: ~12% less server CPU per MB (bench_preview, in one run).

    While nobody waits on `next()`, reading pauses once `PAUSE_AT` bytes wait to be parsed; a
    waiting `next()` always lets reading go on, since only a line within `limit` or a frame
    within `FRAME_MAX` may be incomplete, which bounds the buffer.
    """

    def __init__(self, limit: int = HELLO_LIMIT) -> None:
        self.limit = limit
        self._buf = _read_room(READ_BUFFER)
        self._start = self._end = 0  # bytes read and not yet parsed: _buf[_start:_end]
        self._scanned = 0  # _buf[_start:_scanned] holds no newline
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._frame: memoryview | None = None  # a long frame being read into its own buffer
        self._frame_stream = self._frame_filled = 0
        self._peek = 0  # the last frame was long: the next read into an empty buffer is this short
        self._transport: asyncio.Transport | None = None
        """(uvloop's transports are not registered as asyncio's classes: no isinstance checks on them)"""
        self._paused = False
        self._fd = -1
        """The socket's fd when it is a plain one (not TLS): long frames may be spliced off it."""
        self._pipes: dict[int, FramePipes] = {}
        self._splice: tuple[int, FramePipe, int, int] | None = None
        """A frame going into a pipe: (stream, pipe, bytes in it already, bytes to splice)."""
        self._ready: deque[Frame] = deque()  # the parts of a long frame split by a splice
        self.handed: deque[int] | None = None
        """Sockets the daemon handed over with its bytes (`HandingSocket`); None: this channel cannot."""

    @property
    def can_pipe(self) -> bool:
        """Whether `pipe` may be used: the connection is a plain socket."""
        return self._fd >= 0

    def pipe(self, stream: int, pipes: FramePipes) -> None:
        """From now on, a long frame of `stream` goes into one of `pipes` if it fits (see `frame_pipe`),
        until `unpipe` or their owner closes them."""
        self._pipes[stream] = pipes

    def unpipe(self, stream: int) -> None:
        """No more frames into `stream`'s pipes (their owner closes them)."""
        self._pipes.pop(stream, None)

    async def line(self) -> bytes | None:
        """The next line without its newline; None at a clean end; `ProtocolError` for a frame or past it."""
        item = await self.next()
        if isinstance(item, Frame):
            raise proto.ProtocolError("a binary frame where a line was due")
        return item

    async def next(self) -> bytes | Frame | None:
        """The next line (without its newline) or frame; None at a clean end; `ProtocolError` if malformed."""
        while True:
            if self._ready:
                return self._ready.popleft()
            item = self._parse()
            if item is not None:
                return item
            if self._splice is not None:
                await self._splice_frame(*self._splice)
                continue
            if self._error is not None:
                raise self._error
            if self._eof:
                if self._end > self._start or self._frame is not None:
                    raise proto.ProtocolError("the stream ended inside a line or frame")
                return None
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _parse(self) -> bytes | Frame | None:
        if self._frame is not None:  # it came before what the buffer holds
            if self._frame_filled < len(self._frame):
                return None
            frame, self._frame = Frame(self._frame_stream, self._frame), None
            return frame
        buf, start, end = self._buf, self._start, self._end
        if start == end:
            return None
        if buf[start] == proto.FRAME:
            if end - start < proto.FRAME_HEADER:
                return None
            stream, length = proto.parse_frame_header(buf[start : start + proto.FRAME_HEADER])
            stop = start + proto.FRAME_HEADER + length
            if end < stop:
                pipes = self._pipes.get(stream) if stop - end >= DIRECT_AT else None
                if pipes is not None and pipes.closed:  # their owner is done with them
                    del self._pipes[stream]
                pipe = pipes.take(length) if pipes is not None and not pipes.closed else None
                if pipe is not None:  # the frame goes into a pipe: what is here first, then the rest
                    with memoryview(buf) as view:
                        here = view[start + proto.FRAME_HEADER : end]
                        begun = pipe.put(here)
                        if begun == len(here):
                            self._splice = (stream, pipe, begun, stop - end)
                        else:  # its pages were fuller than counted: the pipe is full
                            if begun:
                                self._ready.append(Frame(stream, PipeChunk(pipe, begun)))
                            self._ready.append(Frame(stream, bytes(here[begun:])))
                            self._frame = _frame_buffer(stop - end)
                            self._frame_stream, self._frame_filled = stream, 0
                    self._consume(end)
                    return None
                if stop - end >= DIRECT_AT:  # the rest goes straight into a buffer of its own
                    self._frame = _frame_buffer(length)
                    self._frame_stream, self._frame_filled = stream, end - start - proto.FRAME_HEADER
                    with memoryview(buf) as view:
                        self._frame[: self._frame_filled] = view[start + proto.FRAME_HEADER : end]
                    self._consume(end)
                return None
            with memoryview(buf) as view:  # the one copy of a frame's bytes
                data = bytes(view[start + proto.FRAME_HEADER : stop])
            self._consume(stop)
            self._peek = PEEK_READ if length >= DIRECT_AT else 0
            return Frame(stream, data)
        newline = buf.find(b"\n", max(self._scanned, start), end)
        if newline < 0:
            self._scanned = end
            if end - start > self.limit:
                raise proto.ProtocolError(f"a line longer than {self.limit} bytes")
            return None
        if newline - start > self.limit:
            raise proto.ProtocolError(f"a line of {newline - start} bytes (the limit is {self.limit})")
        with memoryview(buf) as view:
            line = bytes(view[start:newline])
        self._consume(newline + 1)
        return line

    async def _splice_frame(self, stream: int, pipe: FramePipe, begun: int, rest: int) -> None:
        """Splice a long frame's `rest` from the socket into `pipe`, behind the `begun` bytes put there
        (the transport pauses meanwhile); what the pipe cannot take once it fills comes after it as
        bytes, read as a long frame's.

        It splices from a duplicate of the socket's fd, made while the transport is open: were the
        transport closed during a wait, its fd's number could be another socket's by then."""
        transport = self._transport
        assert transport is not None
        self._splice, spliced = None, 0
        if transport.is_closing():
            self._error = ConnectionResetError("the connection closed inside a frame")
            return
        fd = os.dup(self._fd)
        pipe.busy = True
        transport.pause_reading()
        try:
            while spliced < rest:
                try:
                    n = os.splice(fd, pipe.write_end, rest - spliced, flags=SPLICE)
                except BlockingIOError:
                    if pipe.full():
                        break
                    await wait_ready(fd, write=False)
                    continue
                if not n:
                    raise proto.ProtocolError("the stream ended inside a frame")
                spliced += n
        except OSError as exc:
            self._error = exc
            return
        finally:
            os.close(fd)
            pipe.release()
            if not self._paused:
                transport.resume_reading()
        if begun + spliced and not pipe.closed:  # (closed: its owner let go of the stream meanwhile)
            self._ready.append(Frame(stream, PipeChunk(pipe, begun + spliced)))
        if spliced < rest:
            self._frame = _frame_buffer(rest - spliced)
            self._frame_stream, self._frame_filled = stream, 0
        else:
            self._peek = proto.FRAME_HEADER

    def _consume(self, upto: int) -> None:
        self._start = self._scanned = upto
        if upto == self._end:
            self._start = self._end = self._scanned = 0

    # --- the transport's side (`WireProtocol`) ---

    def _get_buffer(self, need: int = READ_MIN) -> memoryview:
        """Where the next read goes: the rest of a long frame, or the buffer's free tail (at least
        `need` bytes, made by moving or growing); right after a long frame, only what completes
        the frame begun in the buffer and `PEEK_READ` more."""
        if self._frame is not None and self._frame_filled < len(self._frame):
            return self._frame[self._frame_filled :]
        if len(self._buf) - self._end < need:
            held = self._end - self._start
            if self._start:  # move what is left to the front (usually the start of one frame)
                self._buf[:held] = self._buf[self._start : self._end]
                self._scanned -= self._start
                self._start, self._end = 0, held
            if len(self._buf) - held < need:  # a long line or frame: more room
                grown = _read_room(len(self._buf) + max(len(self._buf), need))
                grown[:held] = self._buf[:held]  # a new one: the old may still be lent to a read
                self._buf = grown
        room = len(self._buf) - self._end
        if self._peek:
            room = min(room, self._frame_rest() + self._peek)
        return memoryview(self._buf)[self._end : self._end + room]

    def _frame_rest(self) -> int:
        """Bytes the frame begun in the buffer still lacks (0 if the buffer holds no frame's header)."""
        start = self._start
        if self._end - start < proto.FRAME_HEADER or self._buf[start] != proto.FRAME:
            return 0
        length = int.from_bytes(self._buf[start + 5 : start + proto.FRAME_HEADER], "big")
        # (one past FRAME_MAX is `_parse`'s to refuse: a transport's get_buffer must not raise)
        return max(start + proto.FRAME_HEADER + min(length, proto.FRAME_MAX) - self._end, 0)

    def _updated(self, n: int) -> None:
        if self._frame is not None and self._frame_filled < len(self._frame):
            self._frame_filled += n
            self._peek = PEEK_READ if self._frame_filled == len(self._frame) else 0
        else:
            self._end += n
            if self._peek and self._frame_rest() >= DIRECT_AT and self._transport is not None:
                # A long frame's header is in: its rest is for `_parse` to place (its own buffer,
                # or a pipe), not for the next read, which may come before `_parse` runs.
                self._paused = True
                self._transport.pause_reading()
            self._peek = 0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif (  # nobody waits, or a woken reader has not run yet: bound what piles up meanwhile
            self._end - self._start > PAUSE_AT and not self._paused and self._transport is not None
        ):
            self._paused = True
            self._transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        """`data` from a transport that does not read into buffers."""
        while data:
            with self._get_buffer() as view:
                n = min(len(view), len(data))
                view[:n] = data[:n]
            self._updated(n)
            data = data[n:]

    def _ended(self, error: BaseException | None) -> None:
        if error is None:
            self._eof = True
        elif self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class WireProtocol(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """The daemon channel's protocol: reads go into `wire` (a `WireReader`); writes through a StreamWriter.

    It is a `StreamReaderProtocol` for the writer's sake (drain, close waiting); its stream reader
    only ever learns that the connection ended. `connected`, if given, runs as a task once the
    connection is made, with the reader and a writer (a listener's accepted connection).
    """

    def __init__(
        self,
        wire: WireReader,
        connected: Callable[[WireReader, asyncio.StreamWriter], Awaitable[None]] | None = None,
    ) -> None:
        self.wire = wire
        loop = asyncio.get_running_loop()
        self._ends = asyncio.StreamReader(loop=loop)
        callback = (lambda _reader, writer: connected(wire, writer)) if connected is not None else None
        super().__init__(self._ends, callback, loop=loop)

    def writer(self, transport: asyncio.BaseTransport) -> asyncio.StreamWriter:
        """A writer for a connection this side dialled (an accepted one gets its own in `connected`)."""
        return asyncio.StreamWriter(
            cast(asyncio.Transport, transport), self, self._ends, asyncio.get_running_loop()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.wire._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self.wire._fd = sock.fileno()
            if isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop):  # it reads through our
                self.wire.handed = _HANDED.get(self.wire._fd)  # socket object (uvloop reads the fd itself)
        super().connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.wire._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.wire._updated(nbytes)

    def data_received(self, data: bytes) -> None:
        self.wire._feed(data)

    def eof_received(self) -> bool:
        self.wire._ended(None)
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self.wire._ended(exc)
        super().connection_lost(exc)


async def dial(
    connect: Callable[[Callable[[], WireProtocol]], Awaitable[tuple[asyncio.BaseTransport, Any]]],
    limit: int = HELLO_LIMIT,
) -> Stream:
    """A stream over the connection `connect` makes with the protocol factory it is given."""
    wire = WireReader(limit)
    transport, protocol = await connect(lambda: WireProtocol(wire))
    return wire, cast(WireProtocol, protocol).writer(transport)


Stream = tuple[WireReader, asyncio.StreamWriter]


def decode(line: bytes) -> Any:
    """One JSON value; `ProtocolError` for anything else (bad UTF-8, absurd nesting, huge numbers)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise proto.ProtocolError(f"a line that is not JSON ({type(exc).__name__})") from None


def send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write((json.dumps(msg, ensure_ascii=False) + "\n").encode())


async def handshake(stream: Stream, secret: str | None, within: float) -> dict[str, Any]:
    """Read and check the daemon's hello (version; `secret` unless None), then welcome it."""
    lines, writer = stream
    try:
        line = await asyncio.wait_for(lines.line(), within)
        if line is None:
            raise proto.ProtocolError("the daemon closed the connection before its hello")
        hello = proto.check_hello(decode(line))
        if secret is not None and not hmac.compare_digest(hello["secret"].encode(), secret.encode()):
            raise proto.ProtocolError("the daemon's hello carries the wrong secret")
    except proto.ProtocolError as exc:
        send(writer, {"type": "reject", "error": str(exc)})
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raise
    send(writer, {"type": "welcome", "version": proto.VERSION})
    return hello


class Channel(abc.ABC):
    """One sandbox's way to its daemon."""

    reconnects: ClassVar[bool]
    """Whether a lost connection can come back without restarting the sandbox."""

    @abc.abstractmethod
    async def connect(self, within: float) -> Stream:
        """A stream to the daemon, past its hello; `Unavailable` if none within `within` seconds."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the channel holds (a listening socket); `connect` may open it again."""


HANDED_MAX = 8
"""Handed-over sockets a channel holds before its reader closes the next ones that come."""
_HANDED: dict[int, deque[int]] = {}
"""Each open `HandingSocket`'s fds received, by its fileno (how a `WireProtocol` finds them)."""


class HandingSocket(socket.socket):
    """A unix socket whose reads also take the fds its peer sends with its bytes (SCM_RIGHTS).

    asyncio's transport reads through `recv_into`; every fd that comes lands in `handed` (at most
    HANDED_MAX: past that the oldest is closed), for `ExecutorClient.handed` to take and check. Until
    then they are only numbers: nothing here reads, writes or trusts them. Closing the socket
    closes those nobody took.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed: deque[int] = deque()
        _HANDED[self.fileno()] = self.handed

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        got, ancillary, _flags, _address = self.recvmsg_into(
            [view[:nbytes] if nbytes else view], _ANCILLARY, flags
        )
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in _FD.iter_unpack(data[: len(data) - len(data) % _FD.size]):
                    if len(self.handed) >= HANDED_MAX:  # the oldest: most likely one given up on
                        os.close(self.handed.popleft())
                    self.handed.append(fd)
        return got

    def close(self) -> None:
        if _HANDED.get(self.fileno()) is self.handed:
            del _HANDED[self.fileno()]
        while self.handed:
            os.close(self.handed.popleft())
        super().close()

    @classmethod
    def taking(cls, sock: socket.socket) -> HandingSocket:
        """`sock` (a unix socket) as one of these: the same connection, `sock` detached."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())


class HandingListener(socket.socket):
    """A listening unix socket whose accepted connections are `HandingSocket`s."""

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]  # what socket.accept itself calls
        sock = HandingSocket(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, address


_FD = struct.Struct("i")
_ANCILLARY = socket.CMSG_SPACE(HANDED_MAX * _FD.size)
"""Room for the fds one read may bring (the kernel closes any past it, MSG_CTRUNC)."""


class PairChannel(Channel):
    """A socketpair made before the sandbox starts; the daemon inherits one end."""

    reconnects = False

    def __init__(self) -> None:
        self._ours: socket.socket | None = None
        self._theirs: socket.socket | None = None

    def daemon_fd(self) -> int:
        """A new pair's daemon end, to pass to the sandbox's process; `spawned()` closes our copy."""
        self.discard()
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (self._ours, self._theirs):  # room for a few frames each way: fewer wake-ups per MB
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        return self._theirs.fileno()

    def spawned(self) -> None:
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None

    def discard(self) -> None:
        self.spawned()
        if self._ours is not None:
            self._ours.close()
            self._ours = None

    async def connect(self, within: float) -> Stream:
        ours, self._ours = self._ours, None
        if ours is None:
            raise Unavailable("the sandbox's channel is closed: the sandbox must start again")
        sock = HandingSocket.taking(ours)
        loop = asyncio.get_running_loop()
        stream = await dial(lambda factory: loop.create_unix_connection(factory, sock=sock))
        writer = stream[1]
        try:
            await handshake(stream, None, within)
        except BaseException:
            writer.close()
            raise
        return stream

    async def close(self) -> None:
        self.discard()
