"""The real server (and a scripted model) on an event loop of its own, in a background thread.

Synchronous clients (schemathesis calls through `requests`) block the thread they run on, so the
server they talk to cannot share it. `ThreadedServer` runs `run_server` on a private loop and
hands coroutines to it with `call()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from crogia.config import Settings
from tests.support.scripted_openai import Reply, ScriptedOpenAI
from tests.support.server import RunningServer, run_server

T = TypeVar("T")


class ThreadedServer:
    """`with ThreadedServer(settings_for) as api:` runs the app until the block ends."""

    def __init__(self, settings_for: Callable[[str], Settings], *, token: str | None = None) -> None:
        self._settings_for = settings_for
        """Settings, given the scripted model's base URL."""
        self._token = token
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="crogia-threaded", daemon=True)
        self._stop: asyncio.Event | None = None
        self._main: asyncio.Future[None] | None = None
        self.server: RunningServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    def call(self, factory: Callable[[RunningServer], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        """Run `factory(server)` on the server's loop and wait for its result."""
        assert self.server is not None
        return asyncio.run_coroutine_threadsafe(factory(self.server), self._loop).result(timeout)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        ready = asyncio.run_coroutine_threadsafe(self._wait_started(), self._loop)
        try:
            ready.result(120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._main is not None:
            done = asyncio.run_coroutine_threadsafe(_gather(self._main), self._loop)
            done.result(120)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _wait_started(self) -> None:
        self._stop = asyncio.Event()
        started = asyncio.Event()
        self._main = asyncio.ensure_future(self._serve(started))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiter, self._main}, return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():
            waiter.cancel()
            await self._main  # raises what stopped start-up

    async def _serve(self, started: asyncio.Event) -> None:
        async with ScriptedOpenAI(responder=lambda _: Reply("ok")) as model:
            settings = self._settings_for(model.base_url)
            async with run_server(settings, token=self._token) as server:
                self.server = server
                started.set()
                assert self._stop is not None
                await self._stop.wait()


async def _gather(future: Awaitable[None]) -> None:
    await asyncio.gather(future, return_exceptions=True)
