"""The `exec` op: one command run to its end, its output captured (and maybe streamed).

Part of the executor daemon (`executor.py` says how it fits).
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import os
import struct
import termios
import time

from executor_core import LOOP, arg, cancelled_error, log
from executor_procs import checked_cwd, child_env, end_group, start_child

TYPE_CHECKING = False
if TYPE_CHECKING:
    from executor import Connection
    from executor_core import Message, RequestId, Steps

CHUNK_SIZE = 65536
# After bash exits, a backgrounded child may keep the output open: read on only this long.
DRAIN_GRACE = 0.2
STREAM_RATE = 1024 * 1024
"""Bytes per second a streamed command sends once its first max_output bytes are out."""
BACKLOG_MAX = 8 * 1024 * 1024
"""Streamed chunks are skipped (and counted) while their client has this much unread."""
TAIL_CHARS = 4096
"""The end of skipped streamed output that is still sent when the command ends (its last lines)."""


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
        self.tail = ""

    def feed(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < min(len(data), self.burst) or len(self.conn.outbuf) > BACKLOG_MAX:
            self.skipped += len(data)
            # The last words of a command matter most: the tail of what is skipped is kept for `finish`.
            self.tail = (self.tail + text)[-TAIL_CHARS:]
            return
        self.tokens -= len(data)
        self.tail = ""  # counted in `skipped`, told before this chunk
        self.flush_skipped()
        if text:
            self.conn.send({"type": "chunk", "id": self.rid, "data": text})

    def finish(self) -> None:
        """The command ended: whatever the budget, its last skipped output is streamed after the count."""
        tail = self.tail + self.decoder.decode(b"", True)
        self.skipped = max(0, self.skipped - len(self.tail.encode()))
        self.tail = ""
        self.flush_skipped()
        if tail:
            self.conn.send({"type": "chunk", "id": self.rid, "data": tail})

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
    cmd: str = arg(req, "cmd", str)
    timeout = arg(req, "timeout", (int, float), None)
    max_output: int = arg(req, "max_output", int, 1024 * 1024)
    tty = bool(req.get("tty", False))
    stream_rate = float(arg(req, "stream_rate", (int, float), STREAM_RATE))
    cwd, env = checked_cwd(req), child_env(req.get("env"), tty)
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
        raise cancelled_error()
    if live is not None:
        live.finish()
    output, truncated = capture.text()
    code = 124 if timed_out else proc.code
    return {"exit_code": code, "output": output, "timed_out": timed_out, "truncated": truncated}
