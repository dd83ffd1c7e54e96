"""Previews: what listens inside a session's sandbox, and HTTP/WebSocket proxied to it.

Every byte goes through the sandbox's daemon channel (`Sandbox.open_tunnel`: a TCP stream the
daemon opens to 127.0.0.1:port inside the sandbox), never over a network route from the server
into the sandbox. The proxy speaks HTTP/1.1 over that stream with h11 (one request per tunnel),
and WebSocket with websockets' sans-I/O client after the upgrade (`preview_ws`). Bodies stream both ways: the
tunnel's stream credit (`crogia.sandbox.tunnel_channel`) holds the sandbox's server back while
the client is slow, and a request body is written as the daemon credits it.

The port watcher reads the sandbox's listening ports every PREVIEW_POLL_SECONDS, only for a
running session someone could care about (a client on its event stream, or a background process
running), and publishes `port_opened` / `port_closed`: at most PORT_EVENTS_BURST at once, then
PORT_EVENTS_PER_SECOND, per session (every event is stored for good, and a sandbox can open and
close ports as fast as it likes). Changes past that wait for a later look, coalesced: a port that
opened and closed again meanwhile says nothing; `GET /ports` is the truth at any moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from crogia.buckets import TokenBucket
from crogia.bus import EventBus
from crogia.config import Settings
from crogia.errors import CrogiaError, SandboxError, TooLarge, UpstreamTimeout
from crogia.events import PortClosed, PortOpened
from crogia.sandbox.base import PortState
from crogia.sandbox.frame_pipe import PipeChunk
from crogia.sandbox.tunnel_channel import TunnelClosed
from crogia.sandbox.tunnel_socket import AnyTunnel, SocketTunnel
from crogia.services.live import LiveSession
from crogia.services.preview_pool import UpstreamPool
from crogia.services.processes import ProcessService
from crogia.services.sessions import SessionService

if TYPE_CHECKING:
    from crogia.frontdoor.zero_copy import Lent

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
"""RFC 9110 7.6.1: headers for one hop only (plus those `Connection` names), never forwarded."""
FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"})
_HOP_BY_HOP = frozenset(name.encode() for name in HOP_BY_HOP)
_NOT_SENT = frozenset(name.encode() for name in FORWARDED | {"host"})
PORT_EVENTS_BURST = 100
PORT_EVENTS_PER_SECOND = 1.0
"""A session's budget of `port_opened` / `port_closed` events (a token bucket)."""
"""What the proxy sets itself, whatever the client sent."""
PREVIEW_COOKIE = "crogia_preview_"
SHORT_BODY = 64 * 1024
"""A response body declared this short is read whole before the answer starts (no stream)."""
RAW_BODY_AT = 1 << 20
"""A response body at least this long (declared) streams without h11, on a connection not kept."""
POOL_PER_PORT, POOL_IDLE_SECONDS = 8, 4.0
"""Kept-alive connections to one port of one sandbox, and how long one may idle (most servers
keep one 5 s or more)."""

Headers = list[tuple[bytes, bytes]]


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], *, keep: frozenset[str] = frozenset()
) -> Headers:
    """`headers` without the hop-by-hop ones (RFC 9110 7.6.1) and those `Connection` lists."""
    pairs = [(name.lower(), value) for name, value in headers]
    drop = _HOP_BY_HOP
    for name, value in pairs:
        if name == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    if keep:
        drop = drop - {name.encode("latin-1") for name in keep}
    return [(name, value) for name, value in pairs if name not in drop]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the proxy tells the sandbox's server about the original request (X-Forwarded-*)."""

    address: str
    scheme: str
    host: str
    prefix: str
    drop_cookie: bool = False
    """Strip this server's preview cookie (it authorises the preview, the app must never see it)."""
    drop_authorization: bool = False
    """Strip Authorization (with API_TOKENS on it is this server's bearer token)."""


