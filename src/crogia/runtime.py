"""The running system: store, bus, sandbox provider and services, built and closed together."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crogia.agent.loop import Agent
from crogia.bus import EventBus
from crogia.config import Settings
from crogia.events import EgressBlocked
from crogia.sandbox import make_provider
from crogia.sandbox.base import SandboxProvider
from crogia.services.idle import IdleReaper
from crogia.services.lifecycle import StopReason
from crogia.services.live import LiveSession
from crogia.services.pool import SandboxPool
from crogia.services.previews import PreviewService
from crogia.services.processes import ProcessService
from crogia.services.sessions import SessionService
from crogia.services.shell import ShellService
from crogia.services.tasks import TaskService
from crogia.services.terminals import TerminalService
from crogia.store import Database

log = logging.getLogger(__name__)

SHUTTING_DOWN = "server shutting down; reconnect with since"
LOCK_FILE = "server.lock"


class DataFolderInUse(RuntimeError):
    """Another server holds this data folder."""


def lock_data_folder(folder: Path) -> int:
    """Take the data folder for this process (blocking, brief): the lock's fd, held until `close`.

    Two servers on one folder are one instance (the folder names it), and a starting server removes
    what it takes for a crash's leftovers of its instance: the other's live sandboxes. An flock goes
    with its process, so a killed server never leaves the folder locked.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 16, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataFolderInUse(
            f"another Crogia server (pid {holder}) uses the data folder {folder}: "
            "stop it, or give this one another BASE_DIRECTORY"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(eq=False)
class Runtime:
    settings: Settings
    db: Database
    bus: EventBus
    provider: SandboxProvider
    sessions: SessionService
    processes: ProcessService
    shell: ShellService
    tasks: TaskService
    agent: Agent
    pool: SandboxPool
    reaper: IdleReaper
    terminals: TerminalService
    previews: PreviewService
    _docker_checked: tuple[float, bool] = (float("-inf"), False)
    _docker_check: asyncio.Task[None] | None = None
    _warm_up: asyncio.Task[None] | None = None
    stopping: bool = False
    """Set by `drain`: no new tasks or event streams."""
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    _lock_fd: int = -1
    """This server's hold on its data folder (`lock_data_folder`)."""
    """The tasks serving event streams (WebSockets), so `drain` can wait for them to close."""
    _egress_events: set[asyncio.Task[Any]] = field(default_factory=set)
    """`egress_blocked` events on their way to the bus."""

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Migrate the store, pick the sandbox backend, re-attach sessions, fail interrupted tasks."""
        lock_fd = await asyncio.to_thread(lock_data_folder, settings.data_dir)
        db = Database(settings.effective_database_url)
        try:
            await db.migrate()
            provider = await make_provider(settings)
        except BaseException:
            await db.close()
            os.close(lock_fd)
            raise
        bus = EventBus(db, keep_sandbox_events=settings.sandbox_events_kept)
        bus.start()
        pool = SandboxPool(settings, provider)
        sessions = SessionService(settings, db, bus, provider, pool)
        processes = ProcessService(settings, db, bus, sessions)
        shell = ShellService(settings)
        agent = Agent.from_settings(settings)
        tasks = TaskService(db, bus, sessions, shell, processes, agent)
        reaper = IdleReaper(sessions, tasks, processes, ttl=settings.session_idle_ttl)
        terminals = TerminalService(settings)
        previews = PreviewService(settings, bus, sessions, processes)
        runtime = cls(
            settings,
            db,
            bus,
            provider,
            sessions,
            processes,
            shell,
            tasks,
            agent,
            pool,
            reaper,
            terminals,
            previews,
        )
        runtime._lock_fd = lock_fd
        sessions.on_stop.append(runtime._end_tasks)
        sessions.on_sandbox.append(terminals.woke)
        provider.egress_listener = runtime._egress_blocked
        try:
            await tasks.fail_interrupted()
            await sessions.reconcile()
            await pool.start()  # after reconcile, which removes the previous server's pool sandboxes
            reaper.start()
            previews.start()
            runtime._warm_up = asyncio.create_task(agent.warm_up(), name="crogia-agent-warm-up")
        except BaseException:
            await runtime.close()
            raise
        log.info("sandbox backend: %s; %d session(s) re-attached", provider.name, sessions.live_count())
        return runtime

    async def docker_available(self) -> bool:
        """Whether the Docker engine answers: the last check's answer, refreshed in the background at
        most once a second, so health never waits on a busy engine (only the very first call does)."""
        if self.provider.name != "docker":
            return False
        checked = self._docker_checked[0]
        if checked == float("-inf"):
            await self._check_docker()
        elif time.monotonic() - checked > 1.0 and (self._docker_check is None or self._docker_check.done()):
            self._docker_check = asyncio.create_task(self._check_docker(), name="crogia-docker-check")
        return self._docker_checked[1]

    async def _check_docker(self) -> None:
        self._docker_checked = (time.monotonic(), await self.provider.available())

    def _egress_blocked(self, session_id: str, destination: str) -> None:
        """A sandbox was refused a destination (already rate-limited): an `egress_blocked` event."""
        task = asyncio.create_task(
            self.bus.publish(session_id, EgressBlocked(destination=destination[:255])),
            name=f"crogia-egress-event-{session_id}",
        )
        self._egress_events.add(task)
        task.add_done_callback(self._egress_events.discard)

    async def delete_session(self, session_id: str, *, tenant: str | None) -> None:
        await self.sessions.delete(session_id, tenant=tenant)  # its tasks end first (`_end_tasks`)

    async def _end_tasks(self, live: LiveSession, reason: StopReason) -> None:
        if reason == "deleted":
            await self.tasks.stop_session(live.id)
            self.terminals.end_session(live.id)

    async def drain(self, *, timeout: float = 5.0) -> None:
        """The first half of a graceful stop, before the server drops its connections.

        New tasks and streams are refused; running and queued tasks end `cancelled` (with their
        events); every event is stored and handed to its subscribers; then each stream sends what
        it holds and closes with `SHUTTING_DOWN`. Waits up to `timeout` for the streams to close.
        """
        if self.stopping:
            return
        self.stopping = True
        await self.tasks.close()
        await self.bus.flush()
        self.bus.end_all(SHUTTING_DOWN)
        if self.streams:
            await asyncio.wait(set(self.streams), timeout=timeout)

    async def close(self) -> None:
        """Cancel tasks, flush events, drop sandbox connections, close the store."""
        for task in (self._docker_check, self._warm_up):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._egress_events, return_exceptions=True)
        await self.previews.close()
        await self.tasks.close()
        await self.reaper.close()  # after the tasks: their ends are activity too
        await self.agent.aclose()
        await self.processes.close()
        await self.bus.close()
        await self.pool.close()
        self.terminals.close()
        await self.sessions.close()
        await self.provider.close()
        await self.db.close()
        if self._lock_fd >= 0:  # the last: nothing of this server's is left to sweep
            os.close(self._lock_fd)
            self._lock_fd = -1
