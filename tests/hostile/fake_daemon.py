"""A misbehaving executor daemon, run inside a real sandbox in place of the real one (tests only).

It speaks just enough of the protocol to be believed (the hello, and `ping`/`list`), then answers
`exec` and `spawn` the way its MODE says. It understands every channel the server has used:
`--fd N` (an inherited socketpair), `--dial PATH --secret-file PATH`, and an older server's
`--socket PATH` (it listens there), so the same attacks run against today's and earlier code.
Standard library only: it runs on the sandbox image's Python.
"""

import contextlib
import json
import os
import socket
import sys

MODE = "MODE_HERE"


def connect(argv):
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    if "--fd" in opts:
        return socket.socket(fileno=int(opts["--fd"])), ""
    if "--dial" in opts:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(opts["--dial"])
        with open(opts["--secret-file"]) as f:
            return sock, f.read().strip()
    path = opts["--socket"]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    return listener.accept()[0], None


def reply(rid, **values):
    return (json.dumps({"type": "result", "id": rid, "ok": True, **values}) + "\n").encode()


def misbehave(sock, rid, op):
    if op == "spawn":
        pid = 2**80 if MODE == "hugeint" else 4242
        return sock.sendall(reply(rid, pid=pid, log="/run/crogia/logs/x.log"))
    if MODE == "big":
        sock.sendall(reply(rid, exit_code=0, output="x" * (60 << 20), timed_out=False, truncated=False))
    elif MODE == "nonobject":
        sock.sendall(b"[1, 2]\n")
    elif MODE == "types":
        sock.sendall(reply(rid, exit_code="abc", output="", timed_out=False, truncated=False))
    elif MODE == "hugeint":
        sock.sendall(reply(rid, exit_code=2**80, output="", timed_out=False, truncated=False))
    elif MODE == "garbage":
        sock.sendall(b"\xff\xfe\x00\x01garbage\x80\n")
    elif MODE == "endless":
        chunk = b"x" * 65536
        while True:  # a line that never ends, until the server hangs up
            sock.sendall(chunk)
    elif MODE == "flood":
        notice = b"".join(b'{"type":"exit","pid":%d,"exit_code":0}\n' % (i % 4000 + 1) for i in range(1000))
        for _ in range(300):  # 300,000 exit notices
            sock.sendall(notice)
        sock.sendall(reply(rid, exit_code=0, output="after the flood\n", timed_out=False, truncated=False))


def frame(stream, data, length=None):
    """A binary frame (protocol 4): 0x00, stream id, length, bytes."""
    size = len(data) if length is None else length
    return b"\x00" + stream.to_bytes(4, "big") + size.to_bytes(4, "big") + data


def lie_about_tunnels(sock, msg):
    """`tunnel_open` believed, then frames no honest daemon sends (the tunnel modes)."""
    rid = msg.get("id")
    if msg.get("op") == "ports" and MODE == "ports_silent":  # never answers, the channel open
        return None
    if msg.get("op") == "ports":
        entry = {"port": 70000 if MODE == "ports_range" else 80, "address": "0.0.0.0", "pid": None}
        return sock.sendall(reply(rid, ports=[entry] * (1 if MODE == "ports_range" else 100_000)))
    if msg.get("op") == "tunnel_handoff":
        return (
            hand_over_a_lie(sock, rid, msg.get("port"))
            if MODE.startswith("tunnel_handoff_")
            else (
                sock.sendall(failed(rid, "bad_request", "unknown op 'tunnel_handoff'"))  # frames, then
            )
        )
    if msg.get("op") != "tunnel_open":
        return sock.sendall(reply(rid))
    sock.sendall(reply(rid))
    if MODE == "tunnel_big":  # a frame over FRAME_MAX (1 MiB)
        sock.sendall(frame(rid, b"H" * 1_100_000))
    elif MODE == "tunnel_after_end":
        sock.sendall(frame(rid, b"HTTP/1.1 200 OK\r\n") + frame(rid, b"") + frame(rid, b"more"))
    elif MODE == "tunnel_deaf":  # never reads its channel again: the server's writes back up
        __import__("time").sleep(3600)
    elif MODE == "tunnel_flood":  # an honest head, then 64 MiB never waiting for credit
        sock.sendall(frame(rid, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20)))
        block = frame(rid, b"H" * 65536)
        for _ in range(1024):
            sock.sendall(block)


def failed(rid, code, error):
    return (
        json.dumps({"type": "result", "id": rid, "ok": False, "code": code, "error": error}) + "\n"
    ).encode()


HELD = []  # what this daemon handed over stays open here too (a duplicate, as a liar may keep)


