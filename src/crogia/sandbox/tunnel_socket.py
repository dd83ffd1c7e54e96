"""A tunnel that is the sandbox's socket itself, handed over by the daemon (`tunnel_handoff`).

On a local unix channel the daemon connects to the port as for `tunnel_open`, then sends the
connected socket with its reply (SCM_RIGHTS) and keeps no copy: the server speaks to the port
directly, one relay (and one process's wake-ups) fewer for every byte. What arrives is only an fd
number until `checked_socket` has made sure it is what the reply says: a TCP socket, not listening,
connected to the loopback address and port asked for, from the local port the reply names. Anything
else is closed unread, and the channel resets as for any other lie (`ExecutorClient`).

Taking the socket gives the server nothing the daemon's relay did not: the bytes on it are the
sandbox's as before, the connection lives in the sandbox's network namespace (its traffic goes
nowhere the sandbox could not send it), and the daemon, which may hold a duplicate, could write to
the sandbox's server or read from it anyway. The flow control is the socket's own (reading pauses
past `window` bytes held); `SocketTunnel` offers the `Tunnel` methods the preview proxy uses, and
`relay`: a large body moved socket to socket by a thread that waits in the kernel, as a bare relay
does (the event loop's way of waiting cost the server about twice the CPU per byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import select
import socket
import threading
from collections import deque

from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.frame_pipe import PipeChunk, Sink
from crogia.sandbox.tunnel_channel import Tunnel, TunnelClosed

RELAYS_MAX = 32
"""Relay threads at once (`SocketTunnel.relay`); past that, bodies go the event loop's way."""
_relays = 0
READ_SIZE = proto.FRAME_MAX
"""The most one read takes (into a buffer reused from read to read)."""


def checked_socket(fd: int, port: int, local: int) -> socket.socket | None:
    """`fd` as a non-blocking TCP socket connected to loopback `port` from `local`; else None (closed).

    `socket.socket(fileno=)` asks the kernel for the fd's family, type and protocol
    (getsockopt, which answers ENOTSOCK for anything but a socket without touching a file)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        with contextlib.suppress(OSError):
            socket.close(fd)
        return None
    try:
        peer, own = sock.getpeername(), sock.getsockname()
        good = (
            sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM
            and sock.proto in (0, socket.IPPROTO_TCP)
            and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            and own[1] == local
            and peer[1] == port
            and ipaddress.ip_address(peer[0].split("%")[0]).is_loopback
        )
    except (OSError, ValueError, IndexError, TypeError):
        good = False
    if not good:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


class _Reader(asyncio.BufferedProtocol):
    """The socket's bytes, queued (at most about `window`: reading pauses past it) or sunk."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.chunks: deque[bytes] = deque()
        self.held = 0
        self.eof = False
        self.error: Exception | None = None
        self.sink: Sink | None = None
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)
        self._paused = self._write_paused = False
        self._drained = asyncio.Event()
        self._drained.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._view[:nbytes]
        sink = self.sink
        if sink is not None and not self.chunks:  # straight on (the lane): only the rest is queued
            moved = sink(data)
            data = data[moved:]
            if sink.full:
                self.changed.set()
        if data:
            self.chunks.append(bytes(data))
            self.held += len(data)
            self.changed.set()
            if self.held >= self.window and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return True  # keep our side open: a request may still be going out

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = exc
        self.eof = True
        self.changed.set()
        self._drained.set()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()

    def take(self) -> bytes | None:
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        self.held -= len(chunk)
        if self._paused and self.held < self.window // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def drained(self) -> None:
        await self._drained.wait()