def upstream_headers(
    headers: Iterable[tuple[bytes, bytes]], port: int, info: ClientInfo, *, ws: bool
) -> Headers:
    """The headers for the sandbox's server: hop-by-hop and our credentials dropped, X-Forwarded-* set."""
    out: Headers = []
    for name, value in strip_hop_by_hop(headers):
        if name in _NOT_SENT or (ws and (name == b"content-length" or name.startswith(b"sec-websocket-"))):
            continue  # with `ws`, the WebSocket client below makes its own handshake
        if name == b"authorization" and info.drop_authorization:
            continue
        if name == b"cookie" and info.drop_cookie:
            value = _without_cookie(value)
            if not value:
                continue
        out.append((name, value))
    out.append((b"host", f"localhost:{port}".encode()))
    out.append((b"x-forwarded-for", info.address.encode("latin-1", "replace")))
    out.append((b"x-forwarded-proto", info.scheme.encode("latin-1", "replace")))
    out.append((b"x-forwarded-host", info.host.encode("latin-1", "replace")))
    if info.prefix:
        out.append((b"x-forwarded-prefix", info.prefix.encode("latin-1", "replace")))
    return out


def _without_cookie(value: bytes) -> bytes:
    parts = [p.strip() for p in value.split(b";")]
    return b"; ".join(p for p in parts if p and not p.startswith(PREVIEW_COOKIE.encode()))


@dataclass(slots=True)
class Upstream:
    """A response head from the sandbox's server, and its body: still to come, or (short) all here."""

    status: int
    headers: Headers
    body: AsyncIterator[bytes | memoryview | PipeChunk] | bytes
    """`PipeChunk`s only when asked for (`http(zero_copy=True)`)."""


class _Budget(TokenBucket):
    """A session's port events: PORT_EVENTS_BURST tokens, refilled at PORT_EVENTS_PER_SECOND."""

    def __init__(self) -> None:
        super().__init__(PORT_EVENTS_BURST, PORT_EVENTS_PER_SECOND)

    def spend(self, before: frozenset[int], now: frozenset[int]) -> frozenset[int]:
        """The ports the stream may say are open, going from `before` towards `now` by as many
        changes as the budget holds (lowest ports first, openings before closings)."""
        opened, closed = sorted(now - before), sorted(before - now)
        room = self.available()
        if len(opened) + len(closed) <= room:
            self.take(len(opened) + len(closed))
            return now
        opened = opened[:room]
        closed = closed[: room - len(opened)]
        self.take(len(opened) + len(closed))
        return (before | frozenset(opened)) - frozenset(closed)


