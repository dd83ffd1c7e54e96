"""The floor of a relayed download on this host: a sender, `hops` splice relays, a receiver.

Every part is a process of its own on loopback TCP, with nothing else in the path: the sender
writes 64 KiB at a time, each relay moves bytes with blocking `splice` through one 1 MiB pipe
(no framing, no event loop), and the receiver reads 64 KiB at a time. `bench_preview` prints
the two-relay rate beside the preview proxy (whose two relays are the sandbox's daemon and the
server), so the gap between the proxy and direct splits into what two hops cost at the least
and what ours cost beyond that.

Usage: `python bench/_splice_floor.py ROUNDS SIZE` -> one JSON line: {"0": [MB/s, ...], "1": ..., "2": ...}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable

from crogia.sandbox.daemon.executor_proto import FRAME_MAX as PIPE  # the pipe size ours use
from crogia.sandbox.frame_pipe import F_SETPIPE_SZ

CHUNK = 1 << 16


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock


def send(listening: socket.socket, size: int) -> None:
    conn, _ = listening.accept()
    data = memoryview(os.urandom(CHUNK))  # (a slice of bytes would copy them for each send)
    left = size
    while left > 0:
        conn.sendall(data[: min(left, CHUNK)])
        left -= CHUNK
    conn.close()


def relay(listening: socket.socket, upstream: int) -> None:
    conn, _ = listening.accept()
    source = socket.create_connection(("127.0.0.1", upstream))
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # over pipe-max-size: the default pipe
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE)
    while n := os.splice(source.fileno(), write_end, PIPE):
        while n:
            n -= os.splice(read_end, conn.fileno(), n)
    conn.close()


def receive(port: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(CHUNK)
    got = 0
    start = time.perf_counter()
    while n := sock.recv_into(buf):
        got += n
    sock.close()
    return got / (time.perf_counter() - start)


def child(work: Callable[[], None]) -> None:
    """Run `work()` in a forked child, which then exits at once."""
    if os.fork() == 0:
        try:
            work()
        finally:
            os._exit(0)


def once(hops: int, size: int) -> float:
    first = listener()
    port = first.getsockname()[1]
    child(lambda: send(first, size))
    opened = [first]
    for _ in range(hops):
        nxt = listener()
        child(lambda upstream=port, sock=nxt: relay(sock, upstream))
        opened.append(nxt)
        port = nxt.getsockname()[1]
    try:
        return receive(port)
    finally:
        for sock in opened:
            sock.close()
        for _ in opened:
            os.wait()


def main() -> None:
    rounds, size = int(sys.argv[1]), int(sys.argv[2])
    rates: dict[str, list[float]] = {"0": [], "1": [], "2": []}
    for _ in range(rounds):  # alternating, as the preview bench does
        for hops in (0, 1, 2):
            rates[str(hops)].append(once(hops, size))
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
