"""Servers started in the sandbox for preview tests, and waiting for their ports."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.support.server import RunningServer

WAIT = 30.0

APP = r"""
import http.server, os, sys

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def reply(self, status, body, ctype="text/plain", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/big/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            while size > 0:
                self.wfile.write(block[: min(size, len(block))])
                size -= len(block)
            return
        if self.path == "/hang":
            import time
            time.sleep(3600)
        if self.path == "/garbage":
            self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True
            return
        seen = "\n".join(f"{k.lower()}: {v}" for k, v in self.headers.items())
        self.reply(200, f"hello from the sandbox\npath={self.path}\n{seen}\n".encode(),
                   extra=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"),
                          ("Connection", "keep-alive, X-Secret"), ("X-Secret", "hop")])

    def do_POST(self):
        import hashlib
        digest, count = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (n := int(self.rfile.readline().split(b";")[0], 16)):
                data = self.rfile.read(n)
                self.rfile.readline()
                digest.update(data)
                count += len(data)
            self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            digest.update(data)
            count = len(data)
        self.reply(201, f"got {count} {digest.hexdigest()}".encode())

    do_HEAD = do_GET

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # Werkzeug's (Flask's dev server); socketserver's 5 drops 100 clients' SYNs

Server(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""

WS_ECHO = r"""
import base64, hashlib, socket, struct, sys, threading

def recv_exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b

def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    lines = head.decode().split("\r\n")
    hdr = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    magic = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    acc = base64.b64encode(hashlib.sha1((hdr["sec-websocket-key"] + magic).encode()).digest())
    extra = ""
    if "sec-websocket-protocol" in hdr:
        extra = "Sec-WebSocket-Protocol: " + hdr["sec-websocket-protocol"].split(",")[0].strip() + "\r\n"
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: " + acc + b"\r\n" + extra.encode() + b"\r\n")
    hello = ("path " + lines[0].split()[1]).encode()
    c.sendall(b"\x81" + bytes([len(hello)]) + hello)
    try:
        while True:
            b0, b1 = recv_exact(c, 2)
            op, n = b0 & 15, b1 & 127
            if n == 126:
                n = struct.unpack(">H", recv_exact(c, 2))[0]
            elif n == 127:
                n = struct.unpack(">Q", recv_exact(c, 8))[0]
            mask = recv_exact(c, 4)
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(recv_exact(c, n)))
            if op == 8:
                c.sendall(b"\x88\x02\x03\xe8")
                return
            if op in (1, 2):
                out = b"echo:" + data
                ln = len(out)
                if ln < 126:
                    size = bytes([ln])
                elif ln < 65536:
                    size = b"\x7e" + struct.pack(">H", ln)
                else:
                    size = b"\x7f" + struct.pack(">Q", ln)
                h = bytes([0x80 | op]) + size
                c.sendall(h + out)
    except EOFError:
        pass
    finally:
        c.close()

s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


async def write_file(server: RunningServer, sid: str, path: str, content: str) -> None:
    response = await server.client.post(
        f"/api/sessions/{sid}/files/content", json={"path": path, "content": content}
    )
    assert response.status_code < 300, response.text


async def start(server: RunningServer, sid: str, cmd: str) -> int:
    response = await server.client.post(f"/api/sessions/{sid}/processes", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    pid: int = response.json()["pid"]
    return pid


async def wait_port(server: RunningServer, sid: str, port: int) -> dict[str, Any]:
    """The listing's entry for `port`, once something listens there (asks until then)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        response = await server.client.get(f"/api/sessions/{sid}/ports")
        assert response.status_code == 200, response.text
        for entry in response.json()["ports"]:
            if entry["port"] == port:
                return dict(entry)
        await asyncio.sleep(0.05)  # polling a condition with a deadline, not a sleep to synchronise
    raise AssertionError(f"nothing listened on {port} within {WAIT} s")


async def serve_app(server: RunningServer, sid: str, port: int = 8000) -> int:
    await write_file(server, sid, "app.py", APP)
    pid = await start(server, sid, f"python3 app.py {port}")
    await wait_port(server, sid, port)
    return pid
