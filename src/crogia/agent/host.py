"""What the agent's tools need from the rest of Crogia.

The services layer implements `ToolHost` for one session with the same code the REST API
uses, so confinement and limits hold for the agent exactly as for a user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from crogia.sandbox.base import ExecResult
from crogia.sandbox.files import Files


@dataclass(frozen=True, slots=True)
class ProcessView:
    pid: int
    cmd: str
    status: str
    """`running`, `exited` or `stopped`."""
    log: str
    """Log path inside the sandbox."""
    exit_code: int | None = None
    ports: tuple[int, ...] = ()
    """TCP ports it (or a child of it) listens on inside the sandbox."""


class ToolHost(Protocol):
    @property
    def files(self) -> Files:
        """The session's files (host folder or sandbox daemon, by SANDBOX_FILES)."""
        ...

    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:
        """Run in the sandbox with cwd /workspace; `timeout` is bounded by settings."""
        ...

    async def start_process(self, cmd: str) -> ProcessView: ...

    async def stop_process(self, pid: int) -> ProcessView:
        """Raises `crogia.errors.NotFound` for an unknown pid."""
        ...

    async def list_processes(self) -> list[ProcessView]: ...

    async def tail_log(self, pid: int, lines: int = 50) -> str:
        """Raises `crogia.errors.NotFound` for an unknown pid."""
        ...
