"""`ExecutorClient`: one connection to a daemon, whose every message is checked before it is believed.

The daemon runs where the sandbox's root can replace or trace it, so what it sends is untrusted
input: each line is bounded (`LineReader`, the limit widened only while a request that may answer
at length is in flight), each message must match `executor_proto`'s tables, and exit notices pass
a token bucket (a flood is dropped with a warning, never queued). A violation closes the
connection and fails its requests with `ProtocolViolation` (502); only that session is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from crogia.errors import Conflict, CrogiaError, InvalidInput, NotFound, SandboxError, TooLarge, Unavailable
from crogia.sandbox.base import ExitListener
from crogia.sandbox.channel import ProtocolViolation, Stream, decode, send
from crogia.sandbox.daemon import executor_proto as proto
from crogia.sandbox.pty_channel import PTY_PUSHES, PtyRouter

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


class _Bucket:
    """A token bucket: `take()` is False while over `rate` per second after a `burst`."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens, self.at = float(burst), time.monotonic()
        self.dropped, self.warned = 0, 0.0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.dropped += 1
        return False


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
        self._exit_listener: ExitListener | None = None
        self._exits = _Bucket(EXIT_BURST, EXIT_RATE)
        self._closed = False
        self.ptys = PtyRouter()
        """The terminals opened over this connection (they end with it)."""
        self._reader_task = asyncio.create_task(self._read_loop(), name="executor-reader")

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost."""
        return self._closed

    def set_exit_listener(self, listener: ExitListener | None) -> None:
        self._exit_listener = listener

    async def request(
        self, op: str, *, on_chunk: Callable[[str], None] | None = None, allow: int = 0, **args: Any
    ) -> dict[str, Any]:
        """Send one request and wait for its checked reply values; raises `CrogiaError` subclasses.

        `allow`: how long a line this request's reply (or chunk) may be beyond `LINE_BASE`.
        If the caller is cancelled while an `exec` is in flight, the daemon is told to kill it.
        """
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
            self._pending.pop(rid, None)
            self._ops.pop(rid, None)
            self._chunks.pop(rid, None)
            if self._allowances.pop(rid, None) is not None:
                self._lines.limit = LINE_BASE + max(self._allowances.values(), default=0)

    async def _read_loop(self) -> None:
        error: CrogiaError = Unavailable("lost the connection to the sandbox's executor")
        try:
            while (line := await self._lines.line()) is not None:
                self._dispatch(decode(line))
        except proto.ProtocolError as exc:
            log.warning("the executor broke the protocol, closing its connection: %s", exc)
            error = ProtocolViolation(f"the sandbox's executor broke the protocol: {exc}")
        except ConnectionError as exc:
            log.warning("executor connection broke: %s", exc)
        finally:
            self._closed = True
            self._writer.close()
            self._fail_pending(error)
            self.ptys.end_all()

    def _dispatch(self, msg: Any) -> None:
        kind = proto.check_message(msg)
        if kind == "result":
            future = self._pending.get(msg["id"])
            if future is None or future.done():
                return  # the answer to a request given up on
            if msg["ok"]:
                future.set_result(proto.check_result(self._ops[msg["id"]], msg))
            else:
                future.set_exception(_error_from(*proto.check_error(msg)))
        elif kind == "chunk":
            self._call(self._chunks.get(msg["id"]), msg["data"])
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

    async def close(self) -> None:
        """Close the connection; pending requests fail with `Unavailable`."""
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._fail_pending(Unavailable("the connection to the sandbox's executor was closed"))
