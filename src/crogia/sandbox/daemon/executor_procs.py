"""The executor's children: starting, reaping and killing them, and background processes (`spawn`).

Part of the executor daemon (`executor.py` says how it fits). Children start through posix_spawn
(no copy of the daemon) in a session of their own, and are waited for through pidfds.
"""

from __future__ import annotations

import os
import time

from executor_core import LOOP, RequestError, arg, cancelled_error, log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from executor_core import Message, Steps
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

TAIL_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def child_env(extra: Any, tty: bool) -> dict[str, str]:
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


def checked_cwd(req: Message) -> str:
    cwd: str = arg(req, "cwd", str, "/workspace")
    if not os.path.isdir(cwd):
        raise RequestError("bad_request", f"working directory {cwd} does not exist")
    return cwd


def kill(pid: int, sig: int, group: bool = True) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


ENVIRON_READ = 65536
"""Bytes of each environment a scan reads: the marker sits near the start of any usual one."""
MARKS: dict[int, bytes] = {}
"""Command pid -> the `CROGIA_RUN=<n>` entry its environment (and its descendants') carries."""


def processes(session: int = 0, mark: bytes = b"", living: bool = False) -> list[int]:
    """Pids of this sandbox (its pid namespace) that belong to a command, from /proc.

    A process belongs if its process group or session is `session`, or if its environment
    carries the entry `mark` (the command's `CROGIA_RUN=<n>`: how its processes that left the
    session with setsid are found). `living` leaves out zombies (dead, waiting for a parent).
    """
    found, me, needle = [], str(os.getpid()), b"\0" + mark + b"\0"
    for name in os.listdir("/proc") if session or mark else ():
        if not name.isdigit() or name == me:  # this daemon's own environment is unreadable
            continue
        if session or living:
            fields = _stat(name)
            if fields is None or (living and fields[0] == b"Z"):
                continue
            if session and session in (int(fields[2]), int(fields[3])):
                found.append(int(name))
                continue
        if mark and needle in _environ(name):
            found.append(int(name))
    return found


def _stat(name: str) -> list[bytes] | None:
    """The fields of /proc/<name>/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        with open(f"/proc/{name}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields if len(fields) > 3 else None


def _environ(name: str) -> bytes:
    """The start of /proc/<name>/environ, with a NUL before it (every entry then sits between NULs)."""
    try:
        fd = os.open(f"/proc/{name}/environ", os.O_RDONLY)
    except OSError:
        return b""
    try:
        return b"\0" + os.read(fd, ENVIRON_READ)
    except OSError:
        return b""
    finally:
        os.close(fd)


def end_group(pgid: int, thorough: bool = False, within: float = 5.0) -> Steps:
    """SIGKILL a finished command's process group, and its session's strays, until none is left.

    A command's background jobs (or a fork bomb) keep its group when its shell exits; they go
    with it (`spawn` starts what should stay). A group-wide kill reaches every member, even one
    being forked, so the loop only waits for init to reap them. `thorough` (or a group that
    still had members) also looks in /proc for processes of the command's session that left
    its group. False if something survived `within` seconds.
    """
    deadline, mark = time.monotonic() + within, MARKS.pop(pgid, b"")
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
            thorough = alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        # The session's strays (thorough), and those that escaped it with setsid (by the mark).
        for pid in processes(pgid if thorough else 0, mark):
            alive = True
            kill(pid, signal.SIGKILL, group=False)
        if not alive:
            return True
        if time.monotonic() > deadline:
            log(f"WARNING processes of command group {pgid} survived SIGKILL")
            return False
        yield None, 0.01


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
    mark = f"CROGIA_RUN={time.monotonic_ns()}"
    env = {"CROGIA_RUN": "", **env}  # first: where a scan of the environment starts
    env["CROGIA_RUN"] = mark[11:]  # ours, whatever the request's env said
    # posix_spawn (vfork-like: no copy of this process) takes no cwd: lend it ours for the call.
    os.chdir(cwd)
    try:
        pid = os.posix_spawn(bash, ["bash", "-c", cmd], env, file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))  # fmt: skip
    finally:
        os.chdir("/")
    MARKS[pid] = mark.encode()
    return Child(pid)


class ProcessLog:
    """A background process's output, read from its pipe into a log that never passes `limit` bytes.

    The log lives on the sandbox's state tmpfs: past half the limit it becomes `<pid>.log.1`
    (replacing the one before) and a new `<pid>.log` begins, so the newest output is kept and a
    chatty process cannot fill the tmpfs. A full tmpfs drops output rather than block the command.
    """

    def __init__(self, read_fd: int, path: str, limit: int) -> None:
        self.read_fd, self.path, self.half = read_fd, path, max(limit // 2, 4096)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.size = 0
        os.set_blocking(read_fd, False)
        LOOP.watch(read_fd, self.on_data)

    def on_data(self, _events: int = 0) -> bool:
        """Move one read's worth into the log; False once nothing more is there for now."""
        if self.read_fd < 0:
            return False
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        if self.size + len(data) > self.half:
            self.rotate()
        try:
            self.size += os.write(self.fd, data)
        except OSError:  # ENOSPC: the state tmpfs is full; the command goes on
            self.size += 0
        return True

    def drain(self) -> None:
        """What is already in the pipe (bounded: a child left behind may write without end)."""
        for _ in range(64):
            if not self.on_data():
                return

    def rotate(self) -> None:
        try:
            os.replace(self.path, self.path + ".1")
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log(f"WARNING cannot rotate {self.path}: {exc}")
            return
        os.close(self.fd)
        self.fd, self.size = fd, 0

    def close(self) -> None:
        if self.read_fd >= 0:
            LOOP.unwatch(self.read_fd)
            os.close(self.read_fd)
            os.close(self.fd)
            self.read_fd = -1


