"""How the server reaches a sandbox's daemon: channels the server makes, and the daemon's hello.

A `Channel` answers one question, "give me a connected stream to this sandbox's daemon, which
has proven who it is". Nothing here follows, opens or connects to a path the sandbox can write:

* `PairChannel` (bubblewrap): a socketpair; the daemon inherits its end at spawn (`--fd N`).
  No file at all; spent once its connection ends (the sandbox then restarts).
* `ListenerChannel` (Docker): the server listens on `executor.sock` in a server-only folder
  that the container sees read-only; the daemon dials in (`--dial`), and again after the server
  restarts. It proves itself with a secret the server wrote beside the socket (mode 0400),
  renewed at each listen, and the server checks the peer's cgroup (SO_PEERCRED) where it can.

A transport that crosses a network (TCP next) is one more subclass: `connect` returns a stream
on which `handshake` has passed.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import json
import logging
import socket
from typing import Any, ClassVar, NamedTuple

from crogia.errors import SandboxError, Unavailable
from crogia.sandbox.daemon import executor_proto as proto

log = logging.getLogger(__name__)

SOCKET_NAME = "executor.sock"
SECRET_NAME = "secret"
HELLO_LIMIT = 4096
HELLO_TIMEOUT = 5.0
SOCKET_BUFFER = 1 << 20
MAX_HANDSHAKES = 4
"""Connections a listener lets say hello at once; more are closed at once (a dial flood costs nothing)."""


class ProtocolViolation(SandboxError):
    """The daemon broke the protocol: its session's request fails (502) and its channel is reset."""


class Frame(NamedTuple):
    """A binary frame: `data` on stream `stream` (empty: its sender's end of the stream)."""

    stream: int
    data: bytes


class WireReader:
    """JSON lines (none longer than `limit` bytes, which may change between lines) and binary frames."""

    def __init__(self, reader: asyncio.StreamReader, limit: int = HELLO_LIMIT) -> None:
        self.limit = limit
        self._reader = reader
        self._buf = bytearray()
        self._scanned = 0

    async def line(self) -> bytes | None:
        """The next line without its newline; None at a clean end; `ProtocolError` for a frame or past it."""
        item = await self.next()
        if isinstance(item, Frame):
            raise proto.ProtocolError("a binary frame where a line was due")
        return item

    async def next(self) -> bytes | Frame | None:
        """The next line (without its newline) or frame; None at a clean end; `ProtocolError` if malformed."""
        while True:
            buf = self._buf
            if buf and buf[0] == proto.FRAME:
                if len(buf) >= proto.FRAME_HEADER:
                    stream, length = proto.parse_frame_header(buf[: proto.FRAME_HEADER])
                    end = proto.FRAME_HEADER + length
                    if len(buf) >= end:
                        with memoryview(buf) as view:  # one copy, not two (a bytearray slice is one)
                            data = bytes(view[proto.FRAME_HEADER : end])
                        del buf[:end]
                        return Frame(stream, data)
            elif buf:
                end = buf.find(b"\n", self._scanned)
                if end >= 0:
                    if end > self.limit:
                        raise proto.ProtocolError(f"a line of {end} bytes (the limit is {self.limit})")
                    line = bytes(buf[:end])
                    del buf[: end + 1]  # cheap: bytearray drops its head without copying the rest
                    self._scanned = 0
                    return line
                self._scanned = len(buf)
                if self._scanned > self.limit:
                    raise proto.ProtocolError(f"a line longer than {self.limit} bytes")
            data = await self._reader.read(1 << 18)
            if not data:
                if buf:
                    raise proto.ProtocolError("the stream ended inside a line or frame")
                return None
            buf += data


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
        sock, self._ours = self._ours, None
        if sock is None:
            raise Unavailable("the sandbox's channel is closed: the sandbox must start again")
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        stream = (WireReader(reader), writer)
        try:
            await handshake(stream, None, within)
        except BaseException:
            writer.close()
            raise
        return stream

    async def close(self) -> None:
        self.discard()
