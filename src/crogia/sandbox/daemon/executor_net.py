"""The `ports` and `tunnel_open` ops: what listens inside the sandbox, and byte streams to it for the server.

Part of the executor daemon (`executor.py` says how it fits). The message shapes live here and
nowhere else on this side (the server's half is `crogia.sandbox.tunnel_channel`):

  ports {owners?}                  -> {ports: [{port, address, pid, pgid}]}  TCP LISTEN sockets
      from /proc/net/tcp and tcp6, one entry a port (at most PORTS_MAX); pid: a process holding
      the socket, pgid its process group (found through /proc/*/fd when `owners`, else null;
      null when it cannot tell).
  tunnel_handoff {port}            -> {handoff: true, local}   connected as tunnel_open does, and
      the socket itself (local: its own port) rides on the reply (SCM_RIGHTS, on a plain unix
      channel only: else a
      "bad_request", and the server falls back to tunnel_open). The server then speaks to the port
      directly: one relay fewer. The daemon keeps no copy.
  tunnel_open {port}               -> {}   once connected to 127.0.0.1:port (then [::1]:port);
      a "refused" error when nobody listens. The request's id is the id of a lasting binary
      stream (`executor_proto`): what the socket sends goes out as frames on it, frames the
      server sends are written to the socket; an end frame is a half-close (the socket's EOF,
      or `shutdown(SHUT_WR)` for the server's); a reset either way closes the socket.

Where the daemon's connection is a plain socket, a tunnel's bytes past its first MiB go socket to
pipe to channel by `splice` (`Connection.send_spliced`): the kernel moves them, this process never
copies them. (A page's small answers go by recv and one write: fewer calls, no pipe to make.)

Flow control is the protocol's credit: the daemon reads a socket only while the stream has
credit left (and never more than that), so the socket's own buffers hold the sandbox's server
back while the proxy's client is slow; what the server sends is taken from the stream's buffer
(at most a window) only as fast as the socket accepts it. A tunnel ends with its connection.
"""

from __future__ import annotations

import _socket
import errno
import mmap
import os

import executor_proto as proto
from executor_core import HANDED, IN, LOOP, OUT, RequestError, Task, arg

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from executor import Connection, Stream
    from executor_core import Message, RequestId, Steps

PORTS_MAX = 512
PAUSE_AT = 1024 * 1024
"""Stop reading sockets while the connection has this much not yet written (the server is slow)."""
MAX_TUNNELS = 512
CONNECT_TIMEOUT = 5.0
SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_SLACK = 64 * 1024
"""A spliced frame's bytes stop this short of the pipe's size: on the server's side they may take a
few more of a pipe's pages than here (the channel's packets split pages), and a frame the server's
pipe can take whole goes through it without a copy (`crogia.sandbox.frame_pipe`)."""
SPLICE_AFTER = 1 << 20
"""Bytes a tunnel carries by recv before it splices (a long download, not a page's small answers)."""
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
LISTEN = b"0A"
ENGINE_DNS = "127.0.0.11"
"""Docker's embedded DNS: the engine makes its listener in a container's namespace on a user-defined
network. Not the sandbox's, so never one of its ports (nor a `port_opened`)."""
RECV_BUFFER = mmap.mmap(-1, proto.FRAME_MAX, flags=mmap.MAP_PRIVATE)
RECV_VIEW = memoryview(RECV_BUFFER)
"""What a tunnel's socket reads go into (one thread: one buffer for every tunnel; `send_frame`
copies what it does not send at once, so the next read may reuse it). `recv(room)`
would map and unmap `room` bytes for every read, however few came: a small answer's costliest part.
An anonymous mapping, not a bytearray (which is zeroed at once: 1 MiB resident in every daemon,
tunnel or not): a page is the sandbox's only once a read has written it."""


def _address(hex_addr: bytes) -> str:
    raw = bytes.fromhex(hex_addr.decode())
    if len(raw) == 4:
        return _socket.inet_ntop(_socket.AF_INET, raw[::-1])
    # tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return _socket.inet_ntop(_socket.AF_INET6, words)


