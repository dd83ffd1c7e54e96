"""The ASGI `http.response.zerocopysend` extension for the front door's connections.

uvicorn does not offer it; `FrontDoorProtocol` does, on a plain socket (not TLS): a message
`{"type": "http.response.zerocopysend", "file": f, "count": n, "offset": None, "more_body": ...}`
sends `n` bytes of the body from `f.fileno()` straight to the client's socket with `splice`, so
the kernel moves them and this process never copies them. The preview proxy sends a long
download's frames so, from its tunnel's pipe (`crogia.sandbox.frame_pipe`).

`file` must hold its `count` bytes already (a pipe: in it; a regular file: at `offset`, or its
position). A body the connection cannot splice (chunked, a HEAD, or bytes of an earlier write
still in the transport's buffer, which must go first) is read and sent as `http.response.body`.

A private extension goes one step further: `scope["extensions"]["crogia.socket_lend"]["lend"]()`,
called once the response has started, lends the app the client's socket (`Lent`) for a body of
declared length, so that whoever gets the body's bytes (the daemon channel's reader, in the
preview proxy) sends them (`send`) or splices them from a pipe (`splice`) straight in the moment
they come, when the socket can take them at once: no task wakes and no ASGI message is sent per
frame. Whatever it cannot take then goes as an ASGI message, as before, which waits for the socket.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import termios
from typing import Any, Self

from uvicorn._types import HTTPResponseBodyEvent
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from crogia.sandbox.frame_pipe import SPLICE, wait_ready

ZERO_COPY = "http.response.zerocopysend"
LEND = "crogia.socket_lend"
GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})
"""A splice into the client's socket failing so: the client went away (as a transport would tell)."""


def extension(scope: dict[str, Any]) -> None:
    """Say in `scope` that the connection takes `http.response.zerocopysend`."""
    scope.setdefault("extensions", {})[ZERO_COPY] = {}


def lending(cycle: RequestResponseCycle, sock: int) -> None:
    """Offer `cycle`'s app the connection's socket `sock` (`LEND`; see `Lent.lend`)."""
    cycle.scope.setdefault("extensions", {})[LEND] = {"lend": functools.partial(Lent.lend, cycle, sock)}