class SocketTunnel:
    """The handed-over socket as a tunnel (`tunnel_channel.Tunnel`'s methods, the same meanings)."""

    window = proto.WINDOW

    def __init__(self, transport: asyncio.Transport, reader: _Reader) -> None:
        self._transport, self._reader = transport, reader

    @classmethod
    async def over(cls, sock: socket.socket) -> SocketTunnel:
        """A tunnel over `sock` (a checked, connected socket; it is the tunnel's from now on)."""
        loop = asyncio.get_running_loop()
        try:
            transport, reader = await loop.create_connection(lambda: _Reader(cls.window), sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(transport, reader)

    async def connected(self) -> None:
        """At once: the daemon connected it before handing it over."""

    @property
    def buffered(self) -> int:
        return self._reader.held

    @property
    def ended(self) -> bool:
        return self._reader.eof or self._transport.is_closing()

    def _failed(self) -> TunnelClosed:
        error = self._reader.error
        return TunnelClosed(f"the connection to the sandbox's server failed: {error or 'closed'}")

    async def read(self) -> bytes:
        chunk = await self.read_view()
        return chunk if isinstance(chunk, bytes) else bytes(chunk)  # (never a PipeChunk here)

    def pipe_frames(self) -> bool:
        return False  # the socket's bytes come here as they are

    async def read_view(self, sink: Sink | None = None) -> bytes | memoryview | PipeChunk:
        reader = self._reader
        while True:
            chunk = reader.take()
            if chunk is not None:
                return chunk
            if reader.error is not None:
                raise self._failed()
            if reader.eof or (sink is not None and sink.full):
                return b""
            if self._transport.is_closing():
                raise self._failed()
            reader.changed.clear()
            reader.sink = sink
            try:
                await reader.changed.wait()
            finally:
                reader.sink = None

    def take_view(self) -> bytes | memoryview | PipeChunk | None:
        return self._reader.take()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport.is_closing():
            raise self._failed()
        self._transport.write(data)
        await self._reader.drained()
        if self._reader.error is not None:
            raise self._failed()

    async def close(self) -> None:
        self._transport.abort()  # (idempotent) never waits on the sandbox's server

    async def relay(self, to: int, count: int, idle: float) -> tuple[int, bool]:
        """Move up to `count` bytes from the socket to the socket `to` (the client's, lent) in a thread
        of its own that waits in the kernel, as a bare relay does: how many went, and whether every
        byte read went (False: the body must be cut short). Returns early at the sandbox's end, after
        `idle` seconds with no byte either way, or when either side fails; bytes queued here must
        have been taken first. At most RELAYS_MAX run at once (past that: (0, True) at once).

        The thread works on duplicates of both sockets that it alone owns and closes, so nothing
        this side closes (the tunnel, the lent socket) can turn into another connection under it.
        Cancelling this stops it (`_Relay.stop`) and aborts the tunnel, without waiting for it."""
        global _relays
        transport = self._transport
        sock = transport.get_extra_info("socket")
        if sock is None or self._reader.chunks or self.ended or _relays >= RELAYS_MAX:
            return 0, True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, bool]] = loop.create_future()
        job = _Relay(sock.fileno(), to)

        def settle(result: tuple[int, bool]) -> None:
            if not done.done():
                done.set_result(result)

        def run() -> None:
            result = (0, False)
            try:
                result = job.run(count, idle)
            finally:
                job.close()
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                    loop.call_soon_threadsafe(settle, result)

        transport.pause_reading()
        _relays += 1
        try:
            try:
                threading.Thread(target=run, name="preview-relay", daemon=True).start()
            except RuntimeError:  # no thread to be had: the event loop's way, then
                job.close()
                return 0, True
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            job.stop()
            transport.abort()  # the thread may still read it for a moment: nobody else will
            raise
        finally:
            _relays -= 1
            if not transport.is_closing():
                transport.resume_reading()


class _Relay:
    """A relay thread's own duplicates of its two sockets and its stop eventfd (`SocketTunnel.relay`)."""

    def __init__(self, source: int, to: int) -> None:
        self.src = socket.socket(fileno=os.dup(source))
        self.dst = socket.socket(fileno=os.dup(to))
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stopped = self.closed = False
        self._lock = threading.Lock()

    def stop(self) -> None:
        """(The loop's thread) stop at the next read, write or poll."""
        with self._lock:
            self.stopped = True
            if not self.closed:
                os.eventfd_write(self.stop_fd, 1)

    def close(self) -> None:
        """(The relay's thread, when done) close what it owns."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.src.close()
                self.dst.close()
                os.close(self.stop_fd)

    def run(self, count: int, idle: float) -> tuple[int, bool]:
        """Read, then write it all, waiting in poll (never in a read or a write: MSG_DONTWAIT,
        whatever the sockets' own mode). The bytes moved, and whether it stopped with nothing read
        and not written (else the body lost some)."""
        src, dst, stop = self.src, self.dst, self.stop_fd
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        reading, writing = select.poll(), select.poll()
        reading.register(src, select.POLLIN)
        writing.register(dst, select.POLLOUT)
        for waiting in (reading, writing):
            waiting.register(stop, select.POLLIN)
        wait_ms, moved = int(idle * 1000), 0
        try:
            while moved < count and not self.stopped:
                try:
                    got = src.recv_into(buf, min(count - moved, READ_SIZE), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    events = reading.poll(wait_ms)
                    if not events or any(fd == stop for fd, _ in events):
                        return moved, True
                    continue
                if not got:
                    return moved, True  # the sandbox's end: the caller says what that means
                sent = 0
                while sent < got:
                    if self.stopped:
                        return moved + sent, False
                    try:
                        sent += dst.send(view[sent:got], socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        events = writing.poll(wait_ms)
                        if not events or any(fd == stop for fd, _ in events):
                            return moved + sent, False
                moved += got
        except OSError:  # either side failed: what went, went
            return moved, False
        return moved, True


def handed(fds: deque[int], port: int, local: int) -> socket.socket | None:
    """The handed-over socket the reply names, from the fds the channel received: those ahead of it
    (answers to requests given up on) are closed; None (all closed) when none is it."""
    while fds:
        sock = checked_socket(fds.popleft(), port, local)
        if sock is not None:
            return sock
    return None


AnyTunnel = Tunnel | SocketTunnel
"""What `Sandbox.open_tunnel` gives: frames through the daemon, or its socket handed over."""
