"""`ExecutorClient`: one connection to a daemon, whose every message is checked before it is believed.

The daemon runs where the sandbox's root can replace or trace it, so what it sends is untrusted
input: each line is bounded (`WireReader`, the limit widened only while a request that may answer
at length is in flight), each message must match `executor_proto`'s tables, exit notices pass
a token bucket (a flood is dropped with a warning, never queued), and a stream's bytes may never
run past the credit given (`ByteStream`: at most `WINDOW` bytes of one stream are ever held).
A violation closes the connection and fails its requests with `ProtocolViolation` (502); only
that session is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from crogia.buckets import TokenBucket
from crogia.errors import Conflict, CrogiaError, InvalidInput, NotFound, SandboxError, TooLarge, Unavailable
from crogia.sandbox.base import ExitListener
from crogia.sandbox.channel import Frame, ProtocolViolation, Stream, decode, send
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.frame_pipe import FramePipes, PipeChunk, Sink
from crogia.sandbox.pty_channel import PTY_PUSHES, PtyRouter
from crogia.sandbox.tunnel_socket import handed

log = logging.getLogger(__name__)

LINE_BASE = 1 << 20
"""Longest line the server reads when no request that may answer at length is in flight."""
EXIT_BURST, EXIT_RATE = 1024, 100.0
"""Exit notices a connection may send at once, and per second after that (legit: one per spawn)."""

_ERRORS: dict[str, type[CrogiaError]] = {
    "not_found": NotFound,
    "bad_request": InvalidInput,
    "conflict": Conflict,
    "too_large": TooLarge,
    "unavailable": Unavailable,
}
CANCELLABLE = frozenset({"exec", "fs_rg"})
"""Ops the daemon is told to stop when their caller gives up on them."""


def _error_from(code: str, message: str) -> CrogiaError:
    return _ERRORS.get(code, SandboxError)(message or "the sandbox's executor failed", code=code)


CLOSE_WAIT = 1.0
"""Seconds `close()` lets what is queued for the daemon go out before it drops the connection."""
SMALL_FRAME = 64 * 1024
"""A frame this short is written with its header in one piece."""
CREDIT_BATCH = proto.WINDOW // 4
"""Consumed bytes of a stream credited back in one message (the sender has the rest of its window)."""


class ByteStream:
    """One binary stream of a request, both ways, within the protocol's flow control.

    Read with `read()` (or set `on_data` to be handed each chunk as it comes), write with
    `write()`, end our side with `end()`, abort both with `reset()`. Unless opened `lasting`, the
    request's reply ends the stream. Leaving `async with` before the stream is over resets it.
    """

    def __init__(self, client: ExecutorClient, sid: int, lasting: bool) -> None:
        self.id = sid
        self.lasting = lasting
        self.on_data: Callable[[bytes], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self._client = client
        self._chunks: deque[bytes | memoryview | PipeChunk] = deque()
        self._held = 0  # received, not yet consumed
        self._outstanding = 0  # received, not yet credited back (the sender's window in use)
        self._uncredited = 0  # consumed, not yet credited back
        self._credit = proto.WINDOW  # what we may still send
        self._changed = asyncio.Event()
        self._their_end = self._our_end = False
        self._error: CrogiaError | None = None
        self._aborted = False
        self._sink: Sink | None = None  # armed while `read_view` waits with one

    @property
    def held(self) -> int:
        """Bytes received and not yet read."""
        return self._held

    @property
    def their_end(self) -> bool:
        """The daemon sent its end of the stream."""
        return self._their_end

    @property
    def over(self) -> bool:
        """True once both sides ended it, or it was reset, failed or lost."""
        return self._error is not None or (self._their_end and self._our_end)

    async def read(self) -> bytes:
        """The next bytes; b"" at the daemon's end; raises once the stream failed (dropping what it held)."""
        chunk = await self.read_view()
        return chunk if isinstance(chunk, bytes) else bytes(chunk)

    def pipe_frames(self) -> FramePipes | None:
        """From now on its long frames may wait in pipes, and `read_view` give them as `PipeChunk`s
        (see `frame_pipe`): the pipes, which the caller closes once done with the stream; None when
        the connection cannot splice (TLS)."""
        lines = self._client._lines
        if self.over or not lines.can_pipe:
            return None
        pipes = FramePipes()
        lines.pipe(self.id, pipes)
        return pipes

    def take_view(self) -> bytes | memoryview | PipeChunk | None:
        """`read_view()` without waiting: the next bytes if some are here (and all is well), else None."""
        if not self._chunks or self._error is not None:
            return None
        chunk = self._chunks.popleft()
        self._consumed(len(chunk))
        return chunk

    async def read_view(self, sink: Sink | None = None) -> bytes | memoryview | PipeChunk:
        """`read()`, but a long frame's bytes come as a view of the buffer they were read into (no copy),
        or as a `PipeChunk` after `pipe_frames`.

        With a `sink`, a long frame that comes while this waits goes to it first, there and then
        (in the channel's reader): this returns only with what it did not take, or b"" once it is
        `full` (or at the daemon's end). What it took is consumed and credited as if read."""
        while not self._chunks or self._error is not None:
            if self._error is not None:
                raise self._error
            if self._their_end or (sink is not None and sink.full):
                return b""
            self._changed.clear()
            self._sink = sink
            try:
                await self._changed.wait()
            finally:
                self._sink = None
        chunk = self.take_view()
        assert chunk is not None  # a chunk is here and the stream is well
        return chunk

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` in frames, waiting for credit; raises if the stream failed or was reset."""
        view = memoryview(data)
        client = self._client
        while view:
            while self._credit <= 0 and self._error is None:
                self._changed.clear()
                await self._changed.wait()
            if self._error is not None:
                raise self._error
            if self._our_end:
                raise InvalidInput("the stream's end was already sent")
            piece = view[: min(self._credit, proto.FRAME_MAX)]
            view = view[len(piece) :]
            self._credit -= len(piece)
            client._send_frame(self.id, piece)
            await client._drain()

    async def end(self) -> None:
        """Send our end of the stream (once)."""
        if not self._our_end and self._error is None:
            self._our_end = True
            self._client._send_frame(self.id, b"")
            await self._client._drain()
            self._maybe_over()

    async def reset(self) -> None:
        """Abort the stream both ways (nothing if it ended both ways, or is already reset)."""
        if self._abort():
            with contextlib.suppress(Unavailable):
                await self._client._drain()

    def abort(self) -> None:
        """`reset()` from a callback: the same, without waiting for the socket to drain."""
        self._abort()

    def listen(self, on_data: Callable[[bytes], None]) -> None:
        """Push mode from now on: `on_data` gets what arrived already, then each chunk as it comes."""
        self.on_data = on_data
        while self._chunks:
            chunk = self._chunks.popleft()
            self._client._call(on_data, bytes(chunk))
            self._consumed(len(chunk))

    def _abort(self) -> bool:
        """Tell the daemon to drop the stream unless it is over by agreement; True if told."""
        if self._aborted or (self._their_end and self._our_end):
            return False
        self._aborted = True
        error = Unavailable("the stream was reset")
        self._fail(error)
        reply = self._client._pending.pop(self.id, None)  # its reply, if it still comes, is not waited for
        if reply is not None and not reply.done():
            reply.set_exception(error)
            reply.exception()  # retrieved: a caller that left does not have to
        if self._client.closed:
            return False
        send(self._client._writer, {"op": "reset", "stream": self.id})
        return True

    async def __aenter__(self) -> ByteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.reset()

    def _consumed(self, n: int) -> None:
        self._held -= n
        self._uncredited += n
        if self._uncredited >= CREDIT_BATCH:
            if not self._client.closed and not self.over:
                send(self._client._writer, {"op": "credit", "stream": self.id, "bytes": self._uncredited})
            self._outstanding -= self._uncredited
            self._uncredited = 0

    def _feed(self, data: bytes | memoryview | PipeChunk) -> None:
        if self._error is not None:
            return
        if not data:
            self._their_end = True
            self._changed.set()
            self._maybe_over()
            return
        if self._their_end:
            raise proto.ProtocolError(f"bytes on stream {self.id} after its end")
        self._held += len(data)
        self._outstanding += len(data)
        if self._outstanding > proto.WINDOW:
            raise proto.ProtocolError(f"stream {self.id} ran past its window")
        if self.on_data is not None:
            self._client._call(self.on_data, bytes(data))
            self._consumed(len(data))
            return
        sink = self._sink
        if sink is not None and not self._chunks and not isinstance(data, bytes):
            moved = sink(data)  # (nothing is queued, and the waiting reader holds nothing to go first)
            if moved:
                self._consumed(moved)
                if moved == len(data):
                    if sink.full:
                        self._changed.set()
                    return
                data = data.after(moved) if isinstance(data, PipeChunk) else data[moved:]
        self._chunks.append(data)
        self._changed.set()

    def _credited(self, n: int) -> None:
        self._credit = min(self._credit + n, proto.WINDOW)
        self._changed.set()

    def _replied(self, error: CrogiaError | None) -> None:
        """The request's reply came: unless lasting (or it failed), the stream is over."""
        if error is not None:
            self._fail(error)
        elif not self.lasting:
            self._their_end = self._our_end = True
            self._changed.set()
            self._maybe_over()

    def _fail(self, error: CrogiaError) -> None:
        if self._error is None and not self.over:
            self._error = error
            self._chunks.clear()
            self._changed.set()
            self._maybe_over()

    def _maybe_over(self) -> None:
        if self.over and self._client._streams.pop(self.id, None) is not None:
            self._client._lines.unpipe(self.id)
            self._client._call(self.on_end)


class ExecutorClient:
    """One connection to an executor daemon, multiplexing requests by id.

    A single owned reader task routes replies to their waiting futures, streamed chunks to
    their `on_chunk` callbacks and exit notices to the exit listener.
    """

    def __init__(self, stream: Stream) -> None:
        self._lines, self._writer = stream
        self._lines.limit = LINE_BASE
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ops: dict[int, str] = {}
        self._allowances: dict[int, int] = {}
        self._chunks: dict[int, Callable[[str], None]] = {}
        self._streams: dict[int, ByteStream] = {}
        self._exit_listener: ExitListener | None = None
        self._exits = TokenBucket(EXIT_BURST, EXIT_RATE)
        self._closed = False
        self.ptys = PtyRouter()
        """The terminals opened over this connection (they end with it)."""
        self._reader_task = asyncio.create_task(self._read_loop(), name="executor-reader")

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost (or its transport is going: a dropped TCP link)."""
        return self._closed or self._writer.is_closing()

    def set_exit_listener(self, listener: ExitListener | None) -> None:
        self._exit_listener = listener

    async def request(
        self, op: str, *, on_chunk: Callable[[str], None] | None = None, allow: int = 0, **args: Any
    ) -> dict[str, Any]:
        """Send one request and wait for its checked reply values; raises `CrogiaError` subclasses.

        `allow`: how long a line this request's reply (or chunk) may be beyond `LINE_BASE`.
        If the caller is cancelled while an `exec` is in flight, the daemon is told to kill it.
        """
        rid, future = self._register(op, on_chunk, allow)
        try:
            send(self._writer, {"id": rid, "op": op, **args})
            await self._writer.drain()
            return await future
        except asyncio.CancelledError:
            # Cancelling our task cancels `future` too, so only a real reply means it finished.
            answered = future.done() and not future.cancelled()
            if op in CANCELLABLE and not answered and not self._closed:
                send(self._writer, {"id": next(self._ids), "op": "cancel", "target": rid})
            raise
        except ConnectionError as exc:
            raise Unavailable("lost the connection to the sandbox's executor") from exc
        finally:
            self._unregister(rid)

    async def open_stream(
        self, op: str, *, lasting: bool = False, allow: int = 0, **args: Any
    ) -> tuple[ByteStream, asyncio.Future[dict[str, Any]]]:
        """Send a request that opens a byte stream (its id the request's); the stream and its reply.

        The reply is a future of the checked values (`request()`'s); unless `lasting`, it ends
        the stream. Cancelling the caller, or leaving the stream's `async with`, resets it.
        """
        rid, future = self._register(op, None, allow)
        stream = self._streams[rid] = ByteStream(self, rid, lasting)

        def done(future: asyncio.Future[dict[str, Any]]) -> None:
            self._unregister(rid)
            if future.cancelled():  # a reply is handed to the stream as it is read (`_dispatch`)
                stream._abort()
            else:
                future.exception()  # its error also reaches the stream's reader: one who never asks is fine

        future.add_done_callback(done)
        try:
            send(self._writer, {"id": rid, "op": op, **args})
            await self._writer.drain()
        except BaseException as exc:
            if not future.done():
                future.cancel()
            if isinstance(exc, ConnectionError):
                raise Unavailable("lost the connection to the sandbox's executor") from exc
            raise
        return stream, future

    @property
    def hands_over(self) -> bool:
        """Whether the daemon can hand sockets over on this channel (a local unix one, asyncio's loop)."""
        return self._lines.handed is not None and not self._closed

    async def hand_over(self, port: int) -> socket.socket:
        """A socket connected to `port` inside the sandbox, handed over by the daemon (`tunnel_socket`).

        Raises as `request` does (code `refused`: nobody listens; `bad_request`: this daemon or
        channel cannot); a reply without the socket it names is a protocol violation (502, reset)."""
        reply = await self.request("tunnel_handoff", port=port)
        fds = self._lines.handed
        sock = handed(fds, port, reply["local"]) if fds is not None else None
        if sock is None:
            log.warning("the executor's handed-over socket was missing or not the one named; resetting")
            self._writer.transport.abort()
            raise ProtocolViolation("the sandbox's executor broke the protocol: no such socket handed over")
        return sock

    def _register(
        self, op: str, on_chunk: Callable[[str], None] | None, allow: int
    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        if self._closed:
            raise Unavailable("the connection to the sandbox's executor is closed")
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._ops[rid] = op
        if allow:
            self._allowances[rid] = allow
            self._lines.limit = LINE_BASE + max(self._allowances.values())
        if on_chunk is not None:
            self._chunks[rid] = on_chunk
        return rid, future

    def _unregister(self, rid: int) -> None:
        self._pending.pop(rid, None)
        self._ops.pop(rid, None)
        self._chunks.pop(rid, None)
        if self._allowances.pop(rid, None) is not None:
            self._lines.limit = LINE_BASE + max(self._allowances.values(), default=0)

    def _send_frame(self, sid: int, data: bytes | memoryview) -> None:
        if self._closed:
            raise Unavailable("the connection to the sandbox's executor is closed")
        header = proto.frame_header(sid, len(data))
        if len(data) <= SMALL_FRAME:  # one write, one wake-up of the daemon (copying it costs less)
            self._writer.write(header + data)
        else:
            self._writer.writelines((header, data))

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise Unavailable("lost the connection to the sandbox's executor") from exc

    async def _read_loop(self) -> None:
        error: CrogiaError = Unavailable("lost the connection to the sandbox's executor")
        try:
            while (item := await self._lines.next()) is not None:
                if isinstance(item, Frame):
                    stream = self._streams.get(item.stream)
                    if stream is not None:  # else: one reset or given up on (a race, not an error)
                        stream._feed(item.data)
                else:
                    self._dispatch(decode(item))
        except proto.ProtocolError as exc:
            log.warning("the executor broke the protocol, closing its connection: %s", exc)
            error = ProtocolViolation(f"the sandbox's executor broke the protocol: {exc}")
        except ConnectionError as exc:
            log.warning("executor connection broke: %s", exc)
        finally:
            self._closed = True
            self._writer.close()
            self._fail_pending(error)
            self._fail_streams(error)
            self.ptys.end_all()

    def _dispatch(self, msg: Any) -> None:
        kind = proto.check_message(msg)
        if kind == "result":
            future = self._pending.get(msg["id"])
            if future is None or future.done():
                return  # the answer to a request given up on
            stream = self._streams.get(msg["id"])
            if msg["ok"]:
                future.set_result(proto.check_result(self._ops[msg["id"]], msg))
                if stream is not None:
                    stream._replied(None)
            else:
                error = _error_from(*proto.check_error(msg))
                future.set_exception(error)
                if stream is not None:
                    stream._replied(error)
        elif kind == "chunk":
            self._call(self._chunks.get(msg["id"]), msg["data"])
        elif kind == "credit":
            if (stream := self._streams.get(msg["stream"])) is not None:
                stream._credited(msg["bytes"])
        elif kind == "reset":
            if (stream := self._streams.get(msg["stream"])) is not None:
                stream._fail(Unavailable("the sandbox's executor reset the stream"))
        elif kind in PTY_PUSHES:
            self.ptys.dispatch(msg)  # a malformed push raises ProtocolError: the connection resets
        elif kind == "exit" and self._exit_listener is not None:
            if self._exits.take():
                self._call(self._exit_listener, msg["pid"], msg["exit_code"])
            elif time.monotonic() - self._exits.warned > 10:
                self._exits.warned = time.monotonic()
                log.warning("executor exit notices over %g/s: %d dropped", EXIT_RATE, self._exits.dropped)

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # a faulty listener must not break the connection for everyone
            log.exception("executor listener %r failed", callback)

    def _fail_pending(self, error: CrogiaError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    def _fail_streams(self, error: CrogiaError) -> None:
        for stream in list(self._streams.values()):
            stream._fail(error)

    async def close(self) -> None:
        """Close the connection; pending requests and open streams fail with `Unavailable`."""
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_WAIT)
        self._writer.transport.abort()  # a daemon that stopped reading would hold a close open forever
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        closed = Unavailable("the connection to the sandbox's executor was closed")
        self._fail_pending(closed)
        self._fail_streams(closed)
