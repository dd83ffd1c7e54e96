"""A graceful stop on SIGTERM / SIGINT: drain the runtime before the server drops connections.

uvicorn answers the signal by closing every WebSocket with 1012 and only then runs the lifespan
shutdown, so clients would lose the events of the tasks it cancels and never learn why. While the
app runs, its handler goes first: `Runtime.drain` cancels the tasks, stores and delivers their
events and closes each stream with 1001 and a reason; then the server's own handler runs as usual.
A second signal goes straight to the server's handler (uvicorn: exit at once).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from crogia.runtime import Runtime

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_TIMEOUT = 8.0
"""Seconds the drain may take before the server shuts down anyway."""

_Handler = Callable[[int, FrameType | None], Any] | int | None


@asynccontextmanager
async def drain_on_signal(runtime: Runtime) -> AsyncIterator[None]:
    """While inside, SIGTERM and SIGINT drain `runtime` first, then reach the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only: nothing to chain here
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, _Handler] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    draining: list[asyncio.Task[None]] = []

    def start_drain(signum: int) -> None:
        if draining:
            _forward(previous[signum], signum)
        else:
            draining.append(loop.create_task(_drain_then_forward(runtime, previous[signum], signum)))

    def handler(signum: int, frame: FrameType | None) -> None:
        # Python runs this between bytecodes of the loop's thread: hand the work to the loop.
        loop.call_soon_threadsafe(start_drain, signum)

    for sig in SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            if old is not None and signal.getsignal(signum) is handler:
                signal.signal(signum, old)
        if draining:
            await asyncio.gather(*draining, return_exceptions=True)


async def _drain_then_forward(runtime: Runtime, previous: _Handler, signum: int) -> None:
    log.info("signal %s: draining (cancelling tasks, flushing events, closing streams)", signum)
    try:
        await asyncio.wait_for(runtime.drain(), DRAIN_TIMEOUT)
    except Exception:
        log.exception("draining before shutdown failed; shutting down anyway")
    finally:
        _forward(previous, signum)


def _forward(previous: _Handler, signum: int) -> None:
    if callable(previous):
        previous(signum, None)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
