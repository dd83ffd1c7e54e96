"""The server's half of the daemon's `tunnel_*` messages (`daemon/executor_net.py` holds the other half).

A tunnel is one TCP connection the daemon opened to a port inside the sandbox, carried as base64
chunks inside the channel's JSON lines: the preview proxy speaks HTTP over it. The daemon may be
compromised, so every push is checked here: a chunk over CHUNK bytes, one for a tunnel id this
server never opened, or more unacknowledged bytes than WINDOW (the daemon ignoring back-pressure)
is a protocol error and drops the connection (`ExecutorClient` then fails everything on it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from crogia.errors import Unavailable
from crogia.sandbox.daemon.executor_proto import ProtocolError

log = logging.getLogger(__name__)

TUNNEL_PUSHES = frozenset({"tunnel_data", "tunnel_end"})
CHUNK = 128 * 1024
"""Bytes one tunnel_data carries (decoded), either way."""
WINDOW = 2 * 1024 * 1024
"""Pushed bytes the daemon may send before this server acknowledges them."""
ACK_EVERY = WINDOW // 4
_B64_MAX = (CHUNK + 2) // 3 * 4

Request = Callable[..., Awaitable[dict[str, Any]]]
Notify = Callable[..., None]


class TunnelClosed(Unavailable):
    """The tunnel ended (its socket in the sandbox closed, or the daemon's connection went)."""


class Tunnel:
    """One byte stream to a port inside the sandbox: `read()` what it sends, `write()` to it."""

    def __init__(self, tid: int, request: Request, notify: Notify, router: TunnelRouter) -> None:
        self.tid = tid
        self._request, self._notify, self._router = request, notify, router
        self._chunks: collections.deque[bytes] = collections.deque()
        self._ready = asyncio.Event()
        self._unacked = 0
        """Bytes received and not yet acknowledged (the daemon's window)."""
        self._consumed = 0
        """Bytes read by the caller and not yet acknowledged."""
        self.eof = self.lost = self.closed = False

    window = WINDOW
    """Bytes the daemon may have sent that this side has not consumed and acknowledged."""

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return sum(map(len, self._chunks))

    @property
    def ended(self) -> bool:
        """The sandbox's side has ended (or the channel went): nothing more will come."""
        return self.eof

    def on_data(self, data: bytes) -> None:
        if self.eof:
            raise ProtocolError(f"tunnel_data for tunnel {self.tid} after its end")
        self._unacked += len(data)
        if self._unacked > WINDOW:
            raise ProtocolError(f"tunnel {self.tid}: more than {WINDOW} bytes unacknowledged")
        self._chunks.append(data)
        self._ready.set()

    def on_end(self, lost: bool = False) -> None:
        self.eof, self.lost = True, self.lost or lost
        self._ready.set()

    async def read(self) -> bytes:
        """The next bytes from the sandbox; b"" at its end. Raises `TunnelClosed` if the channel went."""
        while not self._chunks:
            if self.eof:
                if self.lost:
                    raise TunnelClosed("the connection to the sandbox's executor ended")
                return b""
            self._ready.clear()
            await self._ready.wait()
        data = self._chunks.popleft()
        self._consumed += len(data)
        if self._consumed >= ACK_EVERY and not self.closed:
            self._unacked -= self._consumed
            self._notify("tunnel_ack", tunnel=self.tid, bytes=self._consumed)
            self._consumed = 0
        return data

    async def write(self, data: bytes) -> None:
        """Send bytes to the socket in the sandbox; returns once the daemon has room for more."""
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            if self.closed or self.lost:
                raise TunnelClosed("the tunnel is closed")
            chunk = base64.b64encode(view[start : start + CHUNK]).decode()
            await self._request("tunnel_data", tunnel=self.tid, data_b64=chunk)

    def close(self) -> None:
        """Close it (idempotent; never waits)."""
        if not self.closed:
            self.closed = True
            self._router.unregister(self.tid)
            if not self.lost:
                self._notify("tunnel_close", tunnel=self.tid)


class TunnelRouter:
    """One daemon connection's tunnels: hands each push to its tunnel, checks each against the rules."""

    def __init__(self, request: Request, notify: Notify) -> None:
        self._request, self._notify = request, notify
        self._ids = itertools.count(1)
        self.issued = 0
        self._open: dict[int, Tunnel] = {}

    async def open(self, port: int) -> Tunnel:
        """A tunnel to `port` inside the sandbox; the daemon's error (nobody listens) as `CrogiaError`."""
        tid = self.issued = next(self._ids)
        tunnel = self._open[tid] = Tunnel(tid, self._request, self._notify, self)
        try:
            await self._request("tunnel_open", tunnel=tid, port=port)
        except BaseException:
            self._open.pop(tid, None)
            tunnel.closed = True
            raise
        return tunnel

    def unregister(self, tid: int) -> None:
        self._open.pop(tid, None)

    def dispatch(self, msg: Mapping[str, Any]) -> None:
        """Route one push (its `type` is in TUNNEL_PUSHES); ProtocolError for a malformed or lying one."""
        tid = msg["tunnel"]
        if tid > self.issued:
            raise ProtocolError(f"{msg['type']} for tunnel {tid}, which this server never opened")
        tunnel = self._open.get(tid)
        if msg["type"] == "tunnel_end":
            if tunnel is not None:
                tunnel.on_end()
            return
        data = msg["data_b64"]
        if len(data) > _B64_MAX:
            raise ProtocolError(f"tunnel_data: data_b64 longer than {_B64_MAX} characters")
        try:
            raw = binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("tunnel_data: data_b64 is not base64") from None
        if not raw or len(raw) > CHUNK:
            raise ProtocolError(f"tunnel_data: must carry 1..{CHUNK} bytes")
        if tunnel is not None:
            tunnel.on_data(raw)

    def end_all(self) -> None:
        """The connection is gone: every tunnel on it has ended."""
        tunnels, self._open = list(self._open.values()), {}
        for tunnel in tunnels:
            tunnel.on_end(lost=True)

    @property
    def count(self) -> int:
        return len(self._open)
