#!/usr/bin/env python3
"""Crogia's executor daemon: runs inside every sandbox and executes commands for the server.

Standard library only; runs on Python 3.9+ as `python3 /opt/crogia/executor.py --socket PATH`.
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
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import errno
import fcntl
import json
import logging
import os
import pty
import signal
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any, Union

PROTOCOL_VERSION = 1
READ_LIMIT = 64 * 1024 * 1024
CHUNK_SIZE = 65536
TAIL_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# After bash exits, a backgrounded child may keep the output open: read on only this long.
DRAIN_GRACE = 0.2
STREAM_RATE = 1024 * 1024
"""Bytes per second a streamed command sends once its first max_output bytes are out."""

log = logging.getLogger("crogia.executor")
RequestId = Union[int, str]  # noqa: UP007 - evaluated at runtime, and this file must run on Python 3.9
Message = dict[str, Any]


class RequestError(Exception):
    """A request failed in a way its client should hear about."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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


def _exit_status(returncode: int | None) -> int:
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


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


async def end_group(pgid: int, *, thorough: bool = False, within: float = 5.0) -> bool:
    """SIGKILL a finished command's process group, and its session's strays, until none is left.

    A command's background jobs (or a fork bomb) keep its group when its shell exits; they go
    with it (`spawn` starts what should stay). A group-wide kill reaches every member, even one
    being forked, so the loop only waits for init to reap them. `thorough` (or a group that
    still had members) also looks in /proc for processes of the command's session that left
    its group. False if something survived `within` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
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
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if not alive:
            return True
        if loop.time() > deadline:
            log.warning("processes of command group %d survived SIGKILL", pgid)
            return False
        await asyncio.sleep(0.01)


class OutputCapture:
    """Keeps the first and last halves of `limit` bytes of a stream and counts what falls between."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head_limit = limit - limit // 2
        self.tail_limit = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
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
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return (self.head + self.tail).decode("utf-8", "replace"), False
        return f"{head}\n\n[... {cut} bytes of output truncated ...]\n\n{tail}", True


class LiveStream:
    """A command's output as streamed text: `burst` bytes at once, then `rate` bytes per second.

    Nobody reads gigabytes scrolling by; skipping what is over the budget (and saying how much)
    keeps a command printing without end from costing the server a byte of JSON per byte.
    """

    def __init__(self, send: Callable[[str], Awaitable[None]], burst: int, rate: float) -> None:
        self.send = send
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.burst = max(burst, 1)
        self.rate = rate
        self.tokens = float(self.burst)
        self.refilled = time.monotonic()
        self.skipped = 0

    async def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final)
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < min(len(data), self.burst):
            self.skipped += len(data)
            return
        self.tokens -= len(data)
        await self.flush_skipped()
        if text:
            await self.send(text)

    async def flush_skipped(self) -> None:
        if self.skipped:
            skipped, self.skipped = self.skipped, 0
            await self.send(
                f"\n[... {skipped} bytes of output not streamed (over {self.rate:.0f} bytes/s) ...]\n"
            )


async def _pump(fd: int, on_data: Callable[[bytes], Awaitable[None]]) -> None:
    """Read `fd` until EOF (or EIO: a pty whose last slave closed), feeding `on_data`."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            try:
                data = os.read(fd, CHUNK_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            await on_data(data)
    finally:
        loop.remove_reader(fd)


def _take_terminal() -> None:
    # Runs in the child before exec: own session, and the pty on fd 0 becomes its terminal.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _open_output(tty: bool) -> tuple[int, int]:
    """Return (read end, child end) of a pipe or a pty; the read end is non-blocking."""
    if tty:
        read_fd, child_fd = pty.openpty()
        fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    else:
        read_fd, child_fd = os.pipe()
    os.set_blocking(read_fd, False)
    return read_fd, child_fd


async def run_command(req: Message, send_chunk: Callable[[str], Awaitable[None]]) -> Message:
    """Carry out one `exec` request; cancelling the calling task kills the command's group."""
    cmd: str = _arg(req, "cmd", str)
    timeout = _arg(req, "timeout", (int, float), None)
    max_output: int = _arg(req, "max_output", int, 1024 * 1024)
    tty = bool(req.get("tty", False))
    stream_rate = float(_arg(req, "stream_rate", (int, float), STREAM_RATE))
    cwd = _checked_cwd(req)
    env = _child_env(req.get("env"), tty)
    capture = OutputCapture(max(max_output, 1))
    live = LiveStream(send_chunk, max_output, stream_rate) if req.get("stream") else None

    async def on_data(data: bytes) -> None:
        capture.add(data)
        if live is not None:
            await live.feed(data)

    read_fd, child_fd = _open_output(tty)
    try:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", cmd, stdin=child_fd if tty else asyncio.subprocess.DEVNULL,
            stdout=child_fd, stderr=child_fd, cwd=cwd, env=env,
            start_new_session=not tty, preexec_fn=_take_terminal if tty else None,
        )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(child_fd)
    pump = asyncio.ensure_future(_pump(read_fd, on_data))
    waiter = asyncio.ensure_future(proc.wait())
    timed_out = False
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
        timed_out = not done
        if done:
            await asyncio.wait({pump}, timeout=DRAIN_GRACE)
    finally:
        # Whatever the command left in its group (background jobs, a fork bomb) ends with it.
        await end_group(proc.pid, thorough=not waiter.done())
        await asyncio.wait({waiter}, timeout=2)
        await asyncio.wait({pump}, timeout=DRAIN_GRACE)  # the last words of what was just killed
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        os.close(read_fd)
    if live is not None:
        await live.feed(b"", final=True)
        await live.flush_skipped()
    output, truncated = capture.text()
    code = 124 if timed_out else _exit_status(proc.returncode)
    return {"exit_code": code, "output": output, "timed_out": timed_out, "truncated": truncated}


