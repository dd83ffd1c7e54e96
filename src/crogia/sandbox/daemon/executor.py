#!/usr/bin/env python3
"""Crogia's executor daemon: runs inside every sandbox and executes commands for the server.

Standard library only; runs on Python 3.9+ as `python3 /opt/crogia/executor.py --socket PATH`
(the server starts it through `compile()` instead, see `daemon_command()`: ~2 MB less memory).
It needs an init process above it to reap orphans (tini in Docker, bwrap's pid 1 under bubblewrap).

Protocol: newline-delimited JSON objects (UTF-8) over a unix stream socket. Several clients
may be connected at once; every request carries an `id` (int or str) chosen by its client and
unique among that connection's in-flight requests. Replies may come in any order.

Request:   {"id": 7, "op": "<op>", ...arguments}
Reply:     {"type": "result", "id": 7, "ok": true, ...values}
           {"type": "result", "id": 7, "ok": false, "code": "bad_request|not_found|cancelled|internal",
            "error": "human message"}
Chunk:     {"type": "chunk", "id": 7, "data": "text"}      (exec with stream=true, before its result)
Exit:      {"type": "exit", "pid": 12, "exit_code": 0}     (pushed to every client, no id)

Ops and their values:
  ping                                          -> {version, pid}
  exec {cmd, cwd?, env?, timeout?, max_output?, tty?, stream?, stream_rate?}
                                                -> {exit_code, output, timed_out, truncated}
      `bash -c cmd` in a new session; stdout+stderr combined (one pty when tty). On timeout the
      whole process group is SIGKILLed and exit_code is 124; killed by signal N gives 128+N.
      Output past max_output bytes keeps its head and tail around a marker giving the cut size.
      When the command ends (or times out), what it left running in its process group is killed.
      Streamed chunks: max_output bytes at once, then stream_rate bytes/s (default 1 MiB/s); the
      rest is skipped with a marker saying how much (the result still keeps head and tail).
      Execs still running when their connection closes are killed like cancelled ones.
  cancel {target}                               -> {cancelled: bool}   kill an exec of this connection
  spawn {cmd, cwd?, env?}                       -> {pid, log}   background, own process group,
      stdout+stderr appended to <log-dir>/<pid>.log; an `exit` notice follows when it ends.
  terminate {pid, grace?}                       -> {exit_code}  SIGTERM the group, SIGKILL after grace
  tail {pid, lines?}                            -> {output}     last lines of a process's log
      (also of a process from before a restart, while its log file is there)
  list                                          -> {processes: [{pid, cmd, log, running, exit_code,
                                                    started, ended}]}  (times are epoch seconds)

Children get the daemon's own environment plus LANG=C.UTF-8, a default PATH and HOME (and TERM
under a tty), overridden by the request's `env`. A bad request never stops the daemon.

Design: every sandbox pays for this process while it idles, so it imports almost nothing (no
asyncio, nor json's regexes or socket's and signal's enums) and stays one small file (compiling it
is most of its start). One thread runs an epoll loop; a request is a generator yielding
`(condition, seconds)`, resumed when the condition holds or the time is up; the yield evaluates to
True when the request was cancelled. Children start through posix_spawn (no copy of this process)
and are waited for through pidfds: no thread to start, so a fork bomb cannot hide a command's end.
"""

from __future__ import annotations

import _socket
import codecs
import errno
import fcntl
import os
import select
import struct
import sys
import termios
import time
from _json import encode_basestring as _quote
from _json import make_scanner

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Generator
    from typing import Any, ClassVar

    Message = dict[str, Any]
    Steps = Generator[tuple[Callable[[], bool] | None, float | None], bool, Any]
    RequestId = int | str | None
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