class Background:
    """The background processes started by `spawn`, kept for the daemon's lifetime."""

    def __init__(self, log_dir: str, log_max: int, notify: Callable[[Message], None]) -> None:
        self.log_dir, self.log_max, self.notify = log_dir, log_max, notify
        self.entries: dict[int, dict[str, Any]] = {}

    def spawn(self, req: Message) -> Message:
        cmd: str = arg(req, "cmd", str)
        cwd, env = checked_cwd(req), child_env(req.get("env"), False)
        read_fd, child_fd = os.pipe()
        try:
            proc = start_child(cmd, cwd, env, child_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(child_fd)
        path = os.path.join(self.log_dir, f"{proc.pid}.log")
        for stale in (path, path + ".1"):  # a log of an earlier daemon's process with this pid
            if os.path.exists(stale):
                os.unlink(stale)
        output = ProcessLog(read_fd, path, self.log_max)
        entry = {"pid": proc.pid, "cmd": cmd, "log": path, "running": True, "exit_code": None,
                 "started": time.time(), "ended": None}  # fmt: skip
        self.entries[proc.pid] = entry

        def ended(code: int) -> None:
            output.drain()  # so a tail right after the exit notice sees the last lines
            entry.update(running=False, exit_code=code, ended=time.time())
            self.notify({"type": "exit", "pid": proc.pid, "exit_code": code})

        proc.on_exit = ended
        return {"pid": proc.pid, "log": path}

    def listing(self) -> list[Message]:
        """Every process, its command cut short: `list` answers must stay small."""
        return [{**entry, "cmd": entry["cmd"][:200]} for entry in self.entries.values()]

    def terminate(self, req: Message) -> Steps:
        pid: int = arg(req, "pid", int)
        grace = float(arg(req, "grace", (int, float), 5.0))
        entry = self.entries.get(pid)
        if entry is None:
            raise RequestError("not_found", f"no background process with pid {pid}")
        if entry["running"]:
            kill(pid, signal.SIGTERM)
            if (yield lambda: not entry["running"], max(grace, 0.0)):
                raise cancelled_error()
        kill(pid, signal.SIGKILL)  # even when the leader obeyed, the rest of its group goes too
        strays = processes(mark=MARKS.pop(pid, b""))
        for stray in strays:
            kill(stray, signal.SIGKILL, group=False)
        # Gone when the reply goes, not only killed: init reaps them a moment later (until then a
        # zombie, which `ps` still lists), up to 5 s.
        deadline = time.monotonic() + 5.0
        while any(os.path.exists(f"/proc/{stray}") for stray in strays) and time.monotonic() < deadline:
            if (yield None, 0.01):
                raise cancelled_error()
        while entry["running"]:
            if (yield lambda: not entry["running"], None):
                raise cancelled_error()
        return {"exit_code": entry["exit_code"]}

    def tail(self, req: Message) -> Message:
        lines: int = arg(req, "lines", int, 50)
        pid: int = arg(req, "pid", int)
        path = os.path.join(self.log_dir, f"{pid}.log")
        lines = max(0, min(lines, 100_000))
        output = _tail_file(path, lines)
        if output is not None and output.count("\n") < lines:
            older = _tail_file(path + ".1", lines)
            output = (older or "") + output
            output = "".join(output.splitlines(keepends=True)[-lines:]) if lines else ""
        if output is None:
            raise RequestError(
                "not_found",
                f"no log of process {pid} in this sandbox (logs live in the sandbox and end when it stops)",
            )
        return {"output": output}

    def shutdown(self, grace: float) -> Steps:
        running = [pid for pid, e in self.entries.items() if e["running"]]
        for pid in running:
            kill(pid, signal.SIGTERM)
        yield lambda: not any(self.entries[p]["running"] for p in running), grace
        for pid in running:
            kill(pid, signal.SIGKILL)
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
