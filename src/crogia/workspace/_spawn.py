"""A started rg process: stdout read without blocking the loop, killed on close.

rg is started with `subprocess.Popen` on a short-lived thread of its own (see
`ripgrep.py` for why) rather than with `asyncio.create_subprocess_exec`; this module
gives the result the same non-blocking behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import IO

import anyio.to_thread

CHUNK = 1 << 18
SMALL = 1 << 14
BATCH_PAUSE = 0.002


class RgProcess:
    """Owns the rg process and its pipes until `aclose()` (or the sync context manager) ends."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        self._proc = proc
        self._stderr = stderr

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """rg's stdout in chunks until EOF."""
        assert self._proc.stdout is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), self._proc.stdout
        )
        try:
            while chunk := await reader.read(CHUNK):
                yield chunk
                if len(chunk) < SMALL:
                    # rg writes once per matching file; waking for each small write costs
                    # more CPU (taken from rg) than the pause costs in latency.
                    transport.pause_reading()
                    await asyncio.sleep(BATCH_PAUSE)
                    transport.resume_reading()
        finally:
            transport.close()

    async def finish(self) -> tuple[int, str]:
        """Wait for rg to exit; return its exit code and what it wrote to stderr."""
        return await anyio.to_thread.run_sync(self._finish_sync)

    def _finish_sync(self) -> tuple[int, str]:
        code = self._proc.wait()
        self._stderr.seek(0)
        return code, self._stderr.read(8192).decode("utf-8", "replace")

    async def aclose(self) -> None:
        """Kill rg's process group if it still runs, reap it and close the files."""
        if self._proc.returncode is None:
            self._kill()
            await anyio.to_thread.run_sync(self.close_sync)
        else:
            self.close_sync()  # already reaped: only closing files is left

    def _kill(self) -> None:
        # returncode is None until we reap it, so the pid cannot have been reused yet.
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def close_sync(self) -> None:
        """Blocking form of `aclose()`."""
        self._kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def wait_sync(self) -> int:
        """Drain stdout and wait (blocking; for short runs such as `--version`)."""
        self._proc.communicate()
        return self._proc.returncode

    def __enter__(self) -> RgProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_sync()


async def spawn_in_fresh_thread(start: Callable[[], RgProcess]) -> RgProcess:
    """Run `start` on a new thread; if the caller is cancelled meanwhile, rg is killed."""
    future: concurrent.futures.Future[RgProcess] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return  # cancelled before the thread ran: start nothing
        try:
            future.set_result(start())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="crogia-rg-spawn", daemon=True).start()
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        # The start may be under way on its thread: wait for it, then kill and reap what it
        # started, so that rg is gone when the cancel returns (a second cancel does not cut it short).
        reaping = asyncio.ensure_future(asyncio.to_thread(_close_started, future))
        while not reaping.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(reaping)
        reaping.result()
        raise


def _close_started(future: concurrent.futures.Future[RgProcess]) -> None:
    """Blocking: once the start is over, kill and reap the rg it started (if it got that far)."""
    try:
        process = future.result()  # waits for the start to end
    except (concurrent.futures.CancelledError, Exception):
        return  # cancelled before it ran, or it failed: nothing was left running
    process.close_sync()