PROTOCOL_VERSION = 1
READ_LIMIT = 64 * 1024 * 1024
CHUNK_SIZE = 65536
TAIL_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After bash exits, a backgrounded child may keep the output open: read on only this long.
DRAIN_GRACE = 0.2
STREAM_RATE = 1024 * 1024
"""Bytes per second a streamed command sends once its first max_output bytes are out."""
BACKLOG_MAX = 8 * 1024 * 1024
"""Streamed chunks are skipped (and counted) while their client has this much unread."""
IN, OUT = select.EPOLLIN, select.EPOLLOUT


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


def _arg(req: Message, name: str, kind: Any, default: Any = ...) -> Any:
    value = req.get(name, default)
    if value is ...:
        raise RequestError("bad_request", f"missing argument {name!r}")
    if value is not None and value is not default and not isinstance(value, kind):
        raise RequestError("bad_request", f"argument {name!r} has the wrong type")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise RequestError("bad_request", f"argument {name!r} has the wrong type")
    return value


def _child_env(extra: Any, tty: bool) -> dict[str, str]:
    if extra is None:
        extra = {}
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise RequestError("bad_request", "env must map strings to strings")
    env = dict(os.environ)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    env.setdefault("LANG", "C.UTF-8")
    if tty:
        env.setdefault("TERM", "xterm-256color")
    env.update(extra)
    return env


def _checked_cwd(req: Message) -> str:
    cwd: str = _arg(req, "cwd", str, "/workspace")
    if not os.path.isdir(cwd):
        raise RequestError("bad_request", f"working directory {cwd} does not exist")
    return cwd


def _kill(pid: int, sig: int, group: bool = True) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _members(sid: int) -> list[int]:
    """Pids whose process group or session is `sid`, from /proc (this sandbox's pid namespace)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, session, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and sid in (int(fields[2]), int(fields[3])):
            found.append(int(name))
    return found


def end_group(pgid: int, thorough: bool = False, within: float = 5.0) -> Steps:
    """SIGKILL a finished command's process group, and its session's strays, until none is left.

    A command's background jobs (or a fork bomb) keep its group when its shell exits; they go
    with it (`spawn` starts what should stay). A group-wide kill reaches every member, even one
    being forked, so the loop only waits for init to reap them. `thorough` (or a group that
    still had members) also looks in /proc for processes of the command's session that left
    its group. False if something survived `within` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
            thorough = alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if thorough:
            for pid in _members(pgid):
                alive = True
                _kill(pid, signal.SIGKILL, group=False)
        if not alive:
            return True
        if time.monotonic() > deadline:
            log(f"WARNING processes of command group {pgid} survived SIGKILL")
            return False
        yield None, 0.01


