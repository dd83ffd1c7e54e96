"""The server's half of the daemon's `tunnel_open` (`daemon/executor_net.py` holds the other half).

A tunnel is one TCP connection the daemon opened to a port inside the sandbox, carried on one of
the protocol's binary streams (its id the `tunnel_open` request's): the preview proxy speaks HTTP
over it. Flow control is the protocol's credit (`ExecutorClient`'s `ByteStream` checks it: a
daemon that runs past a window or sends an oversized frame breaks the protocol and its connection
resets), so at most one window of a tunnel's bytes is ever held here, whatever the daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from crogia.errors import CrogiaError, Unavailable
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.frame_pipe import FramePipes, PipeChunk, Sink

if TYPE_CHECKING:
    from crogia.sandbox.executor_client import ByteStream, ExecutorClient


CLOSE_WAIT = 1.0
"""Seconds a tunnel's close waits for the daemon's channel to take the reset."""


class TunnelClosed(Unavailable):
    """The tunnel ended (its socket in the sandbox failed, it was reset, or the daemon's connection went)."""


class Tunnel:
    """One byte stream to a port inside the sandbox: `read()` what it sends, `write()` to it."""

    window = proto.WINDOW
    """The most bytes the daemon may have sent that this side has not consumed."""

    def __init__(self, stream: ByteStream, reply: asyncio.Future[dict[str, Any]]) -> None:
        self._stream, self._reply = stream, reply
        self._pipe: FramePipes | None = None

    async def connected(self) -> None:
        """Once the daemon has connected; its `CrogiaError` (code `refused`: nobody listens) if not.

        Bytes written before this follow the connection (the daemon holds them meanwhile).
        """
        await asyncio.shield(self._reply)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return self._stream.held

    @property
    def ended(self) -> bool:
        """Nothing more will come: the sandbox's side ended, or the stream failed."""
        return self._stream.over or self._stream.their_end

    async def read(self) -> bytes:
        """The next bytes from the sandbox; b"" at its end. Raises `TunnelClosed` if the stream failed."""
        try:
            return await self._stream.read()
        except CrogiaError as exc:
            raise TunnelClosed(exc.message) from None

    def pipe_frames(self) -> bool:
        """From now on long frames may come as `PipeChunk`s from `read_view` (`ByteStream.pipe_frames`),
        until the tunnel closes; False if they cannot (then nothing changes)."""
        if self._pipe is None:
            self._pipe = self._stream.pipe_frames()
        return self._pipe is not None

    async def read_view(self, sink: Sink | None = None) -> bytes | memoryview | PipeChunk:
        """`read()`, with a long frame's bytes as a view of the buffer they were read into (no copy),
        or waiting in the tunnel's pipe after `pipe_frames` (or moved on by `sink` meanwhile: see
        `ByteStream.read_view`)."""
        try:
            return await self._stream.read_view(sink)
        except CrogiaError as exc:
            raise TunnelClosed(exc.message) from None

    def take_view(self) -> bytes | memoryview | PipeChunk | None:
        """`read_view()` without waiting: bytes already here, else None (then await `read_view`)."""
        return self._stream.take_view()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send bytes to the socket in the sandbox; returns once they are within the stream's credit."""
        try:
            await self._stream.write(data)
        except CrogiaError as exc:
            raise TunnelClosed(exc.message) from None

    async def close(self) -> None:
        """Close it: the daemon closes the socket (idempotent; waits at most CLOSE_WAIT on the daemon).

        The reset is queued before anything is awaited, so a daemon that stops reading its channel
        costs this call CLOSE_WAIT, never a hang (a request's cleanup, or the server's shutdown).
        """
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await self._stream.reset()
        finally:
            if self._pipe is not None:
                self._pipe.close()  # whatever waits in it is dropped with it


async def open_tunnel(client: ExecutorClient, port: int) -> Tunnel:
    """A tunnel to `port` inside the sandbox, at once: `Tunnel.connected()` says whether it connected."""
    stream, reply = await client.open_stream("tunnel_open", lasting=True, port=port)
    return Tunnel(stream, reply)
