"""The `ports` and `tunnel_*` ops: what listens inside the sandbox, and byte streams to it for the server.

Part of the executor daemon (`executor.py` says how it fits). The message shapes live here and
nowhere else on this side (the server's half is `crogia.sandbox.tunnel_channel`):

  ports {owners?}                  -> {ports: [{port, address, pid, pgid}]}  TCP LISTEN sockets
      from /proc/net/tcp and tcp6, one entry a port (at most PORTS_MAX); pid: a process holding
      the socket, pgid its process group (found through /proc/*/fd when `owners`, else null;
      null when it cannot tell).
  tunnel_open {tunnel, port}       -> {}   connect to 127.0.0.1:port (then [::1]:port); `tunnel`
      is the server's id for the stream, unique on its connection
  tunnel_data {tunnel, data_b64}   -> {}   bytes for the socket (at most CHUNK decoded); the reply
      comes once fewer than WRITE_LOW bytes wait to be written: the server sends one at a time
  tunnel_ack {tunnel, bytes}       -> {}   the server consumed `bytes` more of the pushed data
  tunnel_close {tunnel}            -> {}   close the socket (idempotent)
  push {"type": "tunnel_data", "tunnel", "data_b64"}   what the socket sent, at most CHUNK bytes
  push {"type": "tunnel_end", "tunnel"}                the socket closed (or failed); nothing follows

Back-pressure: the daemon stops reading a socket while more than WINDOW pushed bytes are not
acknowledged (or its connection's output buffer is over PAUSE_AT), so the socket's own buffers
hold the sandbox's server back; the server checks the window (a daemon past it is lying).
A tunnel belongs to the connection that opened it and ends with it.
"""

from __future__ import annotations

import _socket
import binascii
import errno
import os

from executor_core import IN, LOOP, OUT, RequestError, Task, arg

TYPE_CHECKING = False
if TYPE_CHECKING:
    from executor import Connection
    from executor_core import Message, Steps

PORTS_MAX = 512
CHUNK = 128 * 1024
READ_MAX = 512 * 1024
WINDOW = 2 * 1024 * 1024
WRITE_LOW = 256 * 1024
PAUSE_AT = 256 * 1024
MAX_TUNNELS = 512
CONNECT_TIMEOUT = 5.0
LISTEN = b"0A"


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
            if port in by_port and by_port[port][0] in ("0.0.0.0", "::"):
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


