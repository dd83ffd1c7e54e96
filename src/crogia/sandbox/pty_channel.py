"""The server's half of the daemon's `pty_*` messages (`daemon/executor_pty.py` holds the other half).

Every message shape of the terminal protocol is built or checked here, nowhere else on the
server: the request builders, the check of each reply and push (the daemon may be compromised,
so a push that is not exactly what it should be is a protocol error and drops the connection),
and the router that hands each push to the terminal it belongs to. Terminal bytes travel as
base64 strings inside the JSON lines.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from crogia.sandbox.daemon.executor_proto import ProtocolError as ProtocolError

log = logging.getLogger(__name__)

PTY_PUSHES = frozenset({"pty_output", "pty_exit"})
"""The `type` of the messages the daemon pushes about terminals."""
OUTPUT_MAX = 64 * 1024
"""Bytes one pty_output may carry (decoded): the daemon reads at most this much per wake-up."""
INPUT_MAX = 64 * 1024
"""Bytes one pty_input may carry (decoded)."""
_B64_MAX = (OUTPUT_MAX + 2) // 3 * 4
EARLY_MAX = 1024 * 1024
"""Bytes of pushes kept for a terminal whose `pty_open` reply its opener has not yet seen."""


class PtyListener(Protocol):
    """Told about one terminal's output and its end, on the event loop."""

    def on_output(self, data: bytes) -> None: ...

    def on_exit(self, exit_code: int | None) -> None:
        """The shell ended, with `exit_code` (None: the daemon could not tell)."""

    def on_lost(self) -> None:
        """The connection to the sandbox ended (the sandbox stopped, or was removed)."""


@dataclass(frozen=True, slots=True)
class PtyOutput:
    tid: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PtyExit:
    tid: int
    exit_code: int | None


def open_request(*, cols: int, rows: int) -> dict[str, Any]:
    return {"op": "pty_open", "cols": cols, "rows": rows}


def input_request(tid: int, data: bytes) -> dict[str, Any]:
    if len(data) > INPUT_MAX:
        raise ValueError(f"pty_input carries at most {INPUT_MAX} bytes")
    return {"op": "pty_input", "tid": tid, "data_b64": base64.b64encode(data).decode()}


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


def parse_push(msg: Mapping[str, Any]) -> PtyOutput | PtyExit:
    """Check one push; ProtocolError for anything but a well-formed pty_output or pty_exit."""
    tid = _int(msg, "tid")
    assert tid is not None
    if msg.get("type") == "pty_exit":
        return PtyExit(tid, _int(msg, "exit_code", optional=True))
    data = msg.get("data_b64")
    if not isinstance(data, str) or len(data) > _B64_MAX:
        raise ProtocolError(f"pty_output: data_b64 must be a string of at most {_B64_MAX} characters")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("pty_output: data_b64 is not base64") from None
    if len(raw) > OUTPUT_MAX:
        raise ProtocolError(f"pty_output: more than {OUTPUT_MAX} bytes")
    return PtyOutput(tid, raw)


class PtyRouter:
    """One daemon connection's terminals: hands each push to its listener.

    Pushes may arrive before the opener has read its pty_open reply: while an open is in flight,
    those of an unknown tid are kept (up to EARLY_MAX bytes) and handed over on `register`.
    """

    def __init__(self) -> None:
        self._listeners: dict[int, PtyListener] = {}
        self._early: dict[int, list[PtyOutput | PtyExit]] = {}
        self._early_bytes = 0
        self.opening = 0
        """pty_open requests in flight on this connection."""

    def register(self, tid: int, listener: PtyListener) -> None:
        self._listeners[tid] = listener
        early = self._early.pop(tid, [])
        if not self.opening:
            self._early.clear()
            self._early_bytes = 0
        for push in early:
            self._deliver(listener, push)

    def unregister(self, tid: int) -> None:
        self._listeners.pop(tid, None)

    def dispatch(self, msg: Mapping[str, Any]) -> None:
        """Route one push (its `type` is in PTY_PUSHES); raises ProtocolError for a malformed one."""
        push = parse_push(msg)
        listener = self._listeners.get(push.tid)
        if listener is not None:
            self._deliver(listener, push)
        elif self.opening and self._early_bytes < EARLY_MAX:
            self._early.setdefault(push.tid, []).append(push)
            self._early_bytes += len(push.data) if isinstance(push, PtyOutput) else 1

    def end_all(self) -> None:
        """The connection is gone: every terminal on it has ended."""
        listeners, self._listeners = list(self._listeners.values()), {}
        self._early.clear()
        for listener in listeners:
            try:
                listener.on_lost()
            except Exception:
                log.exception("terminal listener %r failed", listener)

    def _deliver(self, listener: PtyListener, push: PtyOutput | PtyExit) -> None:
        try:
            if isinstance(push, PtyOutput):
                listener.on_output(push.data)
            else:
                self._listeners.pop(push.tid, None)
                listener.on_exit(push.exit_code)
        except Exception:  # a faulty listener must not break the connection for everyone
            log.exception("terminal listener %r failed", listener)
