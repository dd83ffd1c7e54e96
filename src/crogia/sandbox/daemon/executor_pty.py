"""The `pty_*` ops: interactive terminals, a login `bash` on a pseudo-terminal, for the server.

Part of the executor daemon (`executor.py` says how it fits). The message shapes live here, in
`handle` (requests) and `Terminal.push_*` (pushes), and nowhere else on this side:

  pty_open {cols, rows}            -> {tid}        tid: the shell's pid
  pty_input {tid, data_b64}        -> {}           bytes written to the terminal as typed
  pty_resize {tid, cols, rows}     -> {}           TIOCSWINSZ: the foreground job gets SIGWINCH
  pty_close {tid, grace?}          -> {exit_code}  SIGHUP to all its processes, SIGKILL after grace
  push {"type": "pty_output", "tid", "data_b64"}   at most READ_MAX bytes once decoded
  push {"type": "pty_exit", "tid", "exit_code"}    after its last output (null: not known)

A terminal belongs to the connection that opened it and ends with it. Its processes are the
shell's session plus whatever carries its `CROGIA_RUN` mark (a `setsid` job leaves the session,
not its environment); on close, or when the shell exits, all of them get SIGHUP, then SIGKILL.
Output is read at most READ_MAX bytes per wake-up, and not at all while the server has more
than PAUSE_AT bytes unread: the pty's own buffer then holds the program back.
"""

from __future__ import annotations

import binascii
import errno
import fcntl
import os
import struct
import termios
import time

from executor_core import IN, LOOP, OUT, RequestError, Task, arg, log
from executor_procs import MARKS, child_env, kill, processes, start_child

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal

    from executor import Connection
    from executor_core import Message, Steps
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

READ_MAX = 64 * 1024
INPUT_MAX = 64 * 1024
"""Bytes one pty_input may carry (decoded)."""
INPUT_BACKLOG = 1024 * 1024
"""Unwritten input a terminal holds before pty_input is refused (a shell that stopped reading)."""
PAUSE_AT, RESUME_AT = 1024 * 1024, 256 * 1024
MAX_TERMINALS = 64
SHELL = "exec bash --login -i"
KILL_WITHIN = 5.0


def set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _size(req: Message) -> tuple[int, int]:
    cols, rows = arg(req, "cols", int, 80), arg(req, "rows", int, 24)
    if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
        raise RequestError("bad_request", "cols and rows must be within 1..1000")
    return cols, rows


