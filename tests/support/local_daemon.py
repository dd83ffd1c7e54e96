"""The real executor daemon run on the host with `--workspace FOLDER`, for `DaemonFiles` tests.

The same daemon code a sandbox runs (`python3 -S`, its own folder on sys.path), reached through a
`PairChannel` and an `ExecutorClient` exactly as a bubblewrap sandbox is, so the `fs_*` ops and the
server's checks of their replies are tested without the cost of a sandbox per test. The suites that
need a real sandbox (the API suite) run on both backends with SANDBOX_FILES=daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from crogia.sandbox.channel import PairChannel
from crogia.sandbox.daemon_files import DaemonFiles
from crogia.sandbox.executor import DAEMON_DIR
from crogia.sandbox.executor_client import ExecutorClient

_BOOT = "import sys; sys.path[0] = sys.argv.pop(1); import executor; executor.main()"


class LocalDaemon:
    """Stands in for an `ExecutorSandbox`: `request()` goes to the daemon over its channel."""

    def __init__(self, client: ExecutorClient, process: asyncio.subprocess.Process) -> None:
        self.client = client
        self.process = process

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.client.request(op, **args)

    async def open_stream(self, op: str, **args: Any) -> tuple[Any, Any]:
        return await self.client.open_stream(op, **args)


@contextlib.asynccontextmanager
async def local_daemon(root: Path, log_dir: Path) -> AsyncIterator[LocalDaemon]:
    channel = PairChannel()
    fd = channel.daemon_fd()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', os.defpath)}"}
    argv = [sys.executable, "-S", "-c", _BOOT, str(DAEMON_DIR), "--fd", str(fd)]
    argv += ["--workspace", str(root), "--log-dir", str(log_dir)]
    process = await asyncio.create_subprocess_exec(
        *argv, pass_fds=(fd,), env=env, stderr=asyncio.subprocess.DEVNULL
    )
    channel.spawned()
    try:
        client = ExecutorClient(await channel.connect(15.0))
        try:
            yield LocalDaemon(client, process)
        finally:
            await client.close()
    finally:
        await channel.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def byte_source(data: bytes) -> tuple[asyncio.Server, int]:
    """A TCP server on 127.0.0.1 that sends `data` to a client once it has sent a byte; and its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.write(data)
        await writer.drain()
        writer.close()

    source = await asyncio.start_server(serve, "127.0.0.1", 0)
    return source, source.sockets[0].getsockname()[1]


def pipes(pid: int) -> int:
    """Pipe fds process `pid` holds (the tunnel tests' check that pipes go with their tunnel)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:  # closed while we looked
            continue
    return count


def daemon_files(daemon: LocalDaemon, **limits: Any) -> DaemonFiles:
    return DaemonFiles(lambda: daemon, **limits)  # type: ignore[arg-type, return-value]