class PreviewService:
    """Ports of a session's sandbox, the proxy to them, and the watcher that reports them."""

    def __init__(
        self, settings: Settings, bus: EventBus, sessions: SessionService, processes: ProcessService
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.sessions = sessions
        self.processes = processes
        self._known: dict[str, frozenset[int]] = {}
        """What the stream has said of each session's ports (its view; the sandbox may be ahead)."""
        self._budgets: dict[str, _Budget] = {}
        self._reads: dict[str, asyncio.Task[None]] = {}
        """Each session's read of its ports in flight: one at a time per session, none waited on by
        another (a daemon is the sandbox's, and one that never answers must hold back only itself)."""
        self._watcher: asyncio.Task[None] | None = None
        self._pool = UpstreamPool(POOL_PER_PORT, POOL_IDLE_SECONDS)

    # --- ports ---

    async def ports(self, live: LiveSession) -> list[PortState]:
        return await live.sandbox.ports(owners=True)

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="crogia-port-watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        reads = list(self._reads.values())
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        await self._pool.sweep(everything=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.preview_poll_seconds)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading the sandboxes' ports failed")

    async def poll_once(self) -> None:
        """Start a look at the ports of every running session someone could care about (one whose
        last look is still waiting on its daemon is skipped); sessions gone or stopped say their
        ports closed."""
        await self._pool.sweep()
        awake = {
            live.id: live for live in self.sessions.awake() if live.state == "running" and live.has_sandbox
        }
        for session_id, read in self._reads.items():
            if session_id not in awake:  # (it leaves `_reads` once done: `close` still awaits it)
                read.cancel()
        for session_id in list(self._known):
            if session_id not in awake:  # stopped or gone: its ports closed, whatever the budget
                self._budgets.pop(session_id, None)
                await self._publish(session_id, self._known.pop(session_id), frozenset())
        for live in awake.values():
            if live.id in self._reads or not await self._cared_for(live):
                continue
            read = asyncio.create_task(self._read(live), name=f"crogia-ports-{live.id}")
            self._reads[live.id] = read
            read.add_done_callback(functools.partial(self._read_done, live.id))

    def _read_done(self, session_id: str, read: asyncio.Task[None]) -> None:
        if self._reads.get(session_id) is read:
            del self._reads[session_id]
        if not read.cancelled() and read.exception() is not None:
            log.error("reading the ports of session %s failed", session_id, exc_info=read.exception())

    async def _read(self, live: LiveSession) -> None:
        try:
            found = await asyncio.wait_for(live.sandbox.ports(owners=False), 5.0)
        except (CrogiaError, TimeoutError) as exc:
            log.debug("ports of session %s: %s", live.id, exc)
            return
        if live.state != "running":  # it stopped meanwhile, and said its ports closed then
            return
        now = frozenset(p.port for p in found)
        before = self._known.get(live.id, frozenset())
        budget = self._budgets.get(live.id) or self._budgets.setdefault(live.id, _Budget())
        said = budget.spend(before, now)
        self._known[live.id] = said
        await self._publish(live.id, before, said)

    async def _cared_for(self, live: LiveSession) -> bool:
        if self.bus.subscriber_count(live.id) > 0:
            return True
        return await self.processes.any_running(live.id)

    async def _publish(self, session_id: str, before: frozenset[int], now: frozenset[int]) -> None:
        for port in sorted(now - before):
            await self.bus.publish(session_id, PortOpened(port=port))
        for port in sorted(before - now):
            await self.bus.publish(session_id, PortClosed(port=port))

    # --- the proxy ---

    async def open(self, live: LiveSession, port: int) -> AnyTunnel:
        """A connected tunnel to `port`; a 502 that says so when nobody listens there."""
        tunnel = await self._new_tunnel(live, port)
        try:
            await self._connected(tunnel, port)
        except BaseException:
            await tunnel.close()
            raise
        return tunnel

    async def _new_tunnel(self, live: LiveSession, port: int) -> AnyTunnel:
        opening = live.sandbox.open_tunnel(port, hand_over=self.settings.preview_handoff)
        async with self._connecting(port):  # it waits on the daemon's channel: never a hang
            return await asyncio.wait_for(opening, self.settings.preview_timeout)

    async def _connected(self, tunnel: AnyTunnel, port: int) -> None:
        async with self._connecting(port):
            await asyncio.wait_for(tunnel.connected(), self.settings.preview_timeout)

    @contextlib.asynccontextmanager
    async def _connecting(self, port: int) -> AsyncIterator[None]:
        """A 504 for a connection that timed out, a 502 that says so when nobody listens."""
        try:
            yield
        except TimeoutError:
            raise UpstreamTimeout(f"Connecting to port {port} in the sandbox timed out.") from None
        except CrogiaError as exc:
            if exc.context.get("code") == "refused":
                raise SandboxError(
                    f"Nothing listens on port {port} in the sandbox ({exc.message}).", port=port
                ) from None
            raise

    async def http(
        self,
        live: LiveSession,
        port: int,
        *,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterator[bytes],
        info: ClientInfo,
        zero_copy: bool = False,
        lend: Callable[[], Lent | None] | None = None,
    ) -> Upstream:
        """Send one request to `port` and return the response's head; its body streams after.

        A request without a body may go over a kept-alive connection from an earlier one (and
        once more over a new one if the server had closed that meanwhile); one with a body always
        gets a new connection, since a streamed body cannot be sent twice. With `zero_copy`, a
        long body's frames may come as `PipeChunk`s (the client's connection can splice them);
        with `lend` too (the front door's, see `zero_copy.Lent`), most of them never come at all:
        the channel's reader splices them into the client's socket as they arrive (`_Lane`).
        """
        out = upstream_headers(headers, port, info, ws=False)
        declared = any(name == b"content-length" for name, _ in out)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        if chunked and not declared:
            out.append((b"transfer-encoding", b"chunked"))
        elif not declared and method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            out.append((b"content-length", b"0"))
        request = h11.Request(method=method, target=target, headers=out)
        key = (live.id, port)
        has_body = chunked or any(n == b"content-length" and v.strip() != b"0" for n, v in out)
        while True:
            pooled = None if has_body else await self._pool.take(key)
            if pooled is not None:
                tunnel, conn = pooled
            else:
                tunnel, conn = await self._new_tunnel(live, port), h11.Connection(h11.CLIENT)
            try:
                exchange = _Exchange(
                    self, key, tunnel, conn, fresh=pooled is None, zero_copy=zero_copy, lend=lend
                )
                return await exchange.run(request, body if has_body else None)
            except _Stale:
                await tunnel.close()  # the server had closed that kept-alive one: a new one
            except BaseException:
                await tunnel.close()
                raise


class _Stale(Exception):
    """A kept-alive connection the sandbox's server had closed before our request reached it."""


class _Exchange:
    """One request and its response over one tunnel (`PreviewService.http`)."""

    def __init__(
        self,
        service: PreviewService,
        key: tuple[str, int],
        tunnel: AnyTunnel,
        conn: h11.Connection,
        *,
        fresh: bool,
        zero_copy: bool,
        lend: Callable[[], Lent | None] | None,
    ) -> None:
        self.service, self.key, self.tunnel, self.conn, self.fresh = service, key, tunnel, conn, fresh
        self.zero_copy, self.lend = zero_copy, lend
        self.port = key[1]
        self.settings = service.settings
        self.heard = False

    async def run(self, request: h11.Request, body: AsyncIterator[bytes] | None) -> Upstream:
        conn, tunnel, port, timeout = self.conn, self.tunnel, self.port, self.settings.preview_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._send(conn.send(request))
                if self.fresh:
                    await self.service._connected(tunnel, port)
                if body is not None:
                    seen = 0
                    async for chunk in body:
                        seen += len(chunk)
                        if seen > self.settings.request_max_bytes:
                            limit = self.settings.request_max_bytes
                            raise TooLarge(f"The request body is over REQUEST_MAX_BYTES ({limit}).")
                        if chunk:
                            await self._send(conn.send(h11.Data(data=chunk)))
                await self._send(conn.send(h11.EndOfMessage()))
                head = await self._head()
        except TimeoutError:
            raise UpstreamTimeout(
                f"The server on port {port} in the sandbox did not answer within {timeout:g} s."
            ) from None
        except h11.ProtocolError as exc:
            raise SandboxError(
                f"The server on port {port} in the sandbox sent a broken HTTP response: {exc}"
            ) from None
        except TunnelClosed:
            if not self.fresh and not self.heard:
                raise _Stale from None
            raise SandboxError(
                f"The server on port {port} in the sandbox closed the connection without an answer."
            ) from None
        length = _content_length(head) if request.method != b"HEAD" else None
        headers = strip_hop_by_hop(head.headers.raw_items())
        if length is not None and length <= SHORT_BODY:  # no stream to set up for a few bytes
            parts = [part async for part in self._body()]
            return Upstream(head.status_code, headers, b"".join(parts))
        raw = length is not None and length >= RAW_BODY_AT
        return Upstream(head.status_code, headers, self._raw_body(length or 0) if raw else self._body())

    async def _send(self, data: bytes | None) -> None:
        if data:
            try:
                await self.tunnel.write(data)
            except TunnelClosed:
                if self.fresh:
                    await self.service._connected(self.tunnel, self.port)  # refused says so
                raise

    async def _head(self) -> h11.Response:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.tunnel.read()
                if not data:  # closed (or reset) before a whole head: not "broken HTTP"
                    raise TunnelClosed("closed before a response")
                self.heard = True
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the final answer follows
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise TunnelClosed("closed before a response")
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")

    async def _body(self) -> AsyncIterator[bytes]:
        conn, tunnel, kept = self.conn, self.tunnel, False
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.settings.preview_timeout):
                        conn.receive_data(await tunnel.read())
                elif isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                        kept = await self.service._pool.put(self.key, tunnel, conn)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, TimeoutError, TunnelClosed) as exc:
            # The head is sent: all that is left is to cut the response short (the client sees it).
            log.info("preview body from port %d cut short: %r", self.port, exc)
            raise
        finally:
            if not kept:
                await tunnel.close()

    async def _raw_body(self, length: int) -> AsyncIterator[bytes | memoryview | PipeChunk]:
        """A large body of known length, straight from the tunnel (h11 would copy it twice more);
        its long frames through the tunnel's pipe when the client's connection can splice them,
        and those that come while this waits straight on into the client's socket when it lends it.

        The lane's bytes count as the body's progress: `PREVIEW_TIMEOUT` is what may pass with no
        byte of it coming either way."""
        tunnel, left, lane, relay = self.tunnel, length, None, True
        if self.zero_copy:
            tunnel.pipe_frames()
        try:
            start, _ = self.conn.trailing_data  # what came behind the head
            if start:
                left -= len(start[:left])
                yield start[:length]
            while left > 0:
                chunk = tunnel.take_view()  # most often here already: no timer to set
                if chunk is None:
                    if lane is None and self.lend is not None:
                        lent = self.lend()  # (the response has started: the head went before this)
                        lane = _Lane(lent) if lent is not None else None
                    if lane is not None and isinstance(tunnel, SocketTunnel) and relay:
                        relay = False  # once: what it leaves (a client's stall) goes the lane's way
                        fd, room = lane.lent.writable_fd()
                        if fd >= 0:
                            idle = self.settings.preview_timeout
                            moved, whole = await tunnel.relay(fd, min(left, room), idle)
                            lane.lent.wrote(moved)
                            left -= moved
                            if not whole:  # the client stalled past PREVIEW_TIMEOUT, or went
                                raise TimeoutError(f"the client took nothing more with {left} bytes to come")
                            continue
                    if lane is not None:
                        lane.left, lane.moved = left, 0
                    try:
                        async with asyncio.timeout(self.settings.preview_timeout):
                            chunk = await tunnel.read_view(lane)
                    except TimeoutError:
                        if lane is None or not lane.moved:
                            raise
                        chunk = None  # the lane moved some meanwhile: wait again
                    if lane is not None:
                        left -= lane.moved
                        if chunk is None or (not chunk and left <= 0):
                            continue
                if not chunk:
                    raise TunnelClosed(f"closed with {left} bytes of the body to come")
                if len(chunk) > left:  # (then the tunnel closes: what is behind it is dropped)
                    chunk = chunk.head(left) if isinstance(chunk, PipeChunk) else chunk[:left]
                left -= len(chunk)
                yield chunk
        except (TimeoutError, TunnelClosed) as exc:
            log.info("preview body from port %d cut short: %r", self.port, exc)
            raise
        finally:
            if lane is not None:
                lane.lent.close()
            await tunnel.close()  # not kept: what follows the body was never parsed


class _Lane:
    """The client's socket, lent by the front door, that the tunnel's reader splices piped frames
    into while `_raw_body` waits (a `frame_pipe.Sink`): at most `left` bytes, `moved` so far."""

    __slots__ = ("left", "lent", "moved")

    def __init__(self, lent: Lent) -> None:
        self.lent, self.left, self.moved = lent, 0, 0

    def __call__(self, chunk: PipeChunk | memoryview) -> int:
        if isinstance(chunk, PipeChunk):
            moved = self.lent.splice(chunk.fileno(), min(len(chunk), self.left))
        else:
            moved = self.lent.send(chunk[: self.left])
        self.left -= moved
        self.moved += moved
        return moved

    @property
    def full(self) -> bool:
        return self.left <= 0


def _content_length(head: h11.Response) -> int | None:
    """The body's length when it is declared and there is one (h11 has checked the header)."""
    if head.status_code < 200 or head.status_code in (204, 304):
        return None
    values = [v for name, v in head.headers.raw_items() if name.lower() == b"content-length"]
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in head.headers.raw_items())
    return int(values[0]) if len(values) == 1 and not chunked else None
