#!/usr/bin/env python3
"""Crogia's executor daemon: runs inside every sandbox and executes commands for the server.

Standard library only; runs on Python 3.9+ as `python3 /opt/crogia/executor.py --fd N` or
`... --dial PATH --secret-file PATH` (the server imports it instead, see `daemon_command()`: ~2 MB
less memory, and its bytecode). It needs an init process above it to reap orphans (tini in Docker,
bwrap's pid 1 under bubblewrap).

Locally the daemon never listens: the channel is the server's. With `--fd` it speaks on a socket it
inherited (one end of a socketpair the server made; the daemon stops when it closes). With
`--dial` it connects to the server's socket (in a folder the sandbox sees read-only), and dials
again, with backoff, whenever the connection drops (the server restarted). Either way it speaks
first: a hello with the protocol version and the secret read from `--secret-file` (at each dial,
so a restarted server can change it); `executor_proto.py` holds the version and every message's
shape, shared with the server. With `--listen PORT` (the TCP transport, for a sandbox the server
reaches over a network) it listens on that port of the sandbox's own addresses and the server
dials in, as often as it needs; each side proves it knows the secret before the hello
(`executor_auth.py`), and a connection that does not is closed. The newest proven connection
replaces any older one. With `--tls-cert PATH --tls-key PATH` as well, the listener speaks TLS
(1.3; `ssl` is imported only then) with that certificate, which the server pins, and the proofs
are bound to it; handshake, reads and writes stay non-blocking in the epoll loop.

Protocol: newline-delimited JSON objects (UTF-8) over a unix stream socket, and binary frames
for bytes with per-stream credit (`executor_proto.py` describes them; `Connection` has the stream
methods a request's steps use: `accept_stream`, `credit_left`, `send_frame`, `end_stream`,
`consumed`, `reset_stream`, `drop_stream`). Every request
carries an `id` (int or str) chosen by the server and unique among its in-flight requests.
Replies may come in any order.

Request:   {"id": 7, "op": "<op>", ...arguments}
Reply:     {"type": "result", "id": 7, "ok": true, ...values}
           {"type": "result", "id": 7, "ok": false, "code": "bad_request|not_found|cancelled|internal",
            "error": "human message"}
Chunk:     {"type": "chunk", "id": 7, "data": "text"}      (exec with stream=true, before its result)
Exit:      {"type": "exit", "pid": 12, "exit_code": 0}     (pushed, no id)

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
      stdout+stderr through a pipe into <log-dir>/<pid>.log (on the sandbox's size-limited state
      tmpfs); past half of --log-max bytes it moves to <pid>.log.1 and starts afresh, so a log
      holds at most --log-max bytes, the newest; an `exit` notice follows when it ends.
  terminate {pid, grace?}                       -> {exit_code}  SIGTERM the group, SIGKILL after grace
  tail {pid, lines?}                            -> {output}     last lines of a process's log
      (also of a process from before a daemon restart, while its log file is there)
  list                                          -> {processes: [{pid, cmd, log, running, exit_code,
                                                    started, ended}]}  (times are epoch seconds)
  pty_open, pty_resize, pty_close    interactive terminals (bytes on pty_open's stream): executor_pty.py
  ports, tunnel_open, tunnel_handoff listening ports, and TCP streams on binary streams: executor_net.py
  fs_list, fs_stat, fs_mkdir, fs_remove, fs_rename, fs_rg    the workspace's files (confined beneath
      /workspace, or --workspace): see executor_files.py (imported on the first file op)

Children get the daemon's own environment plus LANG=C.UTF-8, a default PATH and HOME (and TERM
under a tty), overridden by the request's `env`. A bad request never stops the daemon.

Design: every sandbox pays for this process while it idles, so it imports almost nothing (no
asyncio, nor json's regexes or socket's and signal's enums) and stays small (compiling it is most
of its start). One thread runs an epoll loop; a request is a generator yielding
`(condition, seconds)`, resumed when the condition holds or the time is up; the yield evaluates to
True when the request was cancelled. Children start through posix_spawn (no copy of this process)
and are waited for through pidfds: no thread to start, so a fork bomb cannot hide a command's end.

Modules (one folder, mounted read-only at /opt/crogia; they import each other by name):
  executor.py        this entry point: the connection, the ops table, start and stop
  executor_proto.py  the protocol's version, hello and message shapes (shared with the server)
  executor_auth.py   the TCP channel's mutual proof (shared with the server)
  executor_core.py   wire format (JSON lines), the epoll loop, requests as tasks
  executor_procs.py  children (spawn, reap, kill a group) and background processes
  executor_exec.py   the `exec` op: run, capture head and tail, stream at a rate
  executor_pty.py    the `pty_*` ops: interactive terminals
  executor_net.py    the `ports` and `tunnel_open` ops: listening ports, streams for previews
  executor_files.py  the `fs_*` ops: files and search, served inside the sandbox
"""

