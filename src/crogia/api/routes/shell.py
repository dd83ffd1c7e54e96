"""Shell: one command in the sandbox, answered whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from crogia.api.deps import LiveDep, RuntimeDep
from crogia.api.schemas import ShellRequest, ShellResult
from crogia.sandbox.base import ExecResult

router = APIRouter(prefix="/api/sessions/{session_id}/shell", tags=["shell"])


def shell_result(cmd: str, result: ExecResult) -> ShellResult:
    return ShellResult(
        command=cmd,
        output=result.output,
        timestamp=datetime.now(UTC),
        exit_code=result.exit_code,
        timed_out=result.timed_out,
        truncated=result.truncated,
    )


@router.post("", response_model=ShellResult, summary="Run a command in the sandbox")
async def run_shell(body: ShellRequest, live: LiveDep, runtime: RuntimeDep) -> ShellResult:
    """Runs in `/workspace` with a timeout and an output cap; both show in the response when hit."""
    result = await runtime.shell.run(
        live, body.cmd, timeout=body.timeout, max_output=body.max_output, tty=body.tty, cwd=body.cwd
    )
    return shell_result(body.cmd, result)


@router.post(
    "/stream",
    response_class=StreamingResponse,
    summary="Run a command and stream its output (server-sent events)",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_shell(body: ShellRequest, live: LiveDep, runtime: RuntimeDep) -> StreamingResponse:
    """`event: output` frames carry `{"data": chunk}`; a final `event: result` carries the ShellResult."""
    runtime.shell.bounds(body.timeout, body.max_output)  # bad bounds are a 4xx before streaming starts
    return StreamingResponse(_stream(body, live, runtime), media_type="text/event-stream")


async def _stream(body: ShellRequest, live: LiveDep, runtime: RuntimeDep) -> AsyncIterator[str]:
    chunks: asyncio.Queue[str] = asyncio.Queue()
    run = asyncio.create_task(
        runtime.shell.run(
            live,
            body.cmd,
            timeout=body.timeout,
            max_output=body.max_output,
            tty=body.tty,
            cwd=body.cwd,
            on_output=chunks.put_nowait,
        )
    )
    try:
        while not (run.done() and chunks.empty()):
            getter = asyncio.ensure_future(chunks.get())
            await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield f"event: output\ndata: {json.dumps({'data': getter.result()})}\n\n"
            else:
                getter.cancel()
        result = shell_result(body.cmd, run.result())
        yield f"event: result\ndata: {result.model_dump_json()}\n\n"
    finally:
        # The client went away (or we are done): the command must not outlive the request.
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
