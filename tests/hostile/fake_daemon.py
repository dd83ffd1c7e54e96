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
    elif MODE == "fs_overrun":  # frames far past the 4 MiB window, credit or not
        send(reply(rid, size=5))
        frame = b"\0" + rid.to_bytes(4, "big") + (256 * 1024).to_bytes(4, "big") + b"z" * (256 * 1024)
        for _ in range(40):
            send(frame)
    else:
        send(reply(rid))


def main():
    sock, secret = connect(sys.argv[1:])
    if secret is not None:
        sys.path.insert(0, "/opt/crogia")
        import executor_proto

        sock.sendall((json.dumps(executor_proto.hello(secret, os.getpid())) + "\n").encode())
    for line in sock.makefile("rb"):
        msg = json.loads(line)
        rid, op = msg.get("id"), msg.get("op")
        if op in ("exec", "spawn"):
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