def _owners(inodes: set[int]) -> dict[int, int]:
    """inode -> pid of a process holding that socket (readable /proc/*/fd only)."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or len(found) == len(inodes):
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes and inode not in found:
                    found[inode] = int(name)
    return found


def listening(owners: bool) -> list[Message]:
    """The sandbox's TCP listening ports, by port; a wildcard address wins over a loopback one."""
    by_port: dict[int, tuple[str, int]] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, "rb") as f:
                lines = f.read(16 << 20).split(b"\n")[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            try:
                addr, _, port_hex = fields[1].partition(b":")
                port, inode, address = int(port_hex, 16), int(fields[9]), _address(addr)
            except ValueError:
                continue
            if address == ENGINE_DNS or (port in by_port and by_port[port][0] in ("0.0.0.0", "::")):
                continue
            by_port[port] = (address, inode)
    ports = sorted(by_port.items())[:PORTS_MAX]
    pids = _owners({inode for _, (_, inode) in ports}) if owners and ports else {}
    out = []
    for port, (address, inode) in ports:
        pid = pids.get(inode)
        out.append({"port": port, "address": address, "pid": pid, "pgid": _pgid(pid) if pid else None})
    return out


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rfind(b")") + 2 :].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def dial(port: int, stopped: Callable[[], bool]) -> Steps:
    """A connected, non-blocking TCP socket to 127.0.0.1:port (then [::1]:port); "refused" if none.

    Waits at most CONNECT_TIMEOUT for each address; `stopped()` (or a cancel) gives up at once."""
    error = ""
    for host, family in (("127.0.0.1", _socket.AF_INET), ("::1", _socket.AF_INET6)):
        try:
            sock = _socket.socket(family, _socket.SOCK_STREAM)
        except OSError as exc:  # no IPv6 in this sandbox
            error = exc.strerror or str(exc)
            break
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code in (0, errno.EINPROGRESS):
            code = yield from _connected(sock, stopped)
            if not code:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                return sock
        error = os.strerror(code) if code > 0 else "timed out"
        sock.close()
        if code != errno.ECONNREFUSED:
            break
    raise RequestError("refused", f"cannot connect to port {port} in the sandbox: {error}")


def _connected(sock: _socket.socket, stopped: Callable[[], bool]) -> Steps:
    """Once `sock`'s connect is done: 0, its error, or -1 when it timed out."""
    done = [False]
    LOOP.watch(sock.fileno(), lambda events: done.__setitem__(0, True), OUT)
    cancelled = yield lambda: done[0] or stopped(), CONNECT_TIMEOUT
    LOOP.unwatch(sock.fileno())
    if cancelled or stopped():
        sock.close()
        raise RequestError("cancelled", "the tunnel was reset while connecting")
    return sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR) if done[0] else -1


class Tunnel:
    """One TCP connection inside the sandbox, carried on the server's stream `sid`.

    One task (`pump`) moves bytes both ways; epoll only says what the socket is ready for.
    """

    def __init__(self, conn: Connection, sid: int, owner: Tunnels) -> None:
        self.conn, self.sid, self.owner = conn, sid, owner
        self.stream: Stream = conn.accept_stream(sid)
        self.sock: _socket.socket | None = None
        self.readable = self.writable = False
        self.armed = 0
        """The events epoll watches the socket for (0: none, not registered)."""
        self.sent_end = self.shut = self.closed = False
        self.pipe: tuple[int, int, int] | None = None  # (read end, write end, capacity) for splice
        self.carried = 0  # bytes sent to the server so far
        self.splices = conn.splices

    def connect(self, port: int) -> Steps:
        try:
            self.sock = yield from dial(port, lambda: self.stream.reset)
        except RequestError:
            self.close()
            raise
        self.writable, self.readable = True, False  # writable until a send says otherwise (then epoll tells)
        Task(None, None, "tunnel", self.pump())
        return {}

    def on_event(self, events: int) -> None:
        self.readable = self.readable or bool(events & ~OUT)
        self.writable = self.writable or bool(events & OUT)
        if not self.due():  # else the pump runs before the next poll, and arms what it waits on then
            self.arm()

    def arm(self) -> None:
        """Ask epoll only for what the pump waits on (level-triggered: else it would spin).

        Only a change is told to epoll: a request and its answer cost no `epoll_ctl` at all."""
        if self.sock is None or self.closed:
            return
        mask = (0 if self.readable or self.sent_end else IN) | (
            OUT if self.stream.buf and not self.writable else 0
        )
        if mask == self.armed:
            return
        self.armed = mask
        if mask:
            LOOP.watch(self.sock.fileno(), self.on_event, mask)
        else:
            LOOP.unwatch(self.sock.fileno())

    def due(self) -> bool:
        stream, conn = self.stream, self.conn
        return (
            stream.reset
            or not conn.open
            or (self.sent_end and self.shut)
            or (bool(stream.buf) and self.writable)
            or (stream.ended and not stream.buf and not self.shut)
            or (self.readable and conn.credit_left(self.sid) > 0 and len(conn.outbuf) <= PAUSE_AT)
        )

    def pump(self) -> Steps:
        self.arm()
        while True:
            yield self.due, None
            if self.stream.reset or not self.conn.open or (self.sent_end and self.shut):
                break
            self.inbound()
            self.outbound()
            self.arm()
        self.close()
        return {}

    def inbound(self) -> None:
        """What the server sent, into the socket as far as it takes it; its end, a half-close."""
        stream, sock = self.stream, self.sock
        assert sock is not None
        if stream.buf and self.writable:
            try:
                n = sock.send(stream.buf)
            except BlockingIOError:
                n = 0
                self.writable = False
            except OSError:  # the socket is gone: drop what comes (its end comes through the read side)
                n = len(stream.buf)
            del stream.buf[:n]
            self.conn.consumed(self.sid, n)
            if stream.buf:
                self.writable = False
        if stream.ended and not stream.buf and not self.shut:
            self.shut = True
            try:  # noqa: SIM105 (the daemon imports as little as it can: no contextlib)
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass

    def outbound(self) -> None:
        """What the socket holds, as frames within the stream's credit; its EOF (or failure), our end."""
        conn, sock = self.conn, self.sock
        assert sock is not None
        while self.readable and len(conn.outbuf) <= PAUSE_AT:
            room = min(conn.credit_left(self.sid), proto.FRAME_MAX)
            pipe = self.spliced()
            if pipe is not None:
                room = min(room, pipe[2] - SPLICE_SLACK)
            if room <= 0:
                return
            try:  # never more than the credit left, either way
                if pipe is not None:
                    got = os.splice(sock.fileno(), pipe[1], room, flags=SPLICE)
                else:
                    got = sock.recv_into(RECV_BUFFER, room)
            except BlockingIOError:
                self.readable = False
                return
            except OSError as exc:
                if pipe is not None and exc.errno == errno.EINVAL:  # a socket splice cannot read
                    self.splices = False
                    continue
                got = 0
            if not got:
                self.readable, self.sent_end = False, True
                conn.end_stream(self.sid)
                return
            if pipe is not None:
                conn.send_spliced(self.sid, pipe[0], got)
            else:
                conn.send_frame(self.sid, RECV_VIEW[:got])  # it copies what it cannot send at once
            self.carried += got
            if got < room:
                self.readable = False

    def spliced(self) -> tuple[int, int, int] | None:
        """This tunnel's pipe (made once it has carried SPLICE_AFTER) while it may splice; None: recv.

        A short answer costs fewer calls through recv and one write (and no pipe to make)."""
        if self.pipe is None and self.splices and self.carried >= SPLICE_AFTER:
            try:
                read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # out of fds: this tunnel copies instead
                self.splices = False
                return None
            import fcntl  # built into Debian's python3; loaded by the first tunnel only

            try:  # noqa: SIM105 (the daemon imports as little as it can: no contextlib)
                fcntl.fcntl(write_end, F_SETPIPE_SZ, proto.FRAME_MAX)
            except OSError:  # over pipe-max-size, or the user's pipes are over pipe-user-pages-soft
                pass
            capacity = fcntl.fcntl(write_end, F_GETPIPE_SZ)
            if capacity < proto.FRAME_MAX:  # short frames would cost more than the copies saved
                os.close(read_end)  # (a Docker container's root shares uid 0's pipe pages with the host's)
                os.close(write_end)
                self.splices = False
                return None
            self.pipe = (read_end, write_end, capacity)
        return self.pipe if self.splices else None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.pipe is not None:
                os.close(self.pipe[0])
                os.close(self.pipe[1])
            if self.sock is not None:
                LOOP.unwatch(self.sock.fileno())
                self.sock.close()
            self.owner.forget(self)
            self.conn.drop_stream(self.sid)


