"""Shell: one command in the sandbox, answered whole or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from crogia.api.deps import LiveDep, RuntimeDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import ShellRequest, ShellResult
from crogia.api.sse import frame, output_events
from crogia.sandbox.base import ExecResult, OutputListener

router = APIRouter(prefix="/api/sessions/{session_id}/shell", tags=["shell"], responses=ERRORS)


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
    """`event: output` frames carry `{"data": chunk}`; a final `event: result` carries the ShellResult,
    or `event: error` carries `{"detail": ...}` when the command cannot run (say, a missing `cwd`)."""
    runtime.shell.bounds(body.timeout, body.max_output)  # bad bounds are a 4xx before streaming starts
    return StreamingResponse(_stream(body, live, runtime), media_type="text/event-stream")


async def _stream(body: ShellRequest, live: LiveDep, runtime: RuntimeDep) -> AsyncIterator[str]:
    async def start(on_output: OutputListener) -> ExecResult:
        return await runtime.shell.run(
            live,
            body.cmd,
            timeout=body.timeout,
            max_output=body.max_output,
            tty=body.tty,
            cwd=body.cwd,
            on_output=on_output,
        )

    def finish(result: ExecResult) -> str:
        return frame("result", shell_result(body.cmd, result).model_dump_json())

    async for item in output_events(start, finish):
        yield item
