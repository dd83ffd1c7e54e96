"""The server's half of the daemon's `pty_*` messages (`daemon/executor_pty.py` holds the other half).

Every message shape of the terminal protocol is built or checked here, nowhere else on the
server: the request arguments, the check of each reply and of the `pty_exit` push (the daemon
may be compromised, so a push that is not exactly what it should be is a protocol error and
drops the connection), and the router that hands each exit to the terminal it belongs to.
A terminal's bytes are not messages: they are binary frames on the byte stream of its
`pty_open` request (raw bytes both ways, within the protocol's credit windows), which the
router keeps by terminal for the input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from crogia.sandbox.daemon.executor_proto import ProtocolError as ProtocolError

if TYPE_CHECKING:
    from crogia.sandbox.executor_client import ByteStream

log = logging.getLogger(__name__)

PTY_PUSHES = frozenset({"pty_exit"})
"""The `type` of the messages the daemon pushes about terminals."""
EARLY_MAX = 1024
"""Exits kept for terminals whose `pty_open` reply its opener has not yet seen."""


class PtyListener(Protocol):
    """Told about one terminal's output and its end, on the event loop."""

    def on_output(self, data: bytes) -> None: ...

    def on_exit(self, exit_code: int | None) -> None:
        """The shell ended, with `exit_code` (None: the daemon could not tell)."""

    def on_lost(self) -> None:
        """The connection to the sandbox ended (the sandbox stopped, or was removed)."""


@dataclass(frozen=True, slots=True)
class PtyExit:
    tid: int
    exit_code: int | None


def open_args(*, cols: int, rows: int) -> dict[str, Any]:
    """The arguments of `pty_open` (sent with `ExecutorClient.open_stream("pty_open", ...)`)."""
    return {"cols": cols, "rows": rows}


def resize_request(tid: int, *, cols: int, rows: int) -> dict[str, Any]:
    return {"op": "pty_resize", "tid": tid, "cols": cols, "rows": rows}


def close_request(tid: int, *, grace: float) -> dict[str, Any]:
    return {"op": "pty_close", "tid": tid, "grace": grace}


def _int(msg: Mapping[str, Any], name: str, *, optional: bool = False) -> int | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise ProtocolError(f"{msg.get('type') or 'reply'}: {name} must be a small int")
    return value


def open_reply(reply: Mapping[str, Any]) -> int:
    """The tid in a pty_open reply."""
    tid = _int(reply, "tid")
    assert tid is not None
    return tid


def close_reply(reply: Mapping[str, Any]) -> int | None:
    return _int(reply, "exit_code", optional=True)


def parse_push(msg: Mapping[str, Any]) -> PtyExit:
    """Check one push; ProtocolError for anything but a well-formed pty_exit."""
    if msg.get("type") != "pty_exit":
        raise ProtocolError(f"not a terminal push: {str(msg.get('type'))[:40]!r}")
    tid = _int(msg, "tid")
    assert tid is not None
    return PtyExit(tid, _int(msg, "exit_code", optional=True))


class PtyRouter:
    """One daemon connection's terminals: their byte streams, and who hears of their exit.

    An exit may arrive before the opener has read its pty_open reply: while an open is in
    flight, those of an unknown tid are kept (up to EARLY_MAX) and handed over on `register`.
    """

    def __init__(self) -> None:
        self._listeners: dict[int, PtyListener] = {}
        self._streams: dict[int, ByteStream] = {}
        self._early: dict[int, PtyExit] = {}
        self.opening = 0
        """pty_open requests in flight on this connection."""

    def register(self, tid: int, listener: PtyListener, stream: ByteStream) -> None:
        self._listeners[tid] = listener
        self._streams[tid] = stream
        early = self._early.pop(tid, None)
        if not self.opening:
            self._early.clear()
        if early is not None:
            self._deliver(listener, early)

    def stream(self, tid: int) -> ByteStream | None:
        """The byte stream of terminal `tid` (None once it ended or was never opened here)."""
        return self._streams.get(tid)

    def unregister(self, tid: int) -> ByteStream | None:
        """Stop telling anyone about `tid`; its stream, which the caller aborts when done with it."""
        self._listeners.pop(tid, None)
        return self._streams.pop(tid, None)

    def dispatch(self, msg: Mapping[str, Any]) -> None:
        """Route one push (its `type` is in PTY_PUSHES); raises ProtocolError for a malformed one."""
        push = parse_push(msg)
        listener = self._listeners.get(push.tid)
        if listener is not None:
            self._deliver(listener, push)
        elif self.opening and len(self._early) < EARLY_MAX:
            self._early[push.tid] = push

    def end_all(self) -> None:
        """The connection is gone: every terminal on it has ended (its stream failed with it)."""
        listeners, self._listeners, self._streams = list(self._listeners.values()), {}, {}
        self._early.clear()
        for listener in listeners:
            try:
                listener.on_lost()
            except Exception:
                log.exception("terminal listener %r failed", listener)

    def _deliver(self, listener: PtyListener, push: PtyExit) -> None:
        self._listeners.pop(push.tid, None)
        stream = self._streams.pop(push.tid, None)
        if stream is not None:
            stream.abort()  # the daemon is done with it (its end came before the exit)
        try:
            listener.on_exit(push.exit_code)
        except Exception:  # a faulty listener must not break the connection for everyone
            log.exception("terminal listener %r failed", listener)