class Loop:
    """One thread's epoll loop: fd callbacks, and tasks waiting for a condition or a deadline."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.waiting: set[Task] = set()
        self.tasks: set[Task] = set()

    def watch(self, fd: int, callback: Callable[[int], None], mask: int = IN) -> None:
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
        try:
            self.cond, self.deadline = self.steps.send(self.cancel_state == 1 or None)  # type: ignore[arg-type]
        except StopIteration as stop:
            reply = {"type": "result", "id": self.rid, "ok": True, **stop.value}
        except RequestError as exc:
            reply = _error(self.rid, exc.code, str(exc))
        except OSError as exc:
            reply = _error(self.rid, "bad_request", f"{self.op} failed: {exc.strerror or exc}")
        except Exception as exc:
            log(f"ERROR request {self.rid!r} ({self.op}) failed: {exc!r}")
            reply = _error(self.rid, "internal", f"{self.op} failed: {exc!r}")
        else:
            self.cancel_state = 2 if self.cancel_state else 0
            if self.deadline is not None:
                self.deadline += time.monotonic()
            LOOP.waiting.add(self)
            return
        LOOP.tasks.discard(self)
        if self.conn is not None:
            self.conn.tasks.pop(self.rid, None)
            self.conn.send(reply)


def _error(rid: Any, code: str, message: str) -> Message:
    return {"type": "result", "id": rid, "ok": False, "code": code, "error": message}


def _cancelled() -> RequestError:
    return RequestError("cancelled", "request was cancelled")


class Child:
    """A child of the daemon, reaped when its pidfd says it ended (without pidfds: on SIGCHLD)."""

    unwatched: dict[int, Child] = {}  # noqa: RUF012

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None
        self.on_exit: Callable[[int], None] | None = None
        try:
            self.fd: int | None = os.pidfd_open(pid)
            LOOP.watch(self.fd, self.reap)
        except (AttributeError, OSError):
            self.fd = None
            Child.unwatched[pid] = self

    def reap(self, _events: int = 0) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if not pid:
            return
        code = os.waitstatus_to_exitcode(status)
        self.code = 128 - code if code < 0 else code
        Child.unwatched.pop(self.pid, None)
        if self.fd is not None:
            LOOP.unwatch(self.fd)
            os.close(self.fd)
        if self.on_exit is not None:
            self.on_exit(self.code)


def start_child(cmd: str, cwd: str, env: dict[str, str], out: int, tty: bool = False) -> Child:
    """`bash -c cmd` in a session of its own writing to `out` (a pty's end it also reads, if `tty`)."""
    # Opened by name after setsid (no O_NOCTTY), the pty becomes the session's controlling terminal.
    stdin = (os.ttyname(out), os.O_RDWR) if tty else (os.devnull, os.O_RDONLY)
    actions = [(os.POSIX_SPAWN_OPEN, 0, *stdin, 0), *((os.POSIX_SPAWN_DUP2, out, fd) for fd in (1, 2))]
    for folder in env["PATH"].split(":"):
        bash = os.path.join(folder, "bash")
        if os.access(bash, os.X_OK):
            break
    # posix_spawn (vfork-like: no copy of this process) takes no cwd: lend it ours for the call.
    os.chdir(cwd)
    try:
        pid = os.posix_spawn(bash, ["bash", "-c", cmd], env, file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))  # fmt: skip
    finally:
        os.chdir("/")
    return Child(pid)


class OutputCapture:
    """Keeps the first and last halves of `limit` bytes of a stream and counts what falls between."""

    def __init__(self, limit: int) -> None:
        self.head_limit, self.tail_limit = limit - limit // 2, limit // 2
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_limit:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> tuple[str, bool]:
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return (self.head + self.tail).decode("utf-8", "replace"), False
        head, tail = self.head.decode("utf-8", "replace"), self.tail.decode("utf-8", "replace")
        return f"{head}\n\n[... {cut} bytes of output truncated ...]\n\n{tail}", True


class LiveStream:
    """A command's output as streamed text: `burst` bytes at once, then `rate` bytes per second.

    Nobody reads gigabytes scrolling by; skipping what is over the budget (and saying how much)
    keeps a command printing without end from costing the server a byte of JSON per byte.
    """

    def __init__(self, conn: Connection, rid: RequestId, burst: int, rate: float) -> None:
        self.conn, self.rid = conn, rid
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.burst, self.rate = max(burst, 1), rate
        self.tokens, self.refilled, self.skipped = float(self.burst), time.monotonic(), 0

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final)
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < min(len(data), self.burst) or len(self.conn.outbuf) > BACKLOG_MAX:
            self.skipped += len(data)
            return
        self.tokens -= len(data)
        self.flush_skipped()
        if text:
            self.conn.send({"type": "chunk", "id": self.rid, "data": text})

    def flush_skipped(self) -> None:
        if self.skipped:
            text = f"\n[... {self.skipped} bytes of output not streamed (over {self.rate:.0f} bytes/s) ...]\n"
            self.skipped = 0
            self.conn.send({"type": "chunk", "id": self.rid, "data": text})


def _open_output(tty: bool) -> tuple[int, int]:
    """Return (read end, child end) of a pipe or a pty; the read end is non-blocking."""
    if tty:
        read_fd, child_fd = os.openpty()
        fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    else:
        read_fd, child_fd = os.pipe()
    os.set_blocking(read_fd, False)
    return read_fd, child_fd


