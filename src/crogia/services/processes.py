"""Background processes: started in the sandbox, recorded in the store, exits noticed by push."""

from __future__ import annotations

import asyncio
import logging
import shlex
import weakref
from collections.abc import Mapping

from crogia.bus import EventBus
from crogia.config import Settings
from crogia.errors import NotFound
from crogia.events import ProcessExited, ProcessStarted
from crogia.sandbox.base import STATE_MOUNT, WORKDIR, OutputListener
from crogia.services.sessions import LiveSession, SessionService
from crogia.services.shell import check_command
from crogia.store import Database, repo
from crogia.store.tables import ProcessRow

log = logging.getLogger(__name__)


class ProcessService:
    """Start, list, stop and read the logs of a session's long-running commands."""

    def __init__(self, settings: Settings, db: Database, bus: EventBus, sessions: SessionService) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.sessions = sessions
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """Each session's (start, exit, stop take turns), kept only while someone holds it."""
        self._pending: set[asyncio.Task[None]] = set()
        self._stopping: set[tuple[str, int]] = set()
        """(session, pid) being stopped: the exit notice the daemon sends before its reply means `stopped`."""
        sessions.on_sandbox.append(self._wire)

    async def start(
        self, live: LiveSession, cmd: str, *, cwd: str = WORKDIR, env: Mapping[str, str] | None = None
    ) -> ProcessRow:
        check_command(cmd)
        # Held across spawn + insert so an instant exit is recorded after the row exists.
        async with self._lock(live.id):
            handle = await live.sandbox.spawn(cmd, cwd=cwd, env=env)
            async with self.db.transaction() as db:
                row = await repo.add_process(
                    db, session_id=live.id, pid=handle.pid, cmd=cmd, log=handle.log_path
                )
        await self.bus.publish(live.id, ProcessStarted(pid=row.pid, cmd=cmd, log=row.log))
        return row

    async def list(self, session_id: str) -> list[ProcessRow]:
        async with self.db.session() as db:
            return list(await repo.list_processes(db, session_id=session_id))

    async def any_running(self, session_id: str) -> bool:
        """Whether a background process of the session still runs (it keeps the session awake)."""
        return any(row.status == "running" for row in await self.list(session_id))

    async def get(self, session_id: str, pid: int) -> ProcessRow:
        async with self.db.session() as db:
            row = await repo.get_process(db, session_id=session_id, pid=pid)
        if row is None:
            raise NotFound(f"Process {pid} not found in this session.", pid=pid)
        return row

    async def stop(self, live: LiveSession, pid: int) -> ProcessRow:
        row = await self.get(live.id, pid)
        if row.status == "running":
            key = (live.id, pid)
            self._stopping.add(key)
            try:
                code = await live.sandbox.terminate(pid, grace=self.settings.process_stop_grace)
                await self._finish(live.id, row, status="stopped", exit_code=code)
            finally:
                self._stopping.discard(key)
        return await self.get(live.id, pid)

    async def logs(self, live: LiveSession, pid: int, *, lines: int) -> str:
        await self.get(live.id, pid)
        return await live.sandbox.tail_log(pid, lines=lines)

    async def follow(self, live: LiveSession, pid: int, *, lines: int, on_output: OutputListener) -> int:
        """Stream the log's last `lines` lines and then new output until the process ends."""
        await self.get(live.id, pid)
        log_path = shlex.quote(f"{STATE_MOUNT}/logs/{pid}.log")
        # GNU tail runs inside the sandbox (same pid namespace), so `--pid` ends the follow on exit.
        cmd = f"exec tail -n {int(lines)} --pid={int(pid)} -F {log_path} 2>/dev/null"
        with live.in_use():
            result = await live.sandbox.exec(
                cmd,
                timeout=self.settings.shell_max_timeout,
                max_output=self.settings.shell_max_output,  # also the first burst of streamed output
                on_output=on_output,
            )
        return result.exit_code

    async def close(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # --- exits ---

    async def _wire(self, live: LiveSession) -> None:
        live.sandbox.set_exit_listener(lambda pid, code: self._on_exit(live.id, pid, code))
        await self._catch_up(live)

    def _on_exit(self, session_id: str, pid: int, exit_code: int) -> None:
        live = self.sessions.peek(session_id)
        if live is not None:
            live.touch()  # the idle time starts when the last process ends
        task = asyncio.create_task(self._record_exit(session_id, pid, exit_code))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_exit(self, session_id: str, pid: int, exit_code: int) -> None:
        try:
            async with self._lock(session_id):
                async with self.db.session() as db:
                    row = await repo.get_process(db, session_id=session_id, pid=pid)
                if row is not None:
                    status = "stopped" if (session_id, pid) in self._stopping else "exited"
                    await self._finish(session_id, row, status=status, exit_code=exit_code)
        except Exception:
            log.exception("recording the exit of process %s in session %s failed", pid, session_id)

    async def _catch_up(self, live: LiveSession) -> None:
        """After a restart: processes that ended while we were away are marked exited."""
        rows = [row for row in await self.list(live.id) if row.status == "running"]
        if not rows:
            return
        known = {state.pid: state for state in await live.sandbox.processes()}
        for row in rows:
            state = known.get(row.pid)
            if state is None or not state.running:
                await self._finish(
                    live.id, row, status="exited", exit_code=state.exit_code if state else None
                )

    async def _finish(self, session_id: str, row: ProcessRow, *, status: str, exit_code: int | None) -> None:
        async with self.db.transaction() as db:
            changed = await repo.finish_process(db, process_id=row.id, status=status, exit_code=exit_code)
        if changed:
            event = ProcessExited(
                pid=row.pid, exit_code=exit_code, status="stopped" if status == "stopped" else "exited"
            )
            await self.bus.publish(session_id, event)

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock
