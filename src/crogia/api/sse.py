"""Server-sent events from a command whose output arrives through a callback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from crogia.errors import CrogiaError
from crogia.sandbox.base import OutputListener

T = TypeVar("T")


def frame(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


async def output_events(
    start: Callable[[OutputListener], Awaitable[T]], finish: Callable[[T], str]
) -> AsyncIterator[str]:
    """`event: output` frames (`{"data": chunk}`) while `start` runs, then `finish(result)`.

    The status line is sent before the command starts, so an error it raises (a bad `cwd`, a
    sandbox gone) ends the stream with `event: error` and `{"detail": ...}` instead of a broken body.
    When the client goes away the generator is closed and the command is cancelled with it,
    so nothing outlives the request.
    """
    chunks: asyncio.Queue[str] = asyncio.Queue()
    run = asyncio.ensure_future(start(chunks.put_nowait))
    try:
        while not (run.done() and chunks.empty()):
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