class Tunnel:
    """One TCP connection inside the sandbox, its bytes pushed to the server's connection."""

    def __init__(self, conn: Connection, tid: int, owner: Tunnels) -> None:
        self.conn, self.tid, self.owner = conn, tid, owner
        self.sock: _socket.socket | None = None
        self.pending = bytearray()
        self.sent = self.acked = 0
        self.error = ""
        self.connected = self.closed = self.eof = self.paused = False

    def connect(self, port: int) -> Steps:
        for host, family in (("127.0.0.1", _socket.AF_INET), ("::1", _socket.AF_INET6)):
            try:
                sock = _socket.socket(family, _socket.SOCK_STREAM)
            except OSError as exc:  # no IPv6 in this sandbox
                self.error = exc.strerror or str(exc)
                break
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            if code in (0, errno.EINPROGRESS):
                self.sock, self.error = sock, ""
                LOOP.watch(sock.fileno(), self.on_connect, OUT)
                yield lambda: self.connected or bool(self.error) or self.closed, CONNECT_TIMEOUT
                if self.connected:
                    return {}
                if not self.error:
                    self.error = "timed out"
                LOOP.unwatch(sock.fileno())
                self.sock = None
            else:
                self.error = os.strerror(code)
            sock.close()
            if self.error != os.strerror(errno.ECONNREFUSED):
                break
        self.owner.forget(self)
        raise RequestError("refused", f"cannot connect to port {port} in the sandbox: {self.error}")

    def on_connect(self, events: int) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if code:
            self.error = os.strerror(code)
            return
        self.connected = True
        self.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        self.watch()

    def watch(self) -> None:
        if self.sock is None or self.closed:
            return
        mask = (0 if self.eof or self.paused else IN) | (OUT if self.pending else 0)
        if mask:
            LOOP.watch(self.sock.fileno(), self.on_event, mask)
        else:
            LOOP.unwatch(self.sock.fileno())

    def on_event(self, events: int) -> None:
        if events & OUT and self.pending:
            self.write(b"")
        if events & ~OUT and not (self.eof or self.paused or self.closed):
            self.read()

    def read(self) -> None:
        """Push what the socket holds, READ_MAX at most per wake-up, in chunks of at most CHUNK."""
        assert self.sock is not None
        head = b'{"type":"tunnel_data","tunnel":%d,"data_b64":"' % self.tid
        for _ in range(READ_MAX // CHUNK):
            room = WINDOW - (self.sent - self.acked)
            if room <= 0:
                break
            try:
                # Never more than the window left: a read of a whole chunk could overrun it.
                data = self.sock.recv(min(CHUNK, room))
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                self.conn.send({"type": "tunnel_end", "tunnel": self.tid})
                self.watch()
                return
            self.sent += len(data)
            # Base64 needs no JSON escaping: the line is built as bytes, sparing a copy or two.
            self.conn.outbuf += head + binascii.b2a_base64(data, newline=False) + b'"}\n'
            full = self.sent - self.acked >= WINDOW or len(self.conn.outbuf) > PAUSE_AT
            if full or len(data) < min(CHUNK, room):
                break
        self.conn.flush()
        if self.sent - self.acked >= WINDOW or len(self.conn.outbuf) > PAUSE_AT:
            self.paused = True
            self.watch()
            Task(None, None, "tunnel-resume", self.resume())

    def resume(self) -> Steps:
        def ready() -> bool:
            return self.closed or (self.sent - self.acked < WINDOW and len(self.conn.outbuf) <= PAUSE_AT)

        yield ready, None
        self.paused = False
        self.watch()
        return {}

    def write(self, data: bytes) -> None:
        self.pending += data
        if self.sock is None or self.closed:
            self.pending.clear()
            return
        try:
            del self.pending[: self.sock.send(self.pending)]
        except BlockingIOError:
            pass
        except OSError:  # the peer went away: its end comes through the read side
            self.pending.clear()
        self.watch()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.sock is not None:
                LOOP.unwatch(self.sock.fileno())
                self.sock.close()
            self.owner.forget(self)


class Tunnels:
    """The daemon's open tunnels, by (connection, tunnel id); `handle` carries out the requests."""

    def __init__(self) -> None:
        self.open: dict[tuple[int, int], Tunnel] = {}

    def forget(self, tunnel: Tunnel) -> None:
        self.open.pop((id(tunnel.conn), tunnel.tid), None)

    def drop(self, conn: Connection) -> None:
        for tunnel in [t for t in self.open.values() if t.conn is conn]:
            tunnel.close()

    def handle(self, op: str, req: Message, conn: Connection) -> Message | Steps:
        tid = arg(req, "tunnel", int)
        key = (id(conn), tid)
        if op == "tunnel_open":
            port = arg(req, "port", int)
            if not 1 <= port <= 65535:
                raise RequestError("bad_request", "port must be within 1..65535")
            if key in self.open:
                raise RequestError("bad_request", f"tunnel {tid} is already open")
            if len(self.open) >= MAX_TUNNELS:
                raise RequestError("bad_request", f"at most {MAX_TUNNELS} tunnels per sandbox")
            opened = self.open[key] = Tunnel(conn, tid, self)
            return opened.connect(port)
        tunnel = self.open.get(key)
        if op == "tunnel_close":
            if tunnel is not None:
                tunnel.close()
            return {}
        if tunnel is None:
            raise RequestError("not_found", "no such tunnel")
        if op == "tunnel_ack":
            count = arg(req, "bytes", int)
            tunnel.acked = min(tunnel.sent, tunnel.acked + max(count, 0))
            return {}
        if op == "tunnel_data":
            data: str = arg(req, "data_b64", str)
            if len(data) > (CHUNK + 2) // 3 * 4:
                raise RequestError("bad_request", f"tunnel_data carries at most {CHUNK} bytes")
            try:
                tunnel.write(binascii.a2b_base64(data))
            except binascii.Error:
                raise RequestError("bad_request", "data_b64 is not base64") from None
            return _drained(tunnel)
        raise RequestError("bad_request", f"unknown op {op!r}")


def _drained(tunnel: Tunnel) -> Steps:
    yield lambda: len(tunnel.pending) < WRITE_LOW or tunnel.closed, None
    return {}
