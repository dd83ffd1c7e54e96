#!/usr/bin/env python3
"""Crogia's executor daemon: runs inside every sandbox and executes commands for the server.

Standard library only; runs on Python 3.9+ as `python3 /opt/crogia/executor.py --socket PATH`
(the server imports it instead, see `daemon_command()`: ~2 MB less memory, and its bytecode).
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
asyncio, nor json's regexes or socket's and signal's enums) and stays small (compiling it is most
of its start). One thread runs an epoll loop; a request is a generator yielding
`(condition, seconds)`, resumed when the condition holds or the time is up; the yield evaluates to
True when the request was cancelled. Children start through posix_spawn (no copy of this process)
and are waited for through pidfds: no thread to start, so a fork bomb cannot hide a command's end.

Modules (one folder, mounted read-only at /opt/crogia; they import each other by name):
  executor.py        this entry point: connections, the ops table, start and stop
  executor_core.py   wire format (JSON lines), the epoll loop, requests as tasks
  executor_procs.py  children (spawn, reap, kill a group) and background processes
  executor_exec.py   the `exec` op: run, capture head and tail, stream at a rate
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from executor_core import IN, LOOP, OUT, RequestError, Task, dumps, error_reply, loads, log
from executor_exec import run_command
from executor_procs import Background, Child

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal

    from executor_core import Message, RequestId, Steps
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

PROTOCOL_VERSION = 1
READ_LIMIT = 64 * 1024 * 1024


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
            return self.send(error_reply(None, "bad_request", "request is not valid JSON"))
        rid = req.get("id") if isinstance(req, dict) else None
        if not isinstance(req, dict) or isinstance(rid, bool) or not isinstance(rid, (int, str)):
            self.send(error_reply(None, "bad_request", "request must be an object with an int or str id"))
        elif rid in self.tasks:
            self.send(error_reply(rid, "bad_request", f"request id {rid!r} is already in flight"))
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
    """Give back what start-up (compiling, importing) left in the C heap (glibc only), once idle."""
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
    __import__("executor_harden").make_undumpable()
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
