"""Interactive terminals (REST): open one in a session's sandbox, list them, delete one.

The terminal itself is used over `WS /ws/shells/{shell_id}` (`shells_ws.py`).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from crogia.api.deps import LiveDep, RuntimeDep, SessionRowDep, TenantDep
from crogia.api.errors import ERRORS
from crogia.api.schemas import Message, _Model
from crogia.services.terminals import Terminal

router = APIRouter(tags=["terminals"], responses=ERRORS)


class ShellCreate(BaseModel):
    """Optional body of `POST /api/sessions/{id}/shells`: the window size (default 80x24)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    cols: int = Field(80, ge=1, le=1000)
    rows: int = Field(24, ge=1, le=1000)


class ShellPublic(_Model):
    shell_id: str = Field(..., description="`shell_` and 24 hex digits.")
    session_id: str
    created: datetime
    status: str = Field(..., description="`active`; `stopped` once the session's sandbox was stopped.")
    cols: int
    rows: int


class ShellList(_Model):
    shells: list[ShellPublic]


def shell_public(term: Terminal) -> ShellPublic:
    return ShellPublic(
        shell_id=term.id,
        session_id=term.live.id,
        created=term.created,
        status=term.status,
        cols=term.cols,
        rows=term.rows,
    )


@router.post("/api/sessions/{session_id}/shells", response_model=ShellPublic, summary="Open a terminal")
async def create_shell(live: LiveDep, runtime: RuntimeDep, body: ShellCreate | None = None) -> ShellPublic:
    """A login `bash` on a pseudo-terminal in `/workspace`; wakes a stopped session. 409 past the limit."""
    body = body or ShellCreate()
    term = await runtime.terminals.create(live, cols=body.cols, rows=body.rows)
    return shell_public(term)


@router.get("/api/sessions/{session_id}/shells", response_model=ShellList, summary="List terminals")
async def list_shells(row: SessionRowDep, runtime: RuntimeDep) -> ShellList:
    return ShellList(shells=[shell_public(t) for t in runtime.terminals.of_session(row.id)])


@router.delete("/api/shells/{shell_id}", response_model=Message, summary="Delete a terminal")
async def delete_shell(shell_id: str, runtime: RuntimeDep, tenant: TenantDep) -> Message:
    """SIGHUP, then SIGKILL, to every process the terminal started (background jobs included).

    409 for a terminal of a stopped session (until the session is woken; then it is gone: 404)."""
    term = runtime.terminals.get(shell_id, tenant=tenant)
    await runtime.terminals.delete(term)
    return Message(message=f"Shell session {shell_id} terminated")
