"""Tasks: queued per session, run one at a time in arrival order by the agent, cancellable.

Each session with work gets one owned worker task that takes task ids from its queue. A task's
agent run is its own asyncio task so a cancel stops exactly that run (the model call or the
command in flight) and the worker goes on with the next task.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from crogia.agent.loop import Agent, AgentError, ContextView, TaskOptions
from crogia.agent.stream import sum_usage
from crogia.bus import EventBus
from crogia.errors import Conflict, NotFound
from crogia.events import ErrorEvent, TaskCancelled, TaskCompleted, TaskFailed, TaskStarted, _Event
from crogia.services.processes import ProcessService
from crogia.services.sessions import LiveSession, SessionService
from crogia.services.shell import ShellService
from crogia.services.toolhost import SessionToolHost
from crogia.store import Database, repo
from crogia.store.tables import TaskRow, utcnow

log = logging.getLogger(__name__)

FINISHED = ("completed", "failed", "cancelled")


@dataclass(eq=False)
class _Worker:
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    running: tuple[str, asyncio.Task[None]] | None = None
    cancelled: set[str] = field(default_factory=set)
    """Tasks the user cancelled (queued or running)."""
    options: dict[str, TaskOptions] = field(default_factory=dict)
    """Per-task options of queued tasks (a restart fails queued tasks, so memory is enough)."""


class TaskService:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        sessions: SessionService,
        shell: ShellService,
        processes: ProcessService,
        agent: Agent,
    ) -> None:
        self.db = db
        self.bus = bus
        self.sessions = sessions
        self.shell = shell
        self.processes = processes
        self.agent = agent
        self._workers: dict[str, _Worker] = {}

    # --- queries ---

    async def all(self, session_id: str) -> list[TaskRow]:
        async with self.db.session() as db:
            return list(await repo.list_tasks(db, session_id=session_id))

    async def get(self, session_id: str, task_id: str) -> TaskRow:
        async with self.db.session() as db:
            row = await repo.get_task(db, session_id=session_id, task_id=task_id)
        if row is None:
            raise NotFound(f"Task {task_id} not found in this session.", task_id=task_id)
        return row

    async def conversation(self, session_id: str) -> list[dict[str, Any]]:
        async with self.db.session() as db:
            return await repo.conversation(db, session_id=session_id)

    async def usage(self, session_id: str) -> dict[str, int]:
        """Tokens used by all the session's tasks."""
        async with self.db.session() as db:
            return sum_usage(await repo.task_usages(db, session_id=session_id))

    async def context_view(self, session_id: str) -> ContextView:
        """What the agent sends its model in place of the start of the conversation."""
        async with self.db.session() as db:
            head, covers = await repo.context_view(db, session_id=session_id)
        return ContextView(head=head, covers=covers)

    def is_running(self, session_id: str) -> bool:
        worker = self._workers.get(session_id)
        return worker is not None and worker.running is not None

    def busy(self, session_id: str) -> bool:
        """A task of the session runs (the agent may be waiting on its model) or waits in the queue."""
        worker = self._workers.get(session_id)
        return worker is not None and (worker.running is not None or not worker.queue.empty())

    # --- commands ---

    async def submit(self, live: LiveSession, text: str, options: TaskOptions | None = None) -> TaskRow:
        row = TaskRow(id=str(uuid.uuid4()), session_id=live.id, task=text, status="queued", usage={})
        row.created = utcnow()
        async with self.db.transaction() as db:
            db.add(row)
            await repo.touch_session(db, session_id=live.id, last_task=text)
        worker = self._workers.get(live.id)
        if worker is None or worker.task is None or worker.task.done():
            worker = self._workers[live.id] = _Worker()
            worker.task = asyncio.create_task(self._work(live, worker), name=f"crogia-tasks-{live.id}")
        if options is not None:
            worker.options[row.id] = options
        worker.queue.put_nowait(row.id)
        return row

    async def cancel(self, session_id: str, task_id: str) -> TaskRow:
        row = await self.get(session_id, task_id)
        if row.status in FINISHED:
            raise Conflict(f"Task {task_id} is already {row.status}.")
        worker = self._workers.get(session_id)
        if worker is not None:
            worker.cancelled.add(task_id)
            if worker.running is not None and worker.running[0] == task_id:
                run = worker.running[1]
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                return await self.get(session_id, task_id)
        await self._end(row, "cancelled", TaskCancelled(task=row.task, task_id=row.id))
        return await self.get(session_id, task_id)

    async def fail_interrupted(self) -> None:
        """At start-up: tasks a dead server left queued or running are failed, with an event."""
        async with self.db.session() as db:
            rows = await repo.unfinished_tasks(db)
        for row in rows:
            reason = "The server restarted before this task finished."
            await self.bus.publish(row.session_id, ErrorEvent(message=reason, task_id=row.id))
            await self._end(row, "failed", TaskFailed(task=row.task, message=reason, task_id=row.id), reason)

    async def stop_session(self, session_id: str) -> None:
        """Cancel every queued and running task of a session and stop its worker."""
        worker = self._workers.pop(session_id, None)
        if worker is None:
            return
        for row in await self.all(session_id):
            if row.status not in FINISHED:
                worker.cancelled.add(row.id)
        if worker.task is not None:
            worker.task.cancel()
            await asyncio.gather(worker.task, return_exceptions=True)

    async def close(self) -> None:
        for session_id in list(self._workers):
            await self.stop_session(session_id)

    # --- the worker ---

    async def _work(self, live: LiveSession, worker: _Worker) -> None:
        try:
            while True:
                task_id = await worker.queue.get()
                row = await self.get(live.id, task_id)
                if row.status != "queued":
                    continue
                options = worker.options.pop(task_id, None)
                run = asyncio.create_task(self._run(live, row, options), name=f"crogia-task-{task_id}")
                worker.running = (task_id, run)
                try:
                    await asyncio.wait({run})
                except asyncio.CancelledError:
                    # Stopping the worker stops its run (here: `finally` forgets `worker.running`).
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
                    raise
                finally:
                    worker.running = None
                    live.touch()  # the idle time starts when the task ends
        except asyncio.CancelledError:
            await self._cancel_queued(live.id, worker)
            raise

    async def _cancel_queued(self, session_id: str, worker: _Worker) -> None:
        while not worker.queue.empty():
            task_id = worker.queue.get_nowait()
            try:
                row = await self.get(session_id, task_id)
            except NotFound:
                continue
            if row.status == "queued":
                await self._end(row, "cancelled", TaskCancelled(task=row.task, task_id=row.id))

    async def _run(self, live: LiveSession, row: TaskRow, options: TaskOptions | None) -> None:
        async with self.db.transaction() as db:
            await repo.update_task(db, task_id=row.id, status="running", started=utcnow())
        await self.bus.publish(live.id, TaskStarted(task=row.task, task_id=row.id))
        async with self.db.session() as db:
            history = await repo.conversation(db, session_id=live.id)
            head, covers = await repo.context_view(db, session_id=live.id)
        view = ContextView(head=head, covers=covers)
        stored = len(history)

        async def emit(event: _Event) -> None:
            await self.bus.publish(live.id, event.model_copy(update={"task_id": row.id}))

        async def save(messages: list[dict[str, Any]]) -> None:
            nonlocal stored
            async with self.db.transaction() as db:
                await repo.append_messages(
                    db, session_id=live.id, task_id=row.id, start=stored, messages=messages[stored:]
                )
            stored = len(messages)
            live.touch()  # activity is written to the store in batches (`flush_activity`), not per step

        async def save_view(new: ContextView) -> None:
            async with self.db.transaction() as db:
                await repo.set_context_view(db, session_id=live.id, head=new.head, covers=new.covers)

        host = SessionToolHost(live, self.shell, self.processes)
        try:
            outcome = await self.agent.run(
                row.task,
                history,
                host,
                emit=emit,
                save=save,
                task_id=row.id,
                view=view,
                save_view=save_view,
                options=options,
            )
        except asyncio.CancelledError:
            await asyncio.shield(self._end(row, "cancelled", TaskCancelled(task=row.task, task_id=row.id)))
            raise
        except AgentError as exc:
            await self._fail(row, exc.message, exc.context.get("usage"))
        except Exception as exc:
            log.exception("task %s failed", row.id)
            await self._fail(row, f"The task failed: {type(exc).__name__}.")
        else:
            usage = dict(outcome.usage)
            await self._end(
                row, "completed", TaskCompleted(task=row.task, usage=usage, task_id=row.id), usage=usage
            )

    async def _fail(self, row: TaskRow, message: str, usage: dict[str, int] | None = None) -> None:
        await self.bus.publish(row.session_id, ErrorEvent(message=message, task_id=row.id))
        failed = TaskFailed(task=row.task, message=message, task_id=row.id)
        await self._end(row, "failed", failed, message, usage=usage)

    async def _end(
        self,
        row: TaskRow,
        status: str,
        event: _Event,
        error: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> None:
        values: dict[str, Any] = {"status": status, "ended": utcnow(), "error": error}
        if usage is not None:
            values["usage"] = usage
        async with self.db.transaction() as db:
            await repo.update_task(db, task_id=row.id, **values)
        await self.bus.publish(row.session_id, event)
