"""uvicorn's httptools protocol with the bounds it lacks.

uvicorn 0.54 with httptools reads a request head of any size (an unterminated header grows in the
parser's buffer), arms no timer before a connection's first response (an idle or trickling connection
stays forever), and `limit_concurrency` answers its 503 only once a request is parsed, to health as
well. This subclass adds, per connection:

* a head limit: request line + headers past MAX_HEADER_BYTES, or more than MAX_HEADERS fields: 431;
* a head deadline: HEADER_TIMEOUT from connecting or from a request's first byte: 408, closed;
* a body watch: a body that stalls for BODY_TIMEOUT, or afterwards averages under BODY_MIN_RATE
  (time the server itself is not reading does not count): 408, closed;
* a connection cap: past `max_connections` open connections (WebSockets included), a connection may
  still ask `GET /api/health` (and is closed after it); anything else gets 503; past the headroom
  it gets a 503 at once and is closed. Idle keep-alive time stays uvicorn's (`timeout_keep_alive`);
* a shutdown deadline: once uvicorn asks a busy connection to shut down (after the drain), its request
  has SHUTDOWN_TIMEOUT to end; then the application is cancelled and the client gets a 503 if nothing
  was sent yet, or the connection is cut (a body cut short). uvicorn alone waits for every request,
  however long (a 300 s `/shell`, a download nobody reads), or with `timeout_graceful_shutdown`
  cancels them into a 500 and a traceback.

On a plain socket it also offers ASGI's `http.response.zerocopysend`, and lends the socket itself
for a body spliced from a pipe (`zero_copy`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from crogia.frontdoor import zero_copy
from crogia.frontdoor.limits import AT_CAPACITY, SHUTTING_DOWN, answer, at_capacity, limits_of

log = logging.getLogger("crogia.frontdoor")

HEALTH_PATH = b"/api/health"
OVERFLOW_HEAD_TIMEOUT = 2.0
"""Seconds a connection past the cap has to send its request head."""
BODY_CHECK_EVERY = 1.0


class _TooManyHeaders(Exception):
    pass


def _waiting_past_cap(state: ServerState) -> dict[FrontDoorProtocol, None]:
    """The connections past the cap still silent, oldest first; kept on uvicorn's shared server state."""
    waiting: dict[FrontDoorProtocol, None] | None = getattr(state, "crogia_waiting", None)
    if waiting is None:
        waiting = {}
        state.crogia_waiting = waiting  # type: ignore[attr-defined]
    return waiting


def _evicted(state: ServerState) -> set[FrontDoorProtocol]:
    """Connections evicted (answered 503, closing) whose `connection_lost` has not come yet: a burst
    of accepts runs before any of those, and they must not count as open meanwhile."""
    evicted: set[FrontDoorProtocol] | None = getattr(state, "crogia_evicted", None)
    if evicted is None:
        evicted = set()
        state.crogia_evicted = evicted  # type: ignore[attr-defined]
    return evicted


class FrontDoorProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection, bounded in size and time (see the module's docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits_of(config)
        self.overflow = False
        """Past the cap: only `/api/health` is served, then the connection closes."""
        self._in_head = True
        self._head_bytes = 0
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._body_last = self._body_tick = self._body_active = 0.0
        self._socket = -1
        """The connection's socket when it is a plain one (not TLS): bodies may be spliced into it."""
        self._running: tuple[Any, asyncio.Task[Any]] | None = None
        """The running request's cycle and ASGI task (`_start_asgi_task`), for the shutdown deadline."""
        self._stop_timer: asyncio.TimerHandle | None = None
        self._stopped = False
        """The shutdown deadline cancelled the application: that cancellation ends its task quietly."""

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._socket = sock.fileno()
        open_now = len(self.connections) - len(_evicted(self.server_state))
        timeout = self.limits.header_timeout
        if open_now > self.limits.max_connections:
            if open_now > self.limits.max_connections + 2 * self.limits.headroom:
                log.warning("connection limit: %d connections open, answering new ones 503", open_now)
                self._close_with(AT_CAPACITY)
                return
            self._wait_past_cap()
            timeout = min(timeout, OVERFLOW_HEAD_TIMEOUT)
        self._head_timer = self.loop.call_later(timeout, self._head_late)

    def _wait_past_cap(self) -> None:
        """Join the connections past the cap; evict the oldest one still silent if they are too many.

        A flood of idle connections then cycles through the headroom while a client that asks for
        `/api/health` at once (as monitors do) is read before its turn to be evicted comes.
        """
        self.overflow = True
        waiting = _waiting_past_cap(self.server_state)
        if len(waiting) >= self.limits.headroom:
            oldest = next(iter(waiting))
            waiting.pop(oldest)
            _evicted(self.server_state).add(oldest)
            log.warning("connection limit: %d connections open, evicting a silent one", len(self.connections))
            oldest._close_with(AT_CAPACITY)
        waiting[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        _waiting_past_cap(self.server_state).pop(self, None)
        _evicted(self.server_state).discard(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful stop (an idle connection closes, a busy one after its response), with a
        deadline for the busy one."""
        super().shutdown()
        if not self.transport.is_closing() and self._stop_timer is None:
            self._stop_timer = self.loop.call_later(self.limits.shutdown_timeout, self._stop_now)

    def _stop_now(self) -> None:
        self._stop_timer = None
        if self._running is None or self.transport.is_closing():
            return
        cycle, task = self._running
        if cycle.response_complete:
            return  # (the connection ends with it: keep-alive is off since `shutdown`)
        started = cycle.response_started
        log.warning(
            "shutdown: a request still running after SHUTDOWN_TIMEOUT (%gs) is stopped (%s)",
            self.limits.shutdown_timeout, "cut short" if started else "503",
        )  # fmt: skip
        cycle.disconnected = True  # the application's sends go nowhere from here, as when a client goes
        if started:
            self._stop_timers()
            self.transport.abort()
        else:
            self._close_with(SHUTTING_DOWN)
        self._stopped = True
        task.cancel()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        async def stoppable(scope: Any, receive: Any, send: Any) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._running = (cycle, task)
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                if not self._stopped:
                    raise
                task.uncancel()  # our own cancellation (`_stop_now`): the request has been answered
            finally:
                self._running = None

        super()._start_asgi_task(cycle, stoppable)

    def handle_websocket_upgrade(self) -> None:
        self._stop_timers()  # the WebSocket protocol takes the transport; its pings watch it from now on
        super().handle_websocket_upgrade()

    def _should_upgrade(self) -> bool:
        return not self.overflow and super()._should_upgrade()

    # --- bytes in ---

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_timer is None:  # the first byte of a request after a keep-alive wait
                self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_late)
            room = self.limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                self._head_bytes += room
                if not self._feed(data[:room]):
                    return
                if self._in_head:
                    self._too_large(f"Request headers are larger than {self.limits.max_header_bytes} bytes.")
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        if self._feed(data) and not self._in_head and self.cycle is not None and self.cycle.more_body:
            self._watch_body()

    def _feed(self, data: bytes) -> bool:
        """uvicorn's `data_received`, with a 431 for too many headers; False once the connection ends."""
        if self.parser is None or self.transport.is_closing():
            return False
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _TooManyHeaders):
                self._too_large(f"A request may carry at most {self.limits.max_headers} header fields.")
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return False
        return not self.transport.is_closing()

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._socket >= 0:
            zero_copy.extension(self.scope)  # type: ignore[arg-type]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_headers:
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        if self.overflow:
            _waiting_past_cap(self.server_state).pop(self, None)
            health = self.parser.get_method() == b"GET" and httptools.parse_url(self.url).path == HEALTH_PATH
            self.app = self.config.loaded_app if health else at_capacity
        super().on_headers_complete()
        if self.overflow and self.cycle is not None:
            self.cycle.keep_alive = False
        if self._socket >= 0 and self.cycle is not None:  # (its ASGI task calls it once it runs)
            self.cycle.send = functools.partial(zero_copy.send, self.cycle, self._socket)  # type: ignore[method-assign]
            zero_copy.lending(self.cycle, self._socket)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_last = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_fields = True, 0, 0
        self._stop_body_watch()
        super().on_message_complete()

    # --- timers ---

    def _head_late(self) -> None:
        self._head_timer = None
        if self.flow.read_paused:  # a pipelined request waits for the one before it: not the client's delay
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_late)
            return
        if self._in_head and not self.transport.is_closing():
            detail = f"The request head did not arrive within {self.limits.header_timeout:g} s."
            self._close_with(answer(408, "Request Timeout", detail))

    def _watch_body(self) -> None:
        if self._body_timer is None:
            now = self.loop.time()
            self._body_bytes, self._body_last, self._body_tick, self._body_active = 0, now, now, 0.0
            self._body_timer = self.loop.call_later(BODY_CHECK_EVERY, self._check_body)

    def _check_body(self) -> None:
        now = self.loop.time()
        tick, self._body_tick = now - self._body_tick, now
        if self.flow.read_paused:  # waiting on the application, not on the client
            self._body_last = now
        else:
            self._body_active += tick
            grace = self.limits.body_timeout
            stalled = now - self._body_last >= grace
            slow = self._body_bytes < (self._body_active - grace) * self.limits.body_min_rate
            if stalled or slow:
                self._body_timer = None
                self._body_late()
                return
        self._body_timer = self.loop.call_later(BODY_CHECK_EVERY, self._check_body)

    def _body_late(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        if cycle is not None:
            cycle.disconnected = True  # the application sees http.disconnect; its answer goes nowhere
        detail = (
            f"The request body stalled for {self.limits.body_timeout:g} s or arrived slower than "
            f"{self.limits.body_min_rate} bytes/s."
        )
        self._close_with(answer(408, "Request Timeout", detail))

    def _stop_body_watch(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_timers(self) -> None:
        self._cancel_head_timer()
        self._stop_body_watch()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None

    # --- answers the application never sees ---

    def _too_large(self, detail: str) -> None:
        self._close_with(answer(431, "Request Header Fields Too Large", detail))

    def _close_with(self, response: bytes) -> None:
        self._stop_timers()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()
