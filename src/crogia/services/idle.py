"""The idle reaper: stops the sandboxes of sessions nobody uses, and writes activity to the store.

A session is idle when for SESSION_IDLE_TTL seconds it had no request that needs its sandbox
(shell, files, search, processes, tasks), no command in flight, no task running or queued (an
agent waiting on its model is busy) and no background process running. Its sandbox is then
stopped: status `stopped`, container status `exited`; the workspace stays, and the next request
that needs the sandbox starts it again (`SessionService.live`). Reading the session, its task
list or its event stream is not activity: a dashboard left open does not keep sandboxes running.
"""

from __future__ import annotations

import asyncio
import logging
import time

from crogia.services.processes import ProcessService
from crogia.services.sessions import LiveSession, SessionService
from crogia.services.tasks import TaskService

log = logging.getLogger(__name__)

FLUSH_EVERY = 5.0
"""Seconds between writes of in-memory activity to the store (and the longest tick)."""


class IdleReaper:
    """One owned task: every tick, flush activity and stop the sandboxes idle for `ttl` seconds."""

    def __init__(
        self, sessions: SessionService, tasks: TaskService, processes: ProcessService, *, ttl: float
    ) -> None:
        self.sessions = sessions
        self.tasks = tasks
        self.processes = processes
        self.ttl = ttl
        """0: sandboxes are never stopped (activity is still written to the store)."""
        self.interval = min(FLUSH_EVERY, max(ttl / 4, 0.05)) if ttl > 0 else FLUSH_EVERY
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="crogia-idle-reaper")

    async def close(self) -> None:
        """Stop ticking and write the last activity to the store."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self.sessions.flush_activity()
        except Exception:
            log.warning("writing session activity at shutdown failed", exc_info=True)

    async def tick(self) -> list[str]:
        """One round; returns the ids of the sessions whose sandbox it stopped."""
        await self.sessions.flush_activity()
        if self.ttl <= 0:
            return []
        stopped = []
        for live in self.sessions.awake():
            if await self._idle(live) and await self.sessions.sleep(live, idle_for=self.ttl):
                stopped.append(live.id)
        return stopped

    async def _idle(self, live: LiveSession) -> bool:
        if live.busy or time.time() - live.last_active < self.ttl or self.tasks.busy(live.id):
            return False
        return not await self.processes.any_running(live.id)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:
                log.exception("idle reaper tick failed")
