"""Ops that exercise the daemon's byte streams, installed into a real daemon by tests only.

`install(executor)` adds them to its `OPS`: `source` sends `size` bytes then its end, honouring
credit; `sink` takes bytes until the server's end, consuming them only once `hold` is off;
`counters` says what each has done so far; `overrun` ignores credit (a hostile daemon).
Standard library only, like the daemon.
"""

import hashlib

FRAME_MAX = 256 * 1024
COUNTERS = {"sent": 0, "received": 0}
HOLD = {"on": False}


def source(d, req, conn, rid):
    size, sent = req["size"], 0
    stream = conn.accept_stream(rid)
    while sent < size:
        yield (lambda: conn.credit_left(rid) > 0 or stream.reset or not conn.open), None
        if stream.reset or not conn.open:
            return {"sent": sent}
        n = min(size - sent, conn.credit_left(rid), FRAME_MAX)
        conn.send_frame(rid, b"x" * n)
        sent += n
        COUNTERS["sent"] += n
    conn.end_stream(rid)
    conn.drop_stream(rid)
    return {"sent": sent}


def sink(d, req, conn, rid):
    stream = conn.accept_stream(rid)
    digest, total = hashlib.sha256(), 0
    while True:
        yield (lambda: (stream.buf and not HOLD["on"]) or stream.ended or stream.reset), None
        if stream.reset:
            return {"received": total, "sha256": ""}
        if stream.buf and not HOLD["on"]:
            data = bytes(stream.buf)
            del stream.buf[:]
            digest.update(data)
            total += len(data)
            COUNTERS["received"] += len(data)
            conn.consumed(rid, len(data))
        elif stream.ended:
            break
    conn.end_stream(rid)
    conn.drop_stream(rid)
    return {"received": total, "sha256": digest.hexdigest()}


def counters(d, req, conn, rid):
    if "hold" in req:
        HOLD["on"] = bool(req["hold"])
    return dict(COUNTERS, buffered=sum(len(s.buf) for s in conn.streams.values()))


def overrun(d, req, conn, rid):
    for _ in range(20):  # 5 MiB past a 4 MiB window, credit or not
        conn.outbuf += b"\0" + rid.to_bytes(4, "big") + FRAME_MAX.to_bytes(4, "big") + b"y" * FRAME_MAX
    conn.flush()
    yield None, 30
    return {}


def install(executor):
    for name in ("source", "sink", "counters", "overrun"):
        op = globals()[name]
        executor.OPS[name] = lambda d, req, conn, rid, op=op: op(d, req, conn, rid)