from __future__ import annotations

import _socket
import os
import sys
import time

import executor_auth as auth
import executor_proto as proto
from executor_core import IN, LOOP, OUT, RequestError, Task, dumps, error_reply, loads, log
from executor_exec import run_command
from executor_net import Tunnels, listening
from executor_procs import Background, Child
from executor_pty import Terminals

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from executor_core import Message, RequestId, Steps
else:
    import _signal as signal  # `signal` itself imports enum (and enum half the stdlib)

READ_LIMIT = 64 * 1024 * 1024
DIAL_FIRST, DIAL_MAX = 0.005, 0.5
"""Seconds between dials to a server that does not answer: doubling from the first to the most."""
LOG_MAX = 8 * 1024 * 1024
MAX_PENDING = 4
"""TCP connections proving themselves at once; more are closed at once."""
SOCKET_BUFFER = proto.WINDOW
"""Send buffer of a dialled connection (as the server's end has): a stream's whole window fits, so
a splice or write seldom meets a full socket and reads the rest back into `outbuf` (daemon CPU
per 100 MB through a tunnel: ~58 ms with 1 MiB, ~36 ms with 4 MiB; the kernel caps it at
net.core.wmem_max)."""
TLS_WRITE = 1 << 18
"""The most bytes handed to one TLS write."""


def _is_unix(fd: int) -> bool:
    """Whether `fd` is a unix socket (getsockopt SO_DOMAIN on a duplicate)."""
    sock = _socket.socket(fileno=os.dup(fd))
    try:
        return sock.family == _socket.AF_UNIX
    finally:
        sock.close()


