"""Processes: long-running commands inside the sandbox."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from crogia.api.deps import LiveDep, RuntimeDep, SessionRowDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import Message, ProcessCreate, ProcessLogs, ProcessPublic
from crogia.api.sse import frame, output_events
from crogia.sandbox.base import OutputListener
from crogia.store.tables import ProcessRow

router = APIRouter(prefix="/api/sessions/{session_id}/processes", tags=["processes"], responses=ERRORS)


def process_public(row: ProcessRow) -> ProcessPublic:
    return ProcessPublic(
        pid=row.pid,
        cmd=row.cmd,
        status=row.status,
        log=row.log,
        started=row.started,
        exit_code=row.exit_code,
        ended=row.ended,
    )


@router.get("", response_model=list[ProcessPublic], summary="List the session's processes")
async def list_processes(row: SessionRowDep, runtime: RuntimeDep) -> list[ProcessPublic]:
    return [process_public(proc) for proc in await runtime.processes.list(row.id)]


@router.post("", response_model=ProcessPublic, summary="Start a long-running command")
async def start_process(body: ProcessCreate, live: LiveDep, runtime: RuntimeDep) -> ProcessPublic:
    return process_public(await runtime.processes.start(live, body.cmd, cwd=body.cwd, env=body.env))


@router.post("/{pid}/stop", response_model=Message, summary="Stop a process (TERM, then KILL)")
async def stop_process(pid: int, live: LiveDep, runtime: RuntimeDep) -> Message:
    row = await runtime.processes.stop(live, pid)
    return Message(message=f"Process {pid} {row.status} (exit code {row.exit_code})")


@router.get("/{pid}/logs", response_model=ProcessLogs, summary="Last lines of a process's log")
async def process_logs(
    pid: int, live: LiveDep, runtime: RuntimeDep, lines: Annotated[int, Query(ge=1, le=100_000)] = 50
) -> ProcessLogs:
    return ProcessLogs(logs=await runtime.processes.logs(live, pid, lines=lines), pid=pid)


@router.get(
    "/{pid}/logs/follow",
    response_class=StreamingResponse,
    summary="Follow a process's log (server-sent events) until it ends",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_logs(
    pid: int, live: LiveDep, runtime: RuntimeDep, lines: Annotated[int, Query(ge=0, le=100_000)] = 50
) -> StreamingResponse:
    """`event: output` frames carry `{"data": text}`; `event: end` comes when the process has ended."""
    await runtime.processes.get(live.id, pid)

    async def start(on_output: OutputListener) -> int:
        return await runtime.processes.follow(live, pid, lines=lines, on_output=on_output)

    def finish(_: int) -> str:
        return frame("end", json.dumps({"pid": pid}))

    return StreamingResponse(output_events(start, finish), media_type="text/event-stream")
