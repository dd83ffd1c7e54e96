"""The agent's view of one session: the same services the REST API calls."""

from __future__ import annotations

import dataclasses

from crogia.agent.host import ProcessView
from crogia.errors import CrogiaError
from crogia.sandbox.base import ExecResult
from crogia.sandbox.files import Files
from crogia.services.processes import ProcessService
from crogia.services.sessions import LiveSession
from crogia.services.shell import ShellService
from crogia.store.tables import ProcessRow


def process_view(row: ProcessRow) -> ProcessView:
    return ProcessView(pid=row.pid, cmd=row.cmd, status=row.status, log=row.log, exit_code=row.exit_code)


class SessionToolHost:
    """Implements `crogia.agent.host.ToolHost` for one live session."""

    def __init__(self, live: LiveSession, shell: ShellService, processes: ProcessService) -> None:
        self._live = live
        self._shell = shell
        self._processes = processes

    @property
    def files(self) -> Files:
        return self._live.files

    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:
        return await self._shell.run(self._live, cmd, timeout=timeout)

    async def start_process(self, cmd: str) -> ProcessView:
        return process_view(await self._processes.start(self._live, cmd))

    async def stop_process(self, pid: int) -> ProcessView:
        return process_view(await self._processes.stop(self._live, pid))

    async def list_processes(self) -> list[ProcessView]:
        rows = await self._processes.list(self._live.id)
        by_owner: dict[int, list[int]] = {}
        if any(row.status == "running" for row in rows):
            try:
                for port in await self._live.sandbox.ports(owners=True):
                    for owner in {port.pgid, port.pid} - {None}:
                        by_owner.setdefault(owner or 0, []).append(port.port)
            except CrogiaError:
                pass  # the listing without ports is still worth giving
        return [
            dataclasses.replace(process_view(row), ports=tuple(sorted(by_owner.get(row.pid, ()))))
            for row in rows
        ]

    async def tail_log(self, pid: int, lines: int = 50) -> str:
        return await self._processes.logs(self._live, pid, lines=lines)
