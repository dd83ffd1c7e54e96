"""The `pty_*` ops: interactive terminals, a login `bash` on a pseudo-terminal, for the server.

Part of the executor daemon (`executor.py` says how it fits). The message shapes live here, in
`handle` (requests) and `Terminal` (its stream and its exit push), and nowhere else on this side:

  pty_open {cols, rows}            -> {tid}        tid: the shell's pid; the request's id is the
                                                   terminal's byte stream (it outlives the reply)
  pty_resize {tid, cols, rows}     -> {}           TIOCSWINSZ: the foreground job gets SIGWINCH
  pty_close {tid, grace?}          -> {exit_code}  SIGHUP to all its processes, SIGKILL after grace
  frames on the stream, both ways  raw bytes: the server's are typed into the terminal, ours are
                                   its output (at most READ_MAX a frame); then our end of it
  push {"type": "pty_exit", "tid", "exit_code"}    after the stream's end (null: not known)

A terminal belongs to the connection that opened it and ends with it. Its processes are the
shell's session plus whatever carries its `CROGIA_RUN` mark (a `setsid` job leaves the session,
not its environment); on close, or when the shell exits, all of them get SIGHUP, then SIGKILL.
Output is read as it comes (one read for a keystroke's echo, up to READ_MAX a wake-up in a
flood) and only within the stream's credit: once the server has a window's worth it has not
consumed, the pty is not read, its buffer fills and the program blocks in its write. Input is
written as the pty takes it; what it has not taken stays in the stream (the server's window
bounds it) and is credited once written. A reset of the stream by the server closes the
terminal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
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

READ_MAX = 256 * 1024
"""Most output sent in one frame (within the protocol's FRAME_MAX: a terminal's wake-up need not be more)."""
HUP = select.EPOLLHUP | select.EPOLLERR
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
    """One shell on one pty, its bytes on stream `sid` of its connection."""

    def __init__(self, conn: Connection, sid: int, cols: int, rows: int, owner: Terminals) -> None:
        self.conn, self.owner, self.sid = conn, owner, sid
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
        self.inbound = conn.accept_stream(sid)
        self.eof = self.done = False
        self.paused = False
        """Out of credit: not read until the server consumes some."""
        self.blocked = False
        """The pty took no more input: written again once it says it can take some."""
        self.watch()
        Task(None, None, "pty-life", self.life())
        Task(None, None, "pty-input", self.pump_input())

    @property
    def discarding(self) -> bool:
        """The stream is gone (reset, or the connection lost): output is read and dropped."""
        return self.inbound.reset

    def watch(self) -> None:
        if self.done:
            return
        mask = (0 if self.eof or self.paused else IN) | (OUT if self.blocked else 0)
        if mask:
            LOOP.watch(self.master, self.on_event, mask)
        else:
            LOOP.unwatch(self.master)

    def on_event(self, events: int) -> None:
        if events & (OUT | HUP) and self.blocked:
            self.blocked = False  # the input task writes again (and finds out if the pty is gone)
            self.watch()
        if events & ~OUT and not (self.eof or self.paused):
            self.read()

    def read(self) -> None:
        limit = READ_MAX if self.discarding else min(READ_MAX, self.conn.credit_left(self.sid))
        if limit <= 0:
            return self.pause()
        data, ended = bytearray(), False
        while len(data) < limit:  # a pty hands out ~4 KiB a read: in a flood, one frame carries several
            try:
                chunk = os.read(self.master, limit - len(data))
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
        if data and not self.discarding:
            self.conn.send_frame(self.sid, bytes(data))
        if ended:
            self.eof = True
            self.watch()
        elif not self.discarding and self.conn.credit_left(self.sid) <= 0:
            self.pause()

    def pause(self) -> None:
        self.paused = True
        self.watch()
        Task(None, None, "pty-credit", self.resume())

    def resume(self) -> Steps:
        yield lambda: self.conn.credit_left(self.sid) > 0 or self.discarding or self.done, None
        self.paused = False
        self.watch()
        return {}

    def pump_input(self) -> Steps:
        """Write what the server typed as the pty takes it; crediting what was written."""
        inbound = self.inbound
        while not (self.done or inbound.reset):
            yield lambda: (inbound.buf and not self.blocked) or inbound.reset or self.done, None
            if self.done or inbound.reset:
                break
            try:
                written = os.write(self.master, inbound.buf)
            except BlockingIOError:
                written, self.blocked = 0, True
                self.watch()
            except OSError:  # the terminal is closing: what it was typed no longer matters
                written = len(inbound.buf)
            del inbound.buf[:written]
            self.conn.consumed(self.sid, written)
        if inbound.reset and not self.done:  # the server gave the terminal up
            yield from self.end_all(0.2)
        return {}

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
        if not self.discarding:
            self.conn.end_stream(self.sid)
        self.conn.drop_stream(self.sid)
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

    def handle(self, op: str, req: Message, conn: Connection, rid: object = None) -> Steps:
        if op == "pty_open":
            if len(self.by_tid) >= MAX_TERMINALS:
                raise RequestError("bad_request", f"at most {MAX_TERMINALS} terminals per sandbox")
            if not isinstance(rid, int) or isinstance(rid, bool) or not 1 <= rid < 1 << 32:
                raise RequestError("bad_request", "pty_open needs an int request id: its stream's")
            term = Terminal(conn, rid, *_size(req), self)
            self.by_tid[term.tid] = term
            return {"tid": term.tid}
        term = self._get(req, conn)
        if op == "pty_resize":
            set_size(term.master, *_size(req))
            return {}
        if op == "pty_close":
            grace = float(arg(req, "grace", (int, float), 1.0))
            return (yield from term.close(min(max(grace, 0.0), 10.0)))
        raise RequestError("bad_request", f"unknown op {op!r}")