class Plain:
    """A connection's bytes as they are: reads and writes on its fd."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)

    def write(self, data: bytes | bytearray) -> int:
        return os.write(self.fd, data)

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        os.close(self.fd)


class Tls:
    """A connection's bytes through TLS (a non-blocking `ssl.SSLSocket`): "would block" is
    `BlockingIOError`, as on a plain fd; what TLS decrypted but was not read yet is `pending()`."""

    __slots__ = ("eof", "sock", "ssl")

    def __init__(self, sock: Any) -> None:
        import ssl  # already imported by `Daemon.listen` in TLS mode

        self.sock, self.ssl, self.eof = sock, ssl, False

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (several TLS records if there are), b"" at the end, else BlockingIOError."""
        chunks: list[bytes] = []
        got = 0
        while got < n and not self.eof:
            try:
                chunk = self.sock.recv(n - got)
            except (self.ssl.SSLWantReadError, self.ssl.SSLWantWriteError):
                break
            except (self.ssl.SSLZeroReturnError, self.ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
        if chunks or self.eof:
            return b"".join(chunks)
        raise BlockingIOError

    def write(self, data: bytes | bytearray) -> int:
        # A write that would block is retried later with the same leading bytes (or more), as TLS asks.
        try:
            return int(self.sock.send(data[:TLS_WRITE]))
        except (self.ssl.SSLWantWriteError, self.ssl.SSLWantReadError):
            raise BlockingIOError from None

    def pending(self) -> int:
        """Bytes to read without waiting for epoll (1 for an end not reported yet, behind data)."""
        return 1 if self.eof else int(self.sock.pending())

    def close(self) -> None:
        self.sock.close()


class Stream:
    """One stream's state on this side: what the server sent (not yet consumed), and our credit."""

    __slots__ = ("buf", "credit", "ended", "reset", "uncredited")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ended = self.reset = False
        self.credit = proto.WINDOW  # what we may still send before the server credits more
        self.uncredited = 0  # consumed from buf, not yet credited back


class Connection:
    """The server: reads request lines and frames, runs each request as a task, writes replies."""

    def __init__(self, daemon: Daemon, fd: int, secret: str, io: Plain | Tls | None = None) -> None:
        self.daemon, self.fd, self.open = daemon, fd, True
        self.io = io or Plain(fd)
        self.inbuf, self.outbuf, self.scanned = bytearray(), bytearray(), 0
        self.tasks: dict[RequestId, Task] = {}
        self.streams: dict[int, Stream] = {}
        self.watching_out = False
        self.splices = isinstance(self.io, Plain)
        """Whether tunnels may splice into this connection (TLS must see the bytes to encrypt them)."""
        self.hands_over = self.splices and _is_unix(fd)
        """Whether sockets may ride on replies (SCM_RIGHTS: a unix socket's, the server on this machine)."""
        LOOP.watch(fd, self.on_event)
        self.send(proto.hello(secret, os.getpid()))

    def send(self, msg: Message, fd: int | None = None) -> None:
        """Queue `msg` and write what the socket takes; `fd` (with nothing queued ahead, on a unix
        channel) rides on its first byte, else the message goes without it."""
        if not self.open:
            return
        line = (dumps(msg) + "\n").encode("utf-8", "backslashreplace")  # a lone surrogate: an escape
        if fd is not None and self.hands_over and not self.outbuf:
            carrier = _socket.socket(fileno=os.dup(self.fd))  # sendmsg needs a socket object
            try:
                sent = carrier.sendmsg(
                    [line], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))]
                )
            except BlockingIOError:
                sent = 0
            except OSError:
                return self.close()
            finally:
                carrier.close()
            line = line[sent:]
        self.outbuf += line
        self.flush()

    # Streams (`executor_proto` describes frames and credit). A request's generator waits on
    # `credit_left` before `send_frame`, and on its `accept_stream`'s buf/ended/reset.

    def accept_stream(self, sid: int) -> Stream:
        """The stream `sid` (made if new): frames the server sends on it land in its `buf`."""
        stream = self.streams.get(sid)
        if stream is None:
            stream = self.streams[sid] = Stream()
        return stream

    def credit_left(self, sid: int) -> int:
        """Bytes we may send on `sid` now (0 once the connection or the stream is gone)."""
        stream = self.streams.get(sid)
        return stream.credit if self.open and stream is not None and not stream.reset else 0

    def send_frame(self, sid: int, data: bytes | memoryview) -> None:
        """Send `data` (at most FRAME_MAX bytes, within `credit_left`) on `sid`.

        What the socket does not take at once is copied into `outbuf`: `data` is never kept, so
        it may be a view of a buffer the caller reuses."""
        if self.open and data:
            self.accept_stream(sid).credit -= len(data)
            header = proto.frame_header(sid, len(data))
            if self.outbuf or not isinstance(self.io, Plain):
                self.outbuf += header
                self.outbuf += data
                self.flush()
                return
            try:  # nothing queued: straight from `data`, only what the socket does not take is copied
                sent = os.writev(self.fd, (header, data))
            except BlockingIOError:
                sent = 0
            except OSError:
                return self.close()
            if sent < len(header):
                self.outbuf += header[sent:]
                sent = len(header)
            self.outbuf += memoryview(data)[sent - len(header) :]
            self.watch_out()

    def send_spliced(self, sid: int, pipe: int, n: int) -> None:
        """Send the `n` bytes waiting in `pipe` as one frame on `sid`, the pipe empty afterwards.

        The kernel moves them from the pipe to our socket (`splice`) when nothing is queued ahead;
        what the socket does not take at once is read into `outbuf`, behind what is queued there.
        """
        if not self.open:
            return
        self.accept_stream(sid).credit -= n
        header, left = proto.frame_header(sid, n), n
        if not self.outbuf:
            try:
                sent = os.write(self.fd, header)
                header = header[sent:]
                if not header:
                    left -= os.splice(pipe, self.fd, left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                pass
            except OSError:
                return self.close()
        self.outbuf += header
        while left > 0:
            chunk = os.read(pipe, left)
            self.outbuf += chunk
            left -= len(chunk)
        self.watch_out()

    def end_stream(self, sid: int) -> None:
        """Our end of `sid` (an empty frame)."""
        if self.open:
            self.outbuf += proto.frame_header(sid, 0)
            self.flush()

    def consumed(self, sid: int, n: int) -> None:
        """Credit the server for `n` bytes taken from the stream's `buf` (in batches of a quarter window)."""
        stream = self.streams.get(sid)
        if stream is not None and n > 0:
            stream.uncredited += n
            if stream.uncredited >= proto.WINDOW // 4:
                self.send({"type": "credit", "stream": sid, "bytes": stream.uncredited})
                stream.uncredited = 0

    def reset_stream(self, sid: int) -> None:
        """Abort `sid` both ways: tell the server, forget the stream."""
        if self.streams.pop(sid, None) is not None:
            self.send({"type": "reset", "stream": sid})

    def drop_stream(self, sid: int) -> None:
        """Forget `sid` (its request is done with it); frames still arriving for it are dropped."""
        self.streams.pop(sid, None)

    def on_frame(self, sid: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None and sid in self.tasks:  # bytes sent right behind the request that opens the stream
            stream = self.accept_stream(sid)
        if stream is None or stream.reset:
            return
        if not data:
            stream.ended = True
        elif len(stream.buf) + len(data) > proto.WINDOW:
            log(f"WARNING connection dropped: the server overran stream {sid}'s window")
            self.close()
        else:
            stream.buf += data

    def on_control(self, req: Message) -> bool:
        """Handle a `credit` or `reset` from the server (never answered); False if `req` is neither."""
        op = req.get("op")
        if op not in ("credit", "reset"):
            return False
        sid, n = req.get("stream"), req.get("bytes")
        stream = self.streams.get(sid) if isinstance(sid, int) else None
        if stream is None:
            return True
        if op == "reset":
            stream.reset = True
            del self.streams[sid]  # type: ignore[arg-type]
            task = self.tasks.get(sid)
            if task is not None:
                task.cancel_state = task.cancel_state or 1
        elif isinstance(n, int) and not isinstance(n, bool) and n > 0:
            stream.credit = min(stream.credit + n, proto.WINDOW)
        return True

    def flush(self) -> None:
        try:
            del self.outbuf[: self.io.write(self.outbuf)]
        except BlockingIOError:
            pass
        except OSError:
            return self.close()
        self.watch_out()

    def watch_out(self) -> None:
        """Ask epoll for writability while bytes wait in `outbuf` (and only then: a change costs a call)."""
        if self.open and bool(self.outbuf) != self.watching_out:
            self.watching_out = bool(self.outbuf)
            LOOP.watch(self.fd, self.on_event, IN | OUT if self.outbuf else IN)

    def on_event(self, events: int) -> None:
        if events & OUT and self.outbuf:
            self.flush()
        while self.open and events & ~OUT:
            try:
                data = self.io.read(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self.inbuf += data
            self.parse()
            if self.open and (not data or len(self.inbuf) > READ_LIMIT):
                if data:
                    log("WARNING connection dropped: a request line over the size limit")
                elif self.inbuf and self.inbuf[0] != proto.FRAME:
                    self.receive(bytes(self.inbuf))  # a last line without its newline
                self.close()
            if not self.io.pending():  # TLS may hold decrypted bytes (or an end) epoll cannot see
                return

    def parse(self) -> None:
        """Take every whole line and frame from the front of `inbuf`."""
        buf, pos, partial = self.inbuf, 0, False
        while self.open and pos < len(buf):
            if buf[pos] == proto.FRAME:
                if len(buf) - pos < proto.FRAME_HEADER:
                    break
                try:
                    sid, length = proto.parse_frame_header(buf[pos : pos + proto.FRAME_HEADER])
                except proto.ProtocolError as exc:
                    log(f"WARNING connection dropped: {exc}")
                    return self.close()
                end = pos + proto.FRAME_HEADER + length
                if len(buf) < end:
                    break
                with memoryview(buf) as view:  # one copy, not two (a bytearray slice is one)
                    data = bytes(view[pos + proto.FRAME_HEADER : end])
                self.on_frame(sid, data)
            else:
                newline = buf.find(b"\n", max(pos, self.scanned if pos == 0 else 0))
                if newline < 0:
                    partial = True
                    break
                end = newline + 1
                self.receive(bytes(buf[pos:end]))
            pos = end
        del buf[:pos]
        self.scanned = len(buf) if partial else 0  # a long line is searched for its end only once

    def close(self) -> None:
        if self.open:
            self.open = False
            LOOP.unwatch(self.fd)
            self.io.close()
            self.daemon.connections.discard(self)
            for stream in self.streams.values():
                stream.reset = True
            self.streams.clear()
            for task in self.tasks.values():
                if task.op == "exec":
                    task.cancel_state = task.cancel_state or 1
            self.daemon.lost(self)

    def receive(self, line: bytes) -> None:
        try:
            req = loads(line)
        except Exception:  # ValueError, and RecursionError for absurd nesting
            return self.send(error_reply(None, "bad_request", "request is not valid JSON"))
        rid = req.get("id") if isinstance(req, dict) else None
        if isinstance(req, dict) and req.get("type") in ("welcome", "reject"):
            if req["type"] == "reject":
                log(f"ERROR the server refused this daemon: {str(req.get('error'))[:500]}")
                self.close()
        elif isinstance(req, dict) and self.on_control(req):
            pass
        elif not isinstance(req, dict) or isinstance(rid, bool) or not isinstance(rid, (int, str)):
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


class Pending:
    """A TCP connection that has not proven itself yet (`executor_auth`): it gets a nonce, and one
    line to answer with, within `auth.TIMEOUT` (TLS handshake included); anything else closes it
    without another word."""

    def __init__(self, daemon: Daemon, fd: int, tls: Any = None) -> None:
        self.daemon, self.fd, self.open = daemon, fd, True
        self.io: Plain | Tls = Plain(fd) if tls is None else Tls(tls)
        self.shaking = tls is not None
        self.nonce = auth.nonce()
        self.buf = bytearray()
        daemon.pending.add(self)
        Task(None, None, "auth", self.expire())
        if self.shaking:
            self.handshake()
        else:
            self.challenge()

    def challenge(self) -> None:
        challenge = dumps({"type": "challenge", "nonce": self.nonce}) + "\n"
        try:  # a few bytes into a new socket's empty buffer: never short
            self.io.write(challenge.encode())
        except OSError:  # BlockingIOError included
            self.close()
            return
        LOOP.watch(self.fd, self.on_event)

    def handshake(self) -> None:
        """One step of the TLS handshake; the challenge once it is done."""
        ssl = self.io.ssl  # type: ignore[union-attr]
        try:
            self.io.sock.do_handshake()  # type: ignore[union-attr]
        except ssl.SSLWantReadError:
            return LOOP.watch(self.fd, self.on_event, IN)
        except ssl.SSLWantWriteError:
            return LOOP.watch(self.fd, self.on_event, IN | OUT)
        except OSError as exc:  # ssl.SSLError included: not TLS, or a client that rejects our certificate
            log(f"WARNING refused a connection whose TLS handshake failed: {str(exc)[:200]}")
            return self.close()
        self.shaking = False
        self.challenge()

    def expire(self) -> Steps:
        yield (lambda: not self.open), auth.TIMEOUT
        self.close()
        return {}

    def close(self) -> None:
        if self.open:
            self.open = False
            LOOP.unwatch(self.fd)
            self.io.close()
            self.daemon.pending.discard(self)

    def on_event(self, events: int) -> None:
        if self.shaking:
            return self.handshake()
        try:
            data = self.io.read(auth.LINE_MAX + 1 - len(self.buf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.buf += data
        end = self.buf.find(b"\n")
        if end < 0:
            if not data or len(self.buf) > auth.LINE_MAX:
                self.close()
            return
        ours = self.answer(bytes(self.buf[:end]))
        if ours is None or end + 1 != len(self.buf) or self.io.pending():  # nothing more before our hello
            log("WARNING refused a connection that did not prove it is the server")
            return self.close()
        self.open = False
        LOOP.unwatch(self.fd)
        self.daemon.pending.discard(self)
        for conn in list(self.daemon.connections):  # only the newest server counts
            conn.close()
        self.daemon.adopt(self.fd, ours, self.io)

    def answer(self, line: bytes) -> str | None:
        """Our proof for the hello if `line` proves the server knows the secret; else None."""
        try:
            msg = loads(line)
        except Exception:
            return None
        if not isinstance(msg, dict) or msg.get("type") != "auth":
            return None
        theirs, proof = msg.get("nonce"), msg.get("proof")
        if not auth.is_nonce(theirs) or not isinstance(proof, str):
            return None
        secret = self.daemon.read_secret()
        binding = self.daemon.binding
        if not secret or not auth.same(proof, auth.proof(secret, "server", self.nonce, theirs, binding)):
            return None
        return auth.proof(secret, "daemon", self.nonce, theirs, binding)


class Daemon:
    """Shared state of the executor: the background processes and the connection to the server."""

    def __init__(
        self,
        log_dir: str,
        log_max: int,
        dial: str = "",
        secret_file: str = "",
        listen: int = 0,
        workspace: str = "",
        tls: tuple[str, str] | None = None,
    ) -> None:
        """`tls`: the certificate and key files the listener speaks TLS with (None: plain TCP)."""
        self.connections: set[Connection] = set()
        self.pending: set[Pending] = set()
        self.workspace = workspace or "/workspace"
        self.background = Background(log_dir, log_max, self.broadcast)
        self.dial_path, self.secret_file, self.listen_port = dial, secret_file, listen
        self.listener: _socket.socket | None = None
        self.tls_files, self.tls_context, self.binding = tls, None, ""
        self.terminals = Terminals()
        self.tunnels = Tunnels()
        self.stopping = False

    def broadcast(self, msg: Message) -> None:
        for conn in list(self.connections):
            conn.send(msg)

    def handle(self, op: str, req: Message, conn: Connection, rid: RequestId) -> Steps:
        """Carry out one request through `OPS`: a plain reply, or steps (a generator) giving one."""
        run = OPS.get(op)
        if run is None:
            raise RequestError("bad_request", f"unknown op {op!r}")
        outcome = run(self, req, conn, rid)
        if isinstance(outcome, dict):
            return outcome
        return (yield from outcome)

    def adopt(self, fd: int, secret: str = "", io: Plain | Tls | None = None) -> None:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)  # commands must never hold the server's channel
        self.connections.add(Connection(self, fd, secret, io))

    def read_secret(self) -> str:
        """The secret, read again at each use (a restarted server may have changed it); "" if none."""
        try:
            with open(self.secret_file) as f:
                return f.read(proto.SECRET_MAX + 1).strip()
        except OSError as exc:
            log(f"ERROR cannot read the secret: {exc}")
            return ""

    def lost(self, conn: Connection) -> None:
        """A connection ended: dial the server again, wait for it to dial (TCP), or (fd) stop."""
        self.tunnels.drop(conn)
        if self.listen_port:
            return
        if not self.dial_path:
            self.stopping = True
        elif not self.stopping:
            Task(None, None, "dial", self.redial())

    def redial(self) -> Steps:
        delay, failure = DIAL_FIRST, ""
        while not self.stopping:
            try:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)  # a full backlog says EAGAIN instead of blocking the loop
                    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SOCKET_BUFFER)
                    sock.connect(self.dial_path)
                    secret = self.read_secret()
                except BaseException:
                    sock.close()
                    raise
                self.adopt(sock.detach(), secret)
                return {}
            except OSError as exc:
                if str(exc) != failure:  # once per kind of failure, not at every dial
                    failure = str(exc)
                    log(f"INFO cannot reach the server yet: {failure}")
            yield None, delay
            delay = min(delay * 2, DIAL_MAX)
        return {}

    def listen(self) -> None:
        """Listen on the TCP port on every address of the sandbox (its network namespace's own)."""
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", self.listen_port))
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        if self.tls_files is not None:
            self.tls_context = self.tls_server()
        LOOP.watch(sock.fileno(), self.on_accept)

    def tls_server(self) -> Any:
        """The TLS 1.3 server context of our certificate; `binding` becomes its fingerprint."""
        import ssl  # lazy: only a TLS listener pays for it

        cert, key = self.tls_files  # type: ignore[misc]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.num_tickets = 0  # nothing to resume: the server dials afresh each time
        context.load_cert_chain(cert, key)
        with open(cert) as f:
            self.binding = auth.fingerprint(ssl.PEM_cert_to_DER_cert(f.read()))
        return context

    def on_accept(self, events: int) -> None:
        while True:
            try:
                fd, _addr = self.listener._accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of fds, a connection reset before we took it
                log(f"WARNING accept failed: {exc}")
                return
            if len(self.pending) >= MAX_PENDING:  # a flood costs a closed socket each
                os.close(fd)
                continue
            sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            sock.setblocking(False)
            os.set_inheritable(fd, False)
            if self.tls_context is None:
                Pending(self, sock.detach())
                continue
            try:
                tls = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:  # reset already
                sock.close()
                continue
            Pending(self, tls.fileno(), tls)

    def on_signal(self, wakeup: int) -> None:
        received = os.read(wakeup, 512)
        self.stopping = self.stopping or signal.SIGTERM in received or signal.SIGINT in received
        for child in list(Child.unwatched.values()):
            child.reap()


OPS: dict[str, Callable[[Daemon, Message, Connection, RequestId], Message | Steps]] = {
    "ping": lambda d, req, conn, rid: {"version": proto.VERSION, "pid": os.getpid()},
    "exec": lambda d, req, conn, rid: run_command(req, conn, rid),
    "spawn": lambda d, req, conn, rid: d.background.spawn(req),
    "terminate": lambda d, req, conn, rid: d.background.terminate(req),
    "tail": lambda d, req, conn, rid: d.background.tail(req),
    "list": lambda d, req, conn, rid: {"processes": d.background.listing()},
    "pty_open": lambda d, req, conn, rid: d.terminals.handle("pty_open", req, conn, rid),
    "pty_resize": lambda d, req, conn, rid: d.terminals.handle("pty_resize", req, conn),
    "pty_close": lambda d, req, conn, rid: d.terminals.handle("pty_close", req, conn),
    "ports": lambda d, req, conn, rid: {"ports": listening(req.get("owners") is not False)},
    "tunnel_open": lambda d, req, conn, rid: d.tunnels.open_tunnel(req, conn, rid),
    "tunnel_handoff": lambda d, req, conn, rid: d.tunnels.hand_over(req, conn),
}
"""The ops (`cancel` is the connection's own); a new one also gets its reply's shape in
`executor_proto.RESULTS`, which the server checks."""


def _files_op(name: str) -> Callable[[Daemon, Message, Connection, RequestId], Message | Steps]:
    def run(d: Daemon, req: Message, conn: Connection, rid: RequestId) -> Message | Steps:
        import executor_files  # on first use: an idle sandbox never pays for it

        executor_files.ROOT = d.workspace
        return executor_files.OPS[name](req, conn, rid)

    return run


for _name in ("fs_list", "fs_stat", "fs_mkdir", "fs_remove", "fs_rename", "fs_rg", "fs_read", "fs_write"):
    OPS[_name] = _files_op(_name)


def _trim_heap() -> Steps:
    """Give back what start-up (compiling, importing) left in the C heap (glibc only), once idle."""
    yield None, 0.2
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, AttributeError, OSError):
        pass
    return {}


def serve(daemon: Daemon, fd: int | None) -> None:
    """Speak on the inherited socket `fd`, or dial the server, until SIGTERM, SIGINT or (fd) its end."""
    os.makedirs(daemon.background.log_dir, exist_ok=True)
    wakeup, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):  # SIGCHLD: for a kernel without pidfds
        signal.signal(sig, lambda *_: None)
    LOOP.watch(wakeup, lambda _: daemon.on_signal(wakeup))
    if fd is not None:
        daemon.adopt(fd)
    elif daemon.listen_port:
        daemon.listen()
    else:
        Task(None, None, "dial", daemon.redial())
    log(f"INFO executor running (pid {os.getpid()}, protocol {proto.VERSION})")
    Task(None, None, "trim", _trim_heap())
    LOOP.run(until=lambda: daemon.stopping)
    for conn in list(daemon.connections):
        conn.close()
    for task in LOOP.tasks:
        task.cancel_state = task.cancel_state or 1
    Task(None, None, "shutdown", daemon.background.shutdown(grace=2.0))
    deadline = time.monotonic() + 10
    LOOP.run(until=lambda: not LOOP.tasks or time.monotonic() > deadline)