class Tunnels:
    """The daemon's open tunnels, by (connection, stream id)."""

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], Tunnel] = {}

    def forget(self, tunnel: Tunnel) -> None:
        self.open.pop((id(tunnel.conn), tunnel.sid), None)

    def drop(self, conn: Connection) -> None:
        for tunnel in [t for t in self.open.values() if t.conn is conn]:
            tunnel.close()

    def open_tunnel(self, req: Message, conn: Connection, rid: RequestId) -> Steps:
        port = arg(req, "port", int)
        if not 1 <= port <= 65535:
            raise RequestError("bad_request", "port must be within 1..65535")
        if not isinstance(rid, int) or isinstance(rid, bool) or not 1 <= rid <= proto.STREAM_MAX:
            raise RequestError("bad_request", "a tunnel's request id must be a stream id")
        if len(self.open) >= MAX_TUNNELS:
            raise RequestError("bad_request", f"at most {MAX_TUNNELS} tunnels per sandbox")
        opened = self.open[(id(conn), rid)] = Tunnel(conn, rid, self)
        return opened.connect(port)

    def hand_over(self, req: Message, conn: Connection) -> Steps:
        """`tunnel_handoff`: connect to the port, then give the server the socket itself (SCM_RIGHTS)."""
        port = arg(req, "port", int)
        if not 1 <= port <= 65535:
            raise RequestError("bad_request", "port must be within 1..65535")
        if not conn.hands_over:
            raise RequestError("bad_request", "sockets are handed over only on a local unix channel")
        sock = yield from dial(port, lambda: not conn.open)
        try:  # the socket's fd rides on the reply's first byte: nothing may be queued ahead of it
            cancelled = yield lambda: not conn.outbuf or not conn.open, CONNECT_TIMEOUT
        except BaseException:
            sock.close()
            raise
        if cancelled or conn.outbuf or not conn.open:
            sock.close()
            raise RequestError("cancelled", "the channel stayed busy: nothing handed over")
        return {"handoff": True, "local": sock.getsockname()[1], HANDED: sock}
