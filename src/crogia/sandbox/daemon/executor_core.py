"""The executor's core: its wire format, its epoll loop, and requests running as tasks.

Part of the executor daemon (`executor.py` says how it fits): standard library only, imported by
name from the daemon's own folder, and kept as cheap to import as the rest of it.
"""

from __future__ import annotations

import select
import sys
import time
from _json import encode_basestring as _quote
from _json import make_scanner

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, ClassVar

    from executor import Connection

    Message = dict[str, Any]
    Steps = Generator[tuple[Callable[[], bool] | None, float | None], bool, Any]
    RequestId = int | str | None

IN, OUT = select.EPOLLIN, select.EPOLLOUT
HANDED = "_handed"
"""The key of an op's result that holds a socket to send with the reply (SCM_RIGHTS), not in it."""


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


class RequestError(Exception):
    """A request failed in a way its client should hear about."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Decoding:  # what json's C scanner reads from a JSONDecoder
    strict, object_hook, object_pairs_hook = True, None, None
    memo: ClassVar[dict[str, Any]] = {}
    parse_float = parse_constant = float
    parse_int = int


_scan = make_scanner(_Decoding())  # type: ignore[arg-type]


def loads(line: bytes) -> Any:
    text = line.decode().strip(" \t\n\r")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def dumps(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_quote(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    return "[" + ",".join(map(dumps, value)) + "]"


def arg(req: Message, name: str, kind: Any, default: Any = ...) -> Any:
    value = req.get(name, default)
    if value is ...:
        raise RequestError("bad_request", f"missing argument {name!r}")
    if value is not None and value is not default and not isinstance(value, kind):
        raise RequestError("bad_request", f"argument {name!r} has the wrong type")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise RequestError("bad_request", f"argument {name!r} has the wrong type")
    return value


class Loop:
    """One thread's epoll loop: fd callbacks, and tasks waiting for a condition or a deadline."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], object]] = {}
        self.waiting: set[Task] = set()
        self.tasks: set[Task] = set()

    def watch(self, fd: int, callback: Callable[[int], object], mask: int = IN) -> None:
        (self.epoll.modify if fd in self.handlers else self.epoll.register)(fd, mask)
        self.handlers[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def run(self, until: Callable[[], bool]) -> None:
        while not until():
            deadlines = [t.deadline for t in self.waiting if t.deadline is not None]
            for fd, events in self.epoll.poll(max(min(deadlines) - time.monotonic(), 0) if deadlines else -1):
                try:  # a stale event (its fd closed and reused meanwhile) finds nothing to read: fine
                    self.handlers.get(fd, bool)(events)
                except Exception as exc:
                    log(f"ERROR handler for fd {fd} failed: {exc!r}")
            progressed = True
            while progressed:  # a resumed task may make another one ready
                now = time.monotonic()
                ready = [t for t in self.waiting if t.ready(now)]
                for task in ready:
                    self.waiting.discard(task)
                    task.step()
                progressed = bool(ready)


LOOP = Loop()


class Task:
    """One request being carried out; its generator's value (or exception) becomes the reply."""

    def __init__(self, conn: Connection | None, rid: RequestId, op: str, steps: Steps) -> None:
        self.conn, self.rid, self.op, self.steps = conn, rid, op, steps
        self.cond: Callable[[], bool] | None = None
        self.deadline: float | None = None
        self.cancel_state = 0  # 1: asked for, 2: told (a second cancel must not cut cleanup short)
        LOOP.tasks.add(self)
        if conn is not None:
            conn.tasks[rid] = self
        self.step()

    def ready(self, now: float) -> bool:
        if self.cancel_state == 1 or (self.deadline is not None and now >= self.deadline):
            return True
        return self.cond is not None and self.cond()

    def step(self) -> None:
        handed = None
        try:
            self.cond, self.deadline = self.steps.send(self.cancel_state == 1 or None)  # type: ignore[arg-type]
        except StopIteration as stop:
            handed = stop.value.pop(HANDED, None)
            reply = {"type": "result", "id": self.rid, "ok": True, **stop.value}
        except RequestError as exc:
            reply = error_reply(self.rid, exc.code, str(exc))
        except OSError as exc:
            reply = error_reply(self.rid, "bad_request", f"{self.op} failed: {exc.strerror or exc}")
        except Exception as exc:
            log(f"ERROR request {self.rid!r} ({self.op}) failed: {exc!r}")
            reply = error_reply(self.rid, "internal", f"{self.op} failed: {exc!r}")
        else:
            self.cancel_state = 2 if self.cancel_state else 0
            if self.deadline is not None:
                self.deadline += time.monotonic()
            LOOP.waiting.add(self)
            return
        LOOP.tasks.discard(self)
        if self.conn is not None:
            self.conn.tasks.pop(self.rid, None)
            self.conn.send(reply, handed.fileno() if handed is not None else None)
        if handed is not None:  # it rode on the reply (or could not): ours no more either way
            handed.close()


def error_reply(rid: Any, code: str, message: str) -> Message:
    return {"type": "result", "id": rid, "ok": False, "code": code, "error": message}


def cancelled_error() -> RequestError:
    return RequestError("cancelled", "request was cancelled")
