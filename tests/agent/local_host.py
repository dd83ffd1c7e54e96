"""A `ToolHost` for agent tests built from real parts, without a sandbox.

Files go through the real `crogia.workspace.Workspace` on a temp folder; commands run as
real bash subprocesses there (own process group, killed on timeout or cancel, like the
sandbox does), and background processes log to files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import anyio

from crogia.agent.host import ProcessView
from crogia.errors import NotFound
from crogia.sandbox.base import ExecResult
from crogia.workspace import Workspace


@dataclass
class _Process:
    proc: asyncio.subprocess.Process
    cmd: str
    log: Path
    stopped: bool = False

    def view(self) -> ProcessView:
        code = self.proc.returncode
        status = "running" if code is None else "stopped" if self.stopped else "exited"
        return ProcessView(self.proc.pid, self.cmd, status, str(self.log), code)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class LocalToolHost:
    """Runs commands with bash in `root`; background processes log to `log_dir`."""

    def __init__(self, workspace: Workspace, log_dir: Path, *, default_timeout: float = 30.0) -> None:
        self._workspace = workspace
        self.root = workspace.root
        self.log_dir = log_dir
        self.default_timeout = default_timeout
        self.processes: dict[int, _Process] = {}

    @classmethod
    async def create(cls, root: Path, log_dir: Path) -> LocalToolHost:
        await anyio.Path(root).mkdir(parents=True, exist_ok=True)
        await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
        return cls(Workspace(root), log_dir)

    @property
    def workspace(self) -> Workspace:
        return self._workspace

    @property
    def files(self) -> Workspace:
        return self._workspace

    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", cmd, cwd=self.root, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout or self.default_timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            return ExecResult(124, "", timed_out=True)
        except asyncio.CancelledError:
            # Like the real sandbox: a cancelled command takes its whole process group with it.
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        return ExecResult(proc.returncode or 0, output.decode(errors="replace"))

    async def start_process(self, cmd: str) -> ProcessView:
        log = self.log_dir / f"process-{len(self.processes) + 1}.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", cmd, cwd=self.root, stdout=sink, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes[proc.pid] = _Process(proc, cmd, log)
        return self.processes[proc.pid].view()

    def _get(self, pid: int) -> _Process:
        if pid not in self.processes:
            raise NotFound(f"no process with pid {pid}")
        return self.processes[pid]

    async def stop_process(self, pid: int) -> ProcessView:
        process = self._get(pid)
        if process.proc.returncode is None:
            process.stopped = True
            _kill_group(pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(2):
                    await process.proc.wait()
            except TimeoutError:
                _kill_group(pid, signal.SIGKILL)
                await process.proc.wait()
        return process.view()

    async def list_processes(self) -> list[ProcessView]:
        return [p.view() for p in self.processes.values()]

    async def tail_log(self, pid: int, lines: int = 50) -> str:
        text = await anyio.Path(self._get(pid).log).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def close(self) -> None:
        for pid in list(self.processes):
            await self.stop_process(pid)
