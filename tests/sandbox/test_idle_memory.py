"""An idle session costs little resident memory: the channel's read buffers are mapped, not zeroed.

A `bytearray(1 MiB)` is written (zeroed) at once, so every channel's reader on the server and every
daemon's tunnel buffer held 1 MiB resident from the start, used or not (bench_memory: 8.8 MB per
idle Docker session against a target of 8). Both are anonymous mappings now, resident only once
written: writing a byte into each of their pages must make them resident then, not before.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

from crogia.sandbox.channel import WireReader
from crogia.sandbox.executor import DAEMON_DIR


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def touched(buf: Any) -> int:
    """KiB that became resident when one byte of every page of `buf` was written."""
    before = rss()
    for at in range(0, len(buf), 4096):
        buf[at] = 1
    return rss() - before


def test_an_idle_channel_reader_is_not_resident() -> None:
    reader = WireReader()
    size = len(reader._buf)
    assert touched(reader._buf) > (size >> 10) * 3 // 4  # its pages came only now


def test_the_daemons_tunnel_buffer_is_not_resident_until_used() -> None:
    measure = inspect.getsource(rss) + inspect.getsource(touched)
    probe = f"from typing import Any\nimport sys\nsys.path[0] = sys.argv[1]\n{measure}\nimport executor_net\n"
    probe += "print(len(executor_net.RECV_BUFFER) >> 10, touched(executor_net.RECV_BUFFER))\n"
    done = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(DAEMON_DIR)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    size, grown = map(int, done.stdout.split())
    assert grown > size * 3 // 4, f"only {grown} of {size} KiB came when written: it was resident already"
