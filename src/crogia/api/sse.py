"""Server-sent events from a command whose output arrives through a callback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from crogia.errors import CrogiaError
from crogia.sandbox.base import OutputListener

T = TypeVar("T")

PENDING_MAX = 4 * 1024 * 1024
"""Characters of output held for a client that reads slower than the command writes."""


def frame(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


async def output_events(
    start: Callable[[OutputListener], Awaitable[T]], finish: Callable[[T], str]
) -> AsyncIterator[str]:
    """`event: output` frames (`{"data": chunk}`) while `start` runs, then `finish(result)`.

    The status line is sent before the command starts, so an error it raises (a bad `cwd`, a
    sandbox gone) ends the stream with `event: error` and `{"detail": ...}` instead of a broken body.
    When the client goes away the generator is closed and the command is cancelled with it,
    so nothing outlives the request. A client reading slower than the output comes misses what
    passes `PENDING_MAX` held characters, and a marker in the output says how much.
    """
    chunks = _Pending(PENDING_MAX)
    run = asyncio.ensure_future(start(chunks.put))
    try:
        while not (run.done() and chunks.empty()):
            if run.done():
                chunks.end()
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield frame("output", json.dumps({"data": getter.result()}))
            else:
                getter.cancel()
        try:
            result = run.result()
        except CrogiaError as exc:
            yield frame("error", json.dumps({"detail": exc.message}))
            return
        yield finish(result)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


class _Pending:
    """The chunks not sent yet, at most `limit` characters; what does not fit is counted, not kept."""

    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        """(text, characters it counts against the limit); markers count nothing."""
        self._limit = limit
        self._size = 0
        self._dropped = 0

    def put(self, chunk: str) -> None:
        if self._size + len(chunk) > self._limit:
            self._dropped += len(chunk)
            return
        self.end()
        self._size += len(chunk)
        self._queue.put_nowait((chunk, len(chunk)))

    def end(self) -> None:
        """Mark the gap, if any, before what comes next (or at the very end)."""
        if self._dropped:
            marker = f"\n[... {self._dropped} characters of output dropped: the client read too slowly ...]\n"
            self._dropped = 0
            self._queue.put_nowait((marker, 0))

    def empty(self) -> bool:
        return self._queue.empty() and not self._dropped

    async def get(self) -> str:
        chunk, size = await self._queue.get()
        self._size -= size
        return chunk
