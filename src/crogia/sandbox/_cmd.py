"""Host command helpers for the image build: stream output, kill the whole group on cancel.

Every command runs through `asyncio.create_subprocess_exec` in its own session, so a
cancelled build takes its `docker build` or `debootstrap` (and their children) down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable

from crogia.errors import SandboxError, Unavailable

Progress = Callable[[str], None]


async def _spawn(argv: tuple[str, ...], **kwargs: object) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(*argv, start_new_session=True, **kwargs)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise Unavailable(f"`{argv[0]}` is not installed on this host", command=argv[0]) from exc


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the process group (if still alive) and wait, so nothing outlives a cancelled build."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def capture(*argv: str, limit: float = 60.0) -> tuple[int, str, str]:
    """Run a short command; return (exit code, stdout, stderr). Passing `limit` seconds counts as exit 124."""
    proc = await _spawn(argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        return 124, "", f"timed out after {limit:.0f} s"
    finally:
        await _reap(proc)
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _pump(proc: asyncio.subprocess.Process, progress: Progress, tail: deque[str]) -> None:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if line:
            tail.append(line)
            progress(line)


async def stream(*argv: str, progress: Progress, stdin: int | None = None, what: str = "") -> None:
    """Run a command, passing each output line to `progress`; raise `SandboxError` on failure."""
    tail: deque[str] = deque(maxlen=15)
    proc = await _spawn(argv, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await _pump(proc, progress, tail)
        await proc.wait()
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        raise SandboxError(
            f"{what or argv[0]} failed with exit code {proc.returncode}:\n" + "\n".join(tail),
            command=argv[0],
            exit_code=proc.returncode,
        )


async def pipe(source: tuple[str, ...], sink: tuple[str, ...], *, progress: Progress, what: str) -> None:
    """Run `source | sink` without a shell; the sink's output goes to `progress`."""
    read_fd, write_fd = os.pipe()
    try:
        producer = await _spawn(source, stdout=write_fd)
    finally:
        os.close(write_fd)
    try:
        await stream(*sink, progress=progress, stdin=read_fd, what=what)
        await producer.wait()
    finally:
        os.close(read_fd)
        await _reap(producer)
    if producer.returncode != 0:
        raise SandboxError(f"{source[0]} failed with exit code {producer.returncode}", command=source[0])
