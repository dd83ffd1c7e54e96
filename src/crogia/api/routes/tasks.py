"""Tasks: queue one, list them, get one, cancel one; and the conversation they continue."""

from __future__ import annotations

from fastapi import APIRouter

from crogia.agent.loop import TaskOptions
from crogia.api.deps import LiveDep, RuntimeDep, SessionRowDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import TaskAccepted, TaskCreate, TaskPublic
from crogia.errors import Unavailable
from crogia.store.tables import TaskRow

router = APIRouter(prefix="/api/sessions/{session_id}", tags=["tasks"], responses=ERRORS)


def task_public(row: TaskRow) -> TaskPublic:
    return TaskPublic(
        task_id=row.id,
        session_id=row.session_id,
        task=row.task,
        status=row.status,
        created=row.created,
        started=row.started,
        ended=row.ended,
        error=row.error,
        usage=row.usage or {},
    )


@router.post("/tasks", response_model=TaskAccepted, summary="Queue a task for the agent")
async def create_task(body: TaskCreate, live: LiveDep, runtime: RuntimeDep) -> TaskAccepted:
    """Answers at once; progress streams over `WS /ws/{session_id}`."""
    if runtime.stopping:
        raise Unavailable("The server is shutting down; post the task again once it is back.")
    if runtime.bus.store_error:  # its events would only pile up in memory
        raise Unavailable(f"The event store is down ({runtime.bus.store_error}); retry shortly.")
    options = TaskOptions(model=body.model, max_turns=body.max_turns, reasoning_effort=body.reasoning_effort)
    row = await runtime.tasks.submit(live, body.task, options)
    return TaskAccepted(message="Task started", task=row.task, task_id=row.id, status=row.status)


@router.get("/tasks", response_model=list[TaskPublic], summary="List the session's tasks")
async def list_tasks(row: SessionRowDep, runtime: RuntimeDep) -> list[TaskPublic]:
    return [task_public(task) for task in await runtime.tasks.all(row.id)]


@router.get("/tasks/{task_id}", response_model=TaskPublic, summary="Get a task")
async def get_task(task_id: str, row: SessionRowDep, runtime: RuntimeDep) -> TaskPublic:
    return task_public(await runtime.tasks.get(row.id, task_id))


@router.post("/tasks/{task_id}/cancel", response_model=TaskPublic, summary="Cancel a queued or running task")
async def cancel_task(task_id: str, row: SessionRowDep, runtime: RuntimeDep) -> TaskPublic:
    return task_public(await runtime.tasks.cancel(row.id, task_id))
