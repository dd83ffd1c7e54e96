"""A `ToolHost` for agent tests built from real parts: real subprocesses in a temp folder.

Files go through `crogia.workspace.Workspace` when it is implemented; while it is still a
stub, `LocalWorkspace` (a small confined stand-in on the same temp folder) takes its place.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fnmatch
import os
import re
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

from crogia.agent.host import ProcessView
from crogia.errors import InvalidInput, NotFound
from crogia.sandbox.base import ExecResult
from crogia.workspace import Entry, EntryType, GrepMatch, SearchResult, Workspace


class LocalWorkspace(Workspace):
    """Just enough of `Workspace` for the agent's tools, on a real folder."""

    def _resolve(self, path: str) -> Path:
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise InvalidInput(f"path {path!r} is outside the workspace")
        return target

    def _rel(self, target: Path) -> str:
        return target.relative_to(self.root.resolve()).as_posix()

    async def read_text(self, path: str, *, max_bytes: int | None = None) -> str:
        target = self._resolve(path)
        if not await anyio.Path(target).is_file():
            raise NotFound(f"no file {path!r} in the workspace")
        return await anyio.Path(target).read_text()

    async def write_text(self, path: str, content: str) -> int:
        target = anyio.Path(self._resolve(path))
        await target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode()
        await target.write_bytes(data)
        return len(data)

    async def list(self, path: str = ".", *, depth: int = 1) -> list[Entry]:
        folder = self._resolve(path)
        if not await anyio.Path(folder).is_dir():
            raise NotFound(f"no folder {path!r} in the workspace")
        return await anyio.to_thread.run_sync(self._entries, folder)

    def _entries(self, folder: Path) -> builtins.list[Entry]:
        entries = []
        for child in folder.iterdir():
            kind: EntryType = "symlink" if child.is_symlink() else "directory" if child.is_dir() else "file"
            stat = child.lstat()
            size = None if kind == "directory" else stat.st_size
            modified = datetime.fromtimestamp(stat.st_mtime, UTC)
            entries.append(Entry(child.name, self._rel(child), kind, size, modified))
        return entries

    async def find_files(self, pattern: str, path: str = ".", **_: object) -> SearchResult[str]:
        folder = self._resolve(path)
        files = await anyio.to_thread.run_sync(lambda: sorted(p for p in folder.rglob("*") if p.is_file()))
        matches = [self._rel(p) for p in files if fnmatch.fnmatch(p.name, pattern) or p.match(pattern)]
        return SearchResult(matches, truncated=False)

    async def grep(
        self, pattern: str, path: str = ".", *, file_types: str = "*", **_: object
    ) -> SearchResult[GrepMatch]:
        regex = re.compile(pattern)
        globs = [g.strip() for g in file_types.split(",") if g.strip()] or ["*"]
        found = await self.find_files("*", path)
        matches = []
        for rel in found.matches:
            if not any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], g) for g in globs):
                continue
            text = await self.read_text(rel)
            matches += [
                GrepMatch(rel, n, line) for n, line in enumerate(text.splitlines(), 1) if regex.search(line)
            ]
        return SearchResult(matches, truncated=False)


async def make_workspace(root: Path) -> Workspace:
    """The real Workspace if it works yet, else the local stand-in."""
    real = Workspace(root)
    try:
        await real.list(".")
    except NotImplementedError:
        return LocalWorkspace(root)
    return real


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
        return cls(await make_workspace(root), log_dir)

    @property
    def workspace(self) -> Workspace:
        return self._workspace

    async def run_shell(self, cmd: str, *, timeout: float | None = None) -> ExecResult:  # noqa: ASYNC109
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