class Lent:
    """The client's socket lent to the app for its body: `splice` moves bytes out of a pipe into it
    now, or none. Its own duplicate of the socket's fd, until `close`."""

    def __init__(self, cycle: RequestResponseCycle, fd: int) -> None:
        self.cycle, self._fd = cycle, fd

    @classmethod
    def lend(cls, cycle: RequestResponseCycle, sock: int) -> Self | None:
        """The socket, for a started response of declared length that can be spliced; else None."""
        usable = cycle.response_started and not cycle.response_complete and not cycle.disconnected
        if not usable or cycle.chunked_encoding or cycle.scope["method"] == "HEAD":
            return None
        if cycle.transport.is_closing():
            return None
        return cls(cycle, os.dup(sock))  # (made while the transport is open: see `send`)

    def splice(self, source: int, count: int) -> int:
        """Move up to `count` bytes from the pipe `source` into the socket, without waiting; how many.

        None go when the socket is full, bytes of an earlier write still wait in the transport (they
        go first), or the client went away (the next `zerocopysend` finds that out and says so).
        """
        cycle = self.cycle
        count = min(count, cycle.expected_content_length)
        if self._fd < 0 or count <= 0 or cycle.disconnected or cycle.response_complete:
            return 0
        if cycle.flow.write_paused or cycle.transport.is_closing() or cycle.transport.get_write_buffer_size():
            return 0
        try:
            moved = os.splice(source, self._fd, count, flags=SPLICE)
        except OSError:
            return 0
        cycle.expected_content_length -= moved
        return moved

    def send(self, data: memoryview) -> int:
        """Send what the socket takes of `data` now (copied into it), as `splice` does; how much."""
        cycle = self.cycle
        data = data[: cycle.expected_content_length]
        if self._fd < 0 or not data or cycle.disconnected or cycle.response_complete:
            return 0
        if cycle.flow.write_paused or cycle.transport.is_closing() or cycle.transport.get_write_buffer_size():
            return 0
        try:
            moved = os.write(self._fd, data)
        except OSError:
            return 0
        cycle.expected_content_length -= moved
        return moved

    def writable_fd(self) -> tuple[int, int]:
        """The socket's fd and the most that may be written to it, for a writer that goes past the
        transport (`SocketTunnel.relay`), when `send` would write now; else (-1, 0). Tell `wrote`."""
        cycle = self.cycle
        if self._fd < 0 or cycle.disconnected or cycle.response_complete or cycle.flow.write_paused:
            return -1, 0
        if cycle.transport.is_closing() or cycle.transport.get_write_buffer_size():
            return -1, 0
        return self._fd, cycle.expected_content_length

    def wrote(self, n: int) -> None:
        """`n` bytes went into the socket past the transport (after `writable_fd`)."""
        self.cycle.expected_content_length -= n

    def close(self) -> None:
        """Give the socket back (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def send(cycle: RequestResponseCycle, sock: int, message: Any) -> None:
    """`cycle.send`, and `http.response.zerocopysend` to the connection's socket `sock` (its fd,
    open while the transport is)."""
    if message["type"] != ZERO_COPY:
        await RequestResponseCycle.send(cycle, message)
        return
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"Unexpected ASGI message '{ZERO_COPY}' sent.")
    source, count = message["file"].fileno(), int(message["count"])
    offset: int | None = message.get("offset")
    more_body = bool(message.get("more_body", False))
    spliceable = not cycle.chunked_encoding and cycle.scope["method"] != "HEAD"
    if not spliceable or cycle.transport.get_write_buffer_size():
        body = _read(source, count, offset)
        await RequestResponseCycle.send(cycle, _body(body, more_body))
        return
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    if count > cycle.expected_content_length:
        raise RuntimeError("Response content longer than Content-Length")
    cycle.expected_content_length -= count
    if cycle.transport.is_closing():
        return
    # A duplicate, made while the transport is open: were it closed during a wait, its fd's number
    # could be another client's connection by then.
    client = os.dup(sock)
    try:
        sent = await _splice(source, client, count, offset)
    finally:
        os.close(client)
    if not sent:
        cycle.disconnected = True  # as the transport will say once it reads the reset
        return
    if not more_body:
        await RequestResponseCycle.send(cycle, _body(b"", False))


def _body(body: bytes, more_body: bool) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": body, "more_body": more_body}


async def _splice(source: int, sock: int, count: int, offset: int | None) -> bool:
    """Move `count` bytes from `source` to the non-blocking `sock`, waiting while it is full; False
    if the client went away."""
    piped, left = stat.S_ISFIFO(os.fstat(source).st_mode), count
    while left:
        try:  # (splice needs a pipe at one end; a file goes by sendfile)
            if piped:
                n = os.splice(source, sock, left, offset_src=offset, flags=SPLICE)
            else:
                n = os.sendfile(sock, source, offset, left)
        except BlockingIOError:
            if piped and not _available(source):  # (a pipe that is empty says EAGAIN too)
                raise RuntimeError(f"the file ended {left} bytes short of its count") from None
            await wait_ready(sock, write=True)
            continue
        except OSError as exc:
            if exc.errno in GONE:
                return False
            raise
        if not n:
            raise RuntimeError(f"the file ended {left} bytes short of its count")
        left -= n
        if offset is not None:
            offset += n
    return True


def _available(fd: int) -> int:
    held = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, held)
    except OSError:  # a pipe that cannot say: take it that it holds them
        return 1
    return int.from_bytes(held, "little")


def _read(source: int, count: int, offset: int | None) -> bytes:
    parts, left = [], count
    while left:
        part = os.pread(source, left, offset) if offset is not None else os.read(source, left)
        if not part:
            raise RuntimeError(f"the file ended {left} bytes short of its count")
        parts.append(part)
        left -= len(part)
        if offset is not None:
            offset += len(part)
    return b"".join(parts)