USAGE = (
    "[--fd N | --dial PATH --secret-file PATH"
    " | --listen PORT --secret-file PATH [--tls-cert PATH --tls-key PATH]]"
    " [--log-dir PATH] [--log-max BYTES] [--workspace PATH]"
)


def main(argv: list[str] | None = None) -> None:
    __import__("executor_harden").make_undumpable()
    args = {"--fd": "", "--dial": "", "--listen": "", "--secret-file": "", "--tls-cert": "", "--tls-key": ""}
    args.update({"--log-dir": "/run/crogia/logs", "--log-max": "", "--workspace": ""})
    rest = list(sys.argv[1:] if argv is None else argv)
    while rest:
        name, _, value = rest.pop(0).partition("=")
        if name in ("-h", "--help"):
            sys.exit(f"usage: {sys.argv[0]} {USAGE}")
        if name not in args or not (value or rest):
            sys.exit(f"{sys.argv[0]}: bad arguments; see --help")
        args[name] = value or rest.pop(0)
    modes = [name for name in ("--fd", "--dial", "--listen") if args[name]]
    if len(modes) != 1 or (modes[0] != "--fd") != bool(args["--secret-file"]):
        sys.exit(f"usage: {sys.argv[0]} {USAGE}")
    if args["--listen"] and not (args["--listen"].isdigit() and 0 < int(args["--listen"]) < 65536):
        sys.exit(f"{sys.argv[0]}: --listen takes a TCP port")
    tls = (args["--tls-cert"], args["--tls-key"]) if args["--tls-cert"] or args["--tls-key"] else None
    if tls is not None and not (all(tls) and args["--listen"]):
        sys.exit(f"{sys.argv[0]}: --tls-cert and --tls-key go together, with --listen")
    log_max = int(args["--log-max"] or LOG_MAX)
    daemon = Daemon(
        args["--log-dir"],
        log_max,
        args["--dial"],
        args["--secret-file"],
        int(args["--listen"] or 0),
        args["--workspace"],
        tls,
    )
    serve(daemon, int(args["--fd"]) if args["--fd"] else None)


if __name__ == "__main__":
    main()