def hand_over_a_lie(sock, rid, port):
    """`tunnel_handoff` answered with something that is not a socket connected to that port."""
    kind = MODE.removeprefix("tunnel_handoff_")
    if kind == "none":  # the reply says a socket came: none did
        return sock.sendall(reply(rid, handoff=True, local=40000))
    if kind == "pipe":
        handed, other = os.pipe()
        HELD.append(other)
    elif kind == "unix":
        handed_sock, other_sock = socket.socketpair()
        handed, other = handed_sock.detach(), other_sock
        HELD.append(other)
    elif kind == "listener":  # a TCP socket on that very port, but listening, not connected
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        HELD.append(listener)
        handed = listener.fileno()
    else:  # "elsewhere": connected, but to another port than the one asked for
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        HELD.extend([listener, client])
        handed = client.fileno()
    local = 40000 if kind in ("pipe", "unix") else socket.socket(fileno=os.dup(handed)).getsockname()[1]
    sock.sendmsg(
        [reply(rid, handoff=True, local=local)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, handed.to_bytes(4, sys.byteorder))],
    )


def messages(sock):
    """The JSON lines the server sends, skipping its binary frames (protocol 4)."""
    buf = b""
    while True:
        while buf[:1] == b"\x00" and len(buf) >= 9:
            end = 9 + int.from_bytes(buf[5:9], "big")
            if len(buf) < end:
                break
            buf = buf[end:]
        line, newline, rest = buf.partition(b"\n")
        if newline and not buf.startswith(b"\x00"):
            buf = rest
            yield json.loads(line)
            continue
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data


def entry(**over):
    return {"name": "a", "path": "a", "type": "file", "size": 1, "mtime": 1.0, **over}


def misbehave_fs(sock, rid, op):
    """The `fs_*` ops (SANDBOX_FILES=daemon) answered wrongly, by MODE."""
    send = sock.sendall
    if MODE == "fs_types":
        send(reply(rid, entries=[entry(size="abc")], truncated=False))
    elif MODE == "fs_nul":
        send(reply(rid, entries=[entry(name="a\x00b", path="a\x00b")], truncated=False))
    elif MODE == "fs_escape":
        send(reply(rid, entries=[entry(name="passwd", path="../../etc/passwd")], truncated=False))
    elif MODE == "fs_nan":
        send(b'{"type":"result","id":%d,"ok":true,"truncated":false,"entries":[{"name":"a","path":"a",'
             b'"type":"file","size":1,"mtime":NaN}]}\n' % rid)  # fmt: skip
    elif MODE == "fs_many":  # more entries than the server's cap (10,000)
        many = [entry(name=f"f{i}", path=f"f{i}") for i in range(10_050)]
        send(reply(rid, entries=many, truncated=False))
    elif MODE == "fs_huge":  # a listing line past every bound
        send(reply(rid, entries=[entry(name="x" * 1000, path="x" * 1000)] * 60_000, truncated=False))
    elif MODE == "fs_rg_endless":  # a search record that never ends
        send(b'{"type":"chunk","id":%d,"data":"D"}\n' % rid)
        chunk = b'{"type":"chunk","id":%d,"data":"%s"}\n' % (rid, b"y" * 60000)
        for _ in range(2000):  # 120 MB without a NUL
            send(chunk)
        send(reply(rid, exit_code=0, stderr=""))
    elif MODE == "fs_rg_context":  # context lines without end (not one a match)
        send(b'{"type":"chunk","id":%d,"data":"D"}\n' % rid)
        lines = "".join(f"f\\u0000{i}-ctx\\n" for i in range(1, 2001))
        chunk = b'{"type":"chunk","id":%d,"data":"%s"}\n' % (rid, lines.encode())
        for _ in range(500):
            send(chunk)
        send(reply(rid, exit_code=0, stderr=""))
    elif MODE == "fs_silent":  # never answers a file op (its connection stays open)
        return
    elif MODE == "fs_stall":  # a read opened, a few of its bytes, then nothing; other ops answered
        if op != "fs_read":
            return send(reply(rid, entries=[], truncated=False) if op == "fs_list" else reply(rid))
        send(reply(rid, size=100) + frame(rid, b"abcde"))
    elif MODE == "fs_overrun":  # frames far past the 4 MiB window, credit or not
        send(reply(rid, size=5))
        block = frame(rid, b"z" * (256 * 1024))
        for _ in range(40):
            send(block)
    else:
        send(reply(rid))


def main():
    sock, secret = connect(sys.argv[1:])
    if secret is not None:
        sys.path.insert(0, "/opt/crogia")
        import executor_proto

        sock.sendall((json.dumps(executor_proto.hello(secret, os.getpid())) + "\n").encode())
    for msg in messages(sock):
        rid, op = msg.get("id"), msg.get("op")
        if MODE.startswith(("tunnel_", "ports_")) and op not in ("ping", "list", "exec", "spawn"):
            lie_about_tunnels(sock, msg)
        elif op in ("exec", "spawn"):
            misbehave(sock, rid, op)
        elif isinstance(op, str) and op.startswith("fs_"):
            misbehave_fs(sock, rid, op)
        elif op == "ping":
            sock.sendall(reply(rid, version=1, pid=os.getpid()))
        elif op == "list":
            sock.sendall(reply(rid, processes=[]))
        elif rid is not None:
            sock.sendall(reply(rid))


with contextlib.suppress(BrokenPipeError, ConnectionResetError):
    main()