def run_command(req: Message, conn: Connection, rid: RequestId) -> Steps:
    """Carry out one `exec` request; cancelling it kills the command's group."""
    cmd: str = _arg(req, "cmd", str)
    timeout = _arg(req, "timeout", (int, float), None)
    max_output: int = _arg(req, "max_output", int, 1024 * 1024)
    tty = bool(req.get("tty", False))
    stream_rate = float(_arg(req, "stream_rate", (int, float), STREAM_RATE))
    cwd, env = _checked_cwd(req), _child_env(req.get("env"), tty)
    capture = OutputCapture(max(max_output, 1))
    live = LiveStream(conn, rid, max_output, stream_rate) if req.get("stream") else None
    read_fd, child_fd = _open_output(tty)
    try:
        proc = start_child(cmd, cwd, env, child_fd, tty)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(child_fd)
    eof = []

    def on_data(_events: int) -> None:
        try:
            data = os.read(read_fd, CHUNK_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: a pty whose last slave closed
            if exc.errno != errno.EIO:
                log(f"WARNING reading a command's output failed: {exc}")
            data = b""
        if not data:
            eof.append(True)
            LOOP.unwatch(read_fd)
            return
        capture.add(data)
        if live is not None:
            live.feed(data)

    LOOP.watch(read_fd, on_data)
    cancelled = yield lambda: proc.code is not None, timeout
    if not cancelled and proc.code is not None:
        cancelled = yield lambda: bool(eof), DRAIN_GRACE
    # Whatever the command left in its group (background jobs, a fork bomb) ends with it.
    timed_out = proc.code is None
    yield from end_group(proc.pid, thorough=timed_out)
    yield lambda: proc.code is not None, 2
    yield lambda: bool(eof), DRAIN_GRACE  # the last words of what was just killed
    LOOP.unwatch(read_fd)
    os.close(read_fd)
    if cancelled:
        raise _cancelled()
    if live is not None:
        live.feed(b"", final=True)
        live.flush_skipped()
    output, truncated = capture.text()
    code = 124 if timed_out else proc.code
    return {"exit_code": code, "output": output, "timed_out": timed_out, "truncated": truncated}


class Background:
    """The background processes started by `spawn`, kept for the daemon's lifetime."""

    def __init__(self, log_dir: str, notify: Callable[[Message], None]) -> None:
        self.log_dir, self.notify = log_dir, notify
        self.entries: dict[int, dict[str, Any]] = {}

    def spawn(self, req: Message) -> Message:
        cmd: str = _arg(req, "cmd", str)
        cwd, env = _checked_cwd(req), _child_env(req.get("env"), False)
        # The pid is known only after the spawn: log to a temporary name, then rename the open file.
        tmp = os.path.join(self.log_dir, f".spawn-{os.getpid()}-{time.monotonic_ns()}.log")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            proc = start_child(cmd, cwd, env, fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        path = os.path.join(self.log_dir, f"{proc.pid}.log")
        os.replace(tmp, path)
        entry = {"pid": proc.pid, "cmd": cmd, "log": path, "running": True, "exit_code": None,
                 "started": time.time(), "ended": None}  # fmt: skip
        self.entries[proc.pid] = entry

        def ended(code: int) -> None:
            entry.update(running=False, exit_code=code, ended=time.time())
            self.notify({"type": "exit", "pid": proc.pid, "exit_code": code})

        proc.on_exit = ended
        return {"pid": proc.pid, "log": path}

    def terminate(self, req: Message) -> Steps:
        pid: int = _arg(req, "pid", int)
        grace = float(_arg(req, "grace", (int, float), 5.0))
        entry = self.entries.get(pid)
        if entry is None:
            raise RequestError("not_found", f"no background process with pid {pid}")
        if entry["running"]:
            _kill(pid, signal.SIGTERM)
            if (yield lambda: not entry["running"], max(grace, 0.0)):
                raise _cancelled()
        _kill(pid, signal.SIGKILL)  # even when the leader obeyed, the rest of its group goes too
        while entry["running"]:
            if (yield lambda: not entry["running"], None):
                raise _cancelled()
        return {"exit_code": entry["exit_code"]}

    def tail(self, req: Message) -> Message:
        lines: int = _arg(req, "lines", int, 50)
        pid: int = _arg(req, "pid", int)
        output = _tail_file(os.path.join(self.log_dir, f"{pid}.log"), max(0, min(lines, 100_000)))
        # A log from before a restart of this sandbox is still worth reading.
        if output is None and pid not in self.entries:
            raise RequestError("not_found", f"no background process with pid {pid}")
        return {"output": output or ""}

    def shutdown(self, grace: float) -> Steps:
        running = [pid for pid, e in self.entries.items() if e["running"]]
        for pid in running:
            _kill(pid, signal.SIGTERM)
        yield lambda: not any(self.entries[p]["running"] for p in running), grace
        for pid in running:
            _kill(pid, signal.SIGKILL)
        return {}


def _tail_file(path: str, lines: int) -> str | None:
    """The last `lines` lines of the file, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - TAIL_MAX_BYTES))
            data = f.read() if lines else b""
    except FileNotFoundError:
        return None
    return b"".join(data.splitlines(keepends=True)[-lines:]).decode("utf-8", "replace")


class Connection:
    """One client: reads request lines, runs each as a task, writes replies as they come."""

    def __init__(self, daemon: Daemon, fd: int) -> None:
        self.daemon, self.fd, self.open = daemon, fd, True
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.tasks: dict[RequestId, Task] = {}
        LOOP.watch(fd, self.on_event)

    def send(self, msg: Message) -> None:
        if self.open:  # a lone surrogate (a client's string id) becomes a JSON escape, not an error
            self.outbuf += (dumps(msg) + "\n").encode("utf-8", "backslashreplace")
            self.flush()

    def flush(self) -> None:
        try:
            del self.outbuf[: os.write(self.fd, self.outbuf)]
        except BlockingIOError:
            pass
        except OSError:
            return self.close()
        LOOP.watch(self.fd, self.on_event, IN | OUT if self.outbuf else IN)

    def on_event(self, events: int) -> None:
        if events & OUT and self.outbuf:
            self.flush()
        if not (self.open and events & ~OUT):
            return
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        start = len(self.inbuf)
        self.inbuf += data
        while self.open and (end := self.inbuf.find(b"\n", start)) >= 0:
            line, start = bytes(self.inbuf[: end + 1]), 0
            del self.inbuf[: end + 1]
            self.receive(line)
        if self.open and (not data or len(self.inbuf) > READ_LIMIT):
            if data:
                log("WARNING connection dropped: a request line over the size limit")
            elif self.inbuf:
                self.receive(bytes(self.inbuf))  # a last line without its newline
            self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            LOOP.unwatch(self.fd)
            os.close(self.fd)
            self.daemon.connections.discard(self)
            for task in self.tasks.values():
                if task.op == "exec":
                    task.cancel_state = task.cancel_state or 1

    def receive(self, line: bytes) -> None:
        try:
            req = loads(line)
        except Exception:  # ValueError, and RecursionError for absurd nesting
            return self.send(_error(None, "bad_request", "request is not valid JSON"))
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(req, dict) or isinstance(rid, bool) or not isinstance(rid, (int, str)):
            self.send(_error(None, "bad_request", "request must be an object with an int or str id"))
        elif rid in self.tasks:
            self.send(_error(rid, "bad_request", f"request id {rid!r} is already in flight"))
        elif req.get("op") == "cancel":
            target = req.get("target")
            task = self.tasks.get(target) if isinstance(target, (int, str)) else None
            if task is not None:
                task.cancel_state = task.cancel_state or 1
            self.send({"type": "result", "id": rid, "ok": True, "cancelled": task is not None})
        else:
            op = str(req.get("op"))
            Task(self, rid, op, self.daemon.handle(op, req, self, rid))


class Daemon:
    """Shared state of the executor: the background processes and the connected clients."""

    def __init__(self, log_dir: str) -> None:
        self.connections: set[Connection] = set()
        self.background = Background(log_dir, self.broadcast)
        self.stopping = False

    def broadcast(self, msg: Message) -> None:
        for conn in list(self.connections):
            conn.send(msg)

    def handle(self, op: str, req: Message, conn: Connection, rid: RequestId) -> Steps:
        if op == "ping":
            return {"version": PROTOCOL_VERSION, "pid": os.getpid()}
        if op == "exec":
            return (yield from run_command(req, conn, rid))
        if op == "spawn":
            return self.background.spawn(req)
        if op == "terminate":
            return (yield from self.background.terminate(req))
        if op == "tail":
            return self.background.tail(req)
        if op == "list":
            return {"processes": [dict(e) for e in self.background.entries.values()]}
        raise RequestError("bad_request", f"unknown op {op!r}")

    def accept(self, listener: _socket.socket) -> None:
        while True:
            try:
                fd, _ = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            os.set_blocking(fd, False)
            self.connections.add(Connection(self, fd))

    def on_signal(self, wakeup: int) -> None:
        received = os.read(wakeup, 512)
        self.stopping = self.stopping or signal.SIGTERM in received or signal.SIGINT in received
        for child in list(Child.unwatched.values()):
            child.reap()


def _trim_heap() -> Steps:
    """Give back the ~2 MB that compiling this file left in the C heap (glibc only), once idle."""
    yield None, 0.2
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, AttributeError, OSError):
        pass
    return {}


def serve(socket_path: str, log_dir: str) -> None:
    """Listen on `socket_path` until SIGTERM or SIGINT, then stop background processes."""
    os.makedirs(log_dir, exist_ok=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # left over from a previous run of this sandbox
    daemon = Daemon(log_dir)
    wakeup, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):  # SIGCHLD: for a kernel without pidfds
        signal.signal(sig, lambda *_: None)
    LOOP.watch(wakeup, lambda _: daemon.on_signal(wakeup))
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.setblocking(False)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(128)
    LOOP.watch(listener.fileno(), lambda _: daemon.accept(listener))
    log(f"INFO executor listening on {socket_path} (pid {os.getpid()})")
    Task(None, None, "trim", _trim_heap())
    LOOP.run(until=lambda: daemon.stopping)
    LOOP.unwatch(listener.fileno())
    listener.close()
    for conn in list(daemon.connections):
        conn.close()
    for task in LOOP.tasks:
        task.cancel_state = task.cancel_state or 1
    Task(None, None, "shutdown", daemon.background.shutdown(grace=2.0))
    deadline = time.monotonic() + 10
    LOOP.run(until=lambda: not LOOP.tasks or time.monotonic() > deadline)
    if os.path.exists(socket_path):
        os.unlink(socket_path)


def main(argv: list[str] | None = None) -> None:
    args = {"--socket": "/run/crogia/executor.sock", "--log-dir": ""}
    rest = list(sys.argv[1:] if argv is None else argv)
    while rest:
        name, _, value = rest.pop(0).partition("=")
        if name in ("-h", "--help"):
            sys.exit(f"usage: {sys.argv[0]} [--socket PATH] [--log-dir PATH (default: SOCKET_DIR/logs)]")
        if name not in args or not (value or rest):
            sys.exit(f"{sys.argv[0]}: bad arguments; see --help")
        args[name] = value or rest.pop(0)
    sock = args["--socket"]
    serve(sock, args["--log-dir"] or os.path.join(os.path.dirname(os.path.abspath(sock)), "logs"))


if __name__ == "__main__":
    main()
