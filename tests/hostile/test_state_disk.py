"""Item 5 of issue 10: what a sandbox can make grow is inside a size limit, never on the host disk.

Through a real server on both backends: a background process prints 400 MB and a command fills
the state folder; the host's data folder barely grows, the log keeps its newest lines (each log
capped), and once the sandbox has stopped, asking for that log is a clear 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from tests.conftest import make_settings
from tests.hostile.support import new_session, shell
from tests.hostile.test_channel import sleep_and_wake
from tests.support.server import run_server

STATE_MB = 16


def disk_used(folder: Path) -> int:
    """Bytes the folder's files take on disk (blocks, not sizes)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


async def test_logs_and_state_stay_off_the_host_disk(backend: str, data_dir: Path) -> None:
    settings = make_settings(data_dir, backend, sandbox_state_mb=STATE_MB)
    async with run_server(settings) as server:
        client = server.client
        sid = await new_session(client)
        before = await asyncio.to_thread(disk_used, data_dir)
        cmd = "head -c 400000000 /dev/zero | tr '\\0' x; echo; echo last-line"
        started = await client.post(f"/api/sessions/{sid}/processes", json={"cmd": cmd})
        assert started.status_code == 200, started.text
        pid = started.json()["pid"]
        fill = "dd if=/dev/zero of=/run/crogia/fill bs=1M count=200 2>&1"
        assert "No space left" in (await shell(client, sid, fill))["output"]
        await shell(client, sid, "rm /run/crogia/fill")
        for _ in range(600):  # until the process has ended (the server records its exit)
            rows = (await client.get(f"/api/sessions/{sid}/processes")).json()
            if next(row for row in rows if row["pid"] == pid)["status"] != "running":
                break
            await asyncio.sleep(0.1)
        logs = await client.get(f"/api/sessions/{sid}/processes/{pid}/logs", params={"lines": 1})
        assert logs.status_code == 200 and logs.json()["logs"].endswith("last-line\n"), logs.text[:300]
        size = (await shell(client, sid, "du -sb /run/crogia/logs | cut -f1"))["output"]
        assert int(size) <= STATE_MB * 1024 * 1024 // 8 + 65536, "one process's log passed its cap"
        grown = await asyncio.to_thread(disk_used, data_dir) - before
        assert grown < 32 * 1024 * 1024, f"the host disk grew by {grown} bytes"
        await sleep_and_wake(server, sid)
        gone = await client.get(f"/api/sessions/{sid}/processes/{pid}/logs")
        assert gone.status_code == 404, gone.text
        assert "logs live in the sandbox" in gone.json()["detail"]