class Background:
    """The background processes started by `spawn`, kept for the daemon's lifetime."""

    def __init__(self, log_dir: str, notify: Callable[[Message], None]) -> None:
        self.log_dir = log_dir
        self.notify = notify
        self.entries: dict[int, dict[str, Any]] = {}
        self.watchers: dict[int, asyncio.Future[None]] = {}

    async def spawn(self, req: Message) -> Message:
        cmd: str = _arg(req, "cmd", str)
        cwd = _checked_cwd(req)
        env = _child_env(req.get("env"), False)
        # The pid is known only after the fork: log to a temporary name, then rename the open file.
        tmp = os.path.join(self.log_dir, f".spawn-{os.getpid()}-{time.monotonic_ns()}.log")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", cmd, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                cwd=cwd, env=env, start_new_session=True,
            )  # fmt: skip
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
        self.watchers[proc.pid] = asyncio.ensure_future(self._watch(proc, entry))
        return {"pid": proc.pid, "log": path}

    async def _watch(self, proc: asyncio.subprocess.Process, entry: dict[str, Any]) -> None:
        code = _exit_status(await proc.wait())
        entry.update(running=False, exit_code=code, ended=time.time())
        self.notify({"type": "exit", "pid": proc.pid, "exit_code": code})

    def _entry(self, req: Message) -> dict[str, Any]:
        pid: int = _arg(req, "pid", int)
        if pid not in self.entries:
            raise RequestError("not_found", f"no background process with pid {pid}")
        return self.entries[pid]

    async def terminate(self, req: Message) -> Message:
        entry = self._entry(req)
        grace = float(_arg(req, "grace", (int, float), 5.0))
        watcher = self.watchers[entry["pid"]]
        if entry["running"]:
            _killpg(entry["pid"], signal.SIGTERM)
            await asyncio.wait({watcher}, timeout=max(grace, 0.0))
        # Even when the leader obeyed, the rest of its group goes too.
        _killpg(entry["pid"], signal.SIGKILL)
        await asyncio.shield(watcher)
        return {"exit_code": entry["exit_code"]}

    async def tail(self, req: Message) -> Message:
        lines: int = _arg(req, "lines", int, 50)
        pid: int = _arg(req, "pid", int)
        path = os.path.join(self.log_dir, f"{pid}.log")
        loop = asyncio.get_running_loop()
        output = await loop.run_in_executor(None, _tail_file, path, max(0, min(lines, 100_000)))
        # A log from before a restart of this sandbox is still worth reading.
        if output is None and pid not in self.entries:
            raise RequestError("not_found", f"no background process with pid {pid}")
        return {"output": output or ""}

    def listing(self) -> Message:
        return {"processes": [dict(e) for e in self.entries.values()]}

    async def shutdown(self, grace: float) -> None:
        running = [pid for pid, e in self.entries.items() if e["running"]]
        for pid in running:
            _killpg(pid, signal.SIGTERM)
        if running:
            await asyncio.wait([self.watchers[p] for p in running], timeout=grace)
        for pid in running:
            _killpg(pid, signal.SIGKILL)


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
    """One client: reads requests, runs each in its own task, writes replies as they finish."""

    def __init__(self, daemon: Daemon, writer: asyncio.StreamWriter) -> None:
        self.daemon = daemon
        self.writer = writer
        self.lock = asyncio.Lock()
        self.tasks: dict[RequestId, tuple[str, asyncio.Future[None]]] = {}

    async def send(self, msg: Message) -> None:
        data = (json.dumps(msg, ensure_ascii=False) + "\n").encode()
        with contextlib.suppress(ConnectionError, RuntimeError):
            async with self.lock:  # one drain at a time (Python 3.9 asserts otherwise)
                self.writer.write(data)
                await self.writer.drain()

    def push(self, msg: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write((json.dumps(msg) + "\n").encode())

    async def serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                await self.receive(line)
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over READ_LIMIT
            log.warning("connection dropped: %s", exc)
        finally:
            for op, task in list(self.tasks.values()):
                if op == "exec":
                    task.cancel()
            self.writer.close()

    async def receive(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            await self.send(_error(None, "bad_request", "request is not valid JSON"))
            return
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(req, dict) or isinstance(rid, bool) or not isinstance(rid, (int, str)):
            await self.send(_error(None, "bad_request", "request must be an object with an int or str id"))
        elif rid in self.tasks:
            await self.send(_error(rid, "bad_request", f"request id {rid!r} is already in flight"))
        elif req.get("op") == "cancel":
            await self.send(self.cancel(rid, req.get("target")))
        else:
            op = str(req.get("op"))
            self.tasks[rid] = (op, asyncio.ensure_future(self.answer(rid, op, req)))

    def cancel(self, rid: RequestId, target: Any) -> Message:
        entry = self.tasks.get(target) if isinstance(target, (int, str)) else None
        if entry is not None:
            entry[1].cancel()
        return {"type": "result", "id": rid, "ok": True, "cancelled": entry is not None}

    async def answer(self, rid: RequestId, op: str, req: Message) -> None:
        try:
            result = await self.daemon.handle(op, req, lambda text: self.chunk(rid, text))
            reply = {"type": "result", "id": rid, "ok": True, **result}
        except asyncio.CancelledError:
            reply = _error(rid, "cancelled", "request was cancelled")
        except RequestError as exc:
            reply = _error(rid, exc.code, str(exc))
        except OSError as exc:
            reply = _error(rid, "bad_request", f"{op} failed: {exc.strerror or exc}")
        except Exception as exc:
            log.exception("request %r (%s) failed", rid, op)
            reply = _error(rid, "internal", f"{op} failed: {exc!r}")
        try:
            await self.send(reply)
        finally:
            self.tasks.pop(rid, None)

    async def chunk(self, rid: RequestId, text: str) -> None:
        await self.send({"type": "chunk", "id": rid, "data": text})


def _error(rid: Any, code: str, message: str) -> Message:
    return {"type": "result", "id": rid, "ok": False, "code": code, "error": message}


class Daemon:
    """Shared state of the executor: the background processes and the connected clients."""

    def __init__(self, log_dir: str) -> None:
        self.connections: set[Connection] = set()
        self.background = Background(log_dir, self.broadcast)

    def broadcast(self, msg: Message) -> None:
        for conn in list(self.connections):
            conn.push(msg)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, writer)
        self.connections.add(conn)
        try:
            await conn.serve(reader)
        finally:
            self.connections.discard(conn)

    async def handle(self, op: str, req: Message, send_chunk: Callable[[str], Awaitable[None]]) -> Message:
        if op == "ping":
            return {"version": PROTOCOL_VERSION, "pid": os.getpid()}
        if op == "exec":
            return await run_command(req, send_chunk)
        if op == "spawn":
            return await self.background.spawn(req)
        if op == "terminate":
            return await self.background.terminate(req)
        if op == "tail":
            return await self.background.tail(req)
        if op == "list":
            return self.background.listing()
        raise RequestError("bad_request", f"unknown op {op!r}")


def _watch_children_without_threads() -> None:
    """Before Python 3.12 asyncio waits for each child in a thread of its own: a fork bomb that
    reaches the pids limit before that thread starts leaves its command's end unnoticed. A pidfd
    watcher (Linux 5.3+) needs no thread; 3.12 and later use one by default."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)


async def serve(socket_path: str, log_dir: str) -> None:
    """Listen on `socket_path` until SIGTERM or SIGINT, then stop background processes."""
    os.makedirs(log_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # left over from a previous run of this sandbox
    _watch_children_without_threads()
    daemon = Daemon(log_dir)
    server = await asyncio.start_unix_server(daemon.accept, path=socket_path, limit=READ_LIMIT)
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("executor listening on %s (pid %d)", socket_path, os.getpid())
    await stop.wait()
    server.close()
    await daemon.background.shutdown(grace=2.0)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Crogia in-sandbox executor daemon")
    parser.add_argument("--socket", default="/run/crogia/executor.sock")
    parser.add_argument("--log-dir", default=None, help="default: logs/ beside the socket")
    args = parser.parse_args(argv)
    log_dir = args.log_dir or os.path.join(os.path.dirname(os.path.abspath(args.socket)), "logs")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.socket, log_dir))


if __name__ == "__main__":
    main()