class Terminal:
    """One shell on one pty, its output pushed to its connection."""

    def __init__(self, conn: Connection, cols: int, rows: int, owner: Terminals) -> None:
        self.conn, self.owner = conn, owner
        master, slave = os.openpty()
        try:
            set_size(slave, cols, rows)
            env = child_env({}, True)
            cwd = "/workspace" if os.path.isdir("/workspace") else "/"
            self.proc = start_child(SHELL, cwd, env, slave, tty=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master, self.tid = master, self.proc.pid
        self.mark = MARKS.pop(self.tid)  # the shell's `CROGIA_RUN=<n>`, which setsid jobs keep
        os.set_blocking(master, False)
        self.pending = bytearray()
        self.eof = self.paused = self.done = False
        self.watch()
        Task(None, None, "pty-life", self.life())

    def watch(self) -> None:
        if not (self.eof or self.paused):
            LOOP.watch(self.master, self.on_event, IN | OUT if self.pending else IN)

    def on_event(self, events: int) -> None:
        if events & OUT and self.pending:
            self.write(b"")
        if events & ~OUT:
            self.read()

    def read(self) -> None:
        data, ended = bytearray(), False
        while len(data) < READ_MAX:  # a pty hands out ~4 KiB a read: one push carries several
            try:
                chunk = os.read(self.master, READ_MAX - len(data))
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: the last holder of the pty's other end closed it
                if exc.errno != errno.EIO:
                    log(f"WARNING reading terminal {self.tid} failed: {exc}")
                chunk = b""
            if not chunk:
                ended = True
                break
            data += chunk
        if data:
            self.push(bytes(data))
        if ended:
            self.eof = True
            LOOP.unwatch(self.master)

    def push(self, data: bytes) -> None:
        self.conn.send({"type": "pty_output", "tid": self.tid,
                        "data_b64": binascii.b2a_base64(data, newline=False).decode()})  # fmt: skip
        if len(self.conn.outbuf) > PAUSE_AT and self.conn.open:
            self.paused = True
            LOOP.unwatch(self.master)
            Task(None, None, "pty-resume", self.resume())

    def resume(self) -> Steps:
        yield lambda: len(self.conn.outbuf) < RESUME_AT or not self.conn.open or self.done, None
        self.paused = False
        if not self.done:
            self.watch()
        return {}

    def write(self, data: bytes) -> None:
        if len(self.pending) + len(data) > INPUT_BACKLOG:
            raise RequestError("bad_request", "the terminal is not reading its input")
        self.pending += data
        try:
            del self.pending[: os.write(self.master, self.pending)]
        except BlockingIOError:
            pass
        except OSError:  # the terminal is closing: what it was typed no longer matters
            self.pending.clear()
        self.watch()

    def members(self) -> list[int]:
        """Living processes of this terminal: its shell's session, or its mark in their environment."""
        return processes(self.tid, self.mark, living=True)

    def end_all(self, grace: float) -> Steps:
        """SIGHUP every process of the terminal (SIGCONT wakes stopped jobs to hear it), then SIGKILL."""
        members = self.members()
        for sig in (signal.SIGHUP, signal.SIGCONT):
            for pid in members:
                kill(pid, sig, group=False)
        started = time.monotonic()
        while members and time.monotonic() - started < grace:
            yield None, 0.02
            members = self.members()
        while members:
            for pid in members:
                kill(pid, signal.SIGKILL, group=False)
            if time.monotonic() - started > KILL_WITHIN:
                log(f"WARNING processes of terminal {self.tid} survived SIGKILL: {members}")
                return
            yield None, 0.01
            members = self.members()

    def life(self) -> Steps:
        """Wait for the shell to end (or the connection to go), clean up, then push the exit."""
        yield lambda: self.proc.code is not None or not self.conn.open, None
        yield from self.end_all(0.2 if self.conn.open else 0.5)
        since = time.monotonic()
        while not self.eof and (self.paused or time.monotonic() - since < 2.0):
            yield lambda: self.eof, 0.1  # the last output; a process we could not see may hold the pty
        yield lambda: self.proc.code is not None, 2.0
        self.done = True
        LOOP.unwatch(self.master)
        os.close(self.master)
        self.owner.by_tid.pop(self.tid, None)
        self.conn.send({"type": "pty_exit", "tid": self.tid, "exit_code": self.proc.code})
        return {}

    def close(self, grace: float) -> Steps:
        yield from self.end_all(grace)
        yield lambda: self.done, KILL_WITHIN
        return {"exit_code": self.proc.code}


class Terminals:
    """The daemon's open terminals, by tid; `handle` carries out the pty_* requests."""

    def __init__(self) -> None:
        self.by_tid: dict[int, Terminal] = {}

    def _get(self, req: Message, conn: Connection) -> Terminal:
        term = self.by_tid.get(arg(req, "tid", int))
        if term is None or term.conn is not conn or term.done:
            raise RequestError("not_found", "no such terminal")
        return term

    def handle(self, op: str, req: Message, conn: Connection) -> Steps:
        if op == "pty_open":
            if len(self.by_tid) >= MAX_TERMINALS:
                raise RequestError("bad_request", f"at most {MAX_TERMINALS} terminals per sandbox")
            term = Terminal(conn, *_size(req), self)
            self.by_tid[term.tid] = term
            return {"tid": term.tid}
        term = self._get(req, conn)
        if op == "pty_input":
            data: str = arg(req, "data_b64", str)
            if len(data) > (INPUT_MAX + 2) // 3 * 4:
                raise RequestError("bad_request", f"pty_input carries at most {INPUT_MAX} bytes")
            try:
                term.write(binascii.a2b_base64(data))
            except binascii.Error:
                raise RequestError("bad_request", "data_b64 is not base64") from None
            return {}
        if op == "pty_resize":
            set_size(term.master, *_size(req))
            return {}
        if op == "pty_close":
            grace = float(arg(req, "grace", (int, float), 1.0))
            return (yield from term.close(min(max(grace, 0.0), 10.0)))
        raise RequestError("bad_request", f"unknown op {op!r}")
