"""The sandbox interface: one session's isolated place to run commands.

A backend implements a few private hooks (`_start`, `_stop`, `_destroy`, `_status`);
the public methods do the shared checks once. Commands, background processes and
process logs all go through a small executor daemon that lives inside the sandbox
(see `crogia.sandbox.executor`), so the same client code serves every backend and a
sandbox need not live on the server's own machine.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

WORKDIR = "/workspace"
"""Where the session's workspace appears inside every sandbox."""

STATE_MOUNT = "/run/crogia"
"""Where the sandbox's state folder (executor socket, process logs) appears inside it."""

POOL_LABEL = "crogia.pool"
"""Label of a sandbox started ahead of the session it now serves, by the warm pool (informational)."""

SandboxStatus = Literal["running", "exited", "missing", "unknown"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits applied to one sandbox."""

    memory_mb: int = 2048
    cpus: float = 1.0
    pids: int = 512
    network: str = "bridge"
    tmp_mb: int = 0
    """Size of the tmpfs at /tmp (and /var/tmp); 0 leaves the backend's default."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a provider needs to create (or re-create) a session's sandbox."""

    session_id: str
    workspace: Path
    """Host folder bound read-write at `/workspace`."""
    state_dir: Path
    """Host folder bound at `/run/crogia`: executor socket and process logs."""
    image: str = "crogia-sandbox:latest"
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


def make_dirs(spec: SandboxSpec) -> None:
    """Create the host folders a sandbox binds: the workspace, and its state folder with `logs` (blocking)."""
    spec.workspace.mkdir(parents=True, exist_ok=True)
    (spec.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    for parent in (spec.workspace.parent, spec.state_dir.parent):
        close_to_others(parent)


def close_to_others(folder: Path) -> None:
    """Take every permission from others on `folder` (blocking).

    What a sandbox makes (a setuid binary, a device node) must be out of every host user's
    reach: the folders holding the sessions' folders are never open to others (bubblewrap's
    user-namespace mode makes them `root:<access gid> 0710`, which this leaves alone).
    """
    mode = folder.stat().st_mode & 0o7777
    if mode & 0o007:
        folder.chmod(mode & 0o7770 if mode & 0o070 == 0o010 else 0o700)


@dataclass(frozen=True, slots=True)
class ExecResult:
    """Outcome of one command run to completion (or to its timeout)."""

    exit_code: int
    """The command's exit status; 128+N when killed by signal N; 124 when timed out."""
    output: str
    """stdout and stderr interleaved, as a terminal shows them; decoded as UTF-8 with replacement."""
    timed_out: bool = False
    truncated: bool = False
    """True when output passed `max_output` bytes; the middle was cut and a marker says how much."""


@dataclass(frozen=True, slots=True)
class ProcessHandle:
    """A background process started in the sandbox."""

    pid: int
    """The pid inside the sandbox (the leader of its own process group)."""
    log_path: str
    """Path of its combined stdout/stderr log, as seen inside the sandbox."""


@dataclass(frozen=True, slots=True)
class ProcessState:
    pid: int
    running: bool
    exit_code: int | None


ExitListener = Callable[[int, int], None]
"""Called with (pid, exit_code) when a background process ends, on the event loop."""
OutputListener = Callable[[str], None]
"""Called with each decoded chunk of a streaming command's output."""


class Sandbox(abc.ABC):
    """One session's sandbox. Obtain it from a `SandboxProvider`; never construct directly."""

    backend: ClassVar[str]

    def __init__(self, spec: SandboxSpec, sandbox_id: str) -> None:
        self.spec = spec
        self.id = sandbox_id

    @abc.abstractmethod
    async def exec(
        self,
        cmd: str,
        *,
        cwd: str = WORKDIR,
        env: Mapping[str, str] | None = None,
        timeout: float,
        max_output: int,
        tty: bool = False,
        on_output: OutputListener | None = None,
    ) -> ExecResult:
        """Run `cmd` with `bash -c` and wait for it.

        On timeout, or when the awaiting task is cancelled, the command's whole process group is killed.
        """

    @abc.abstractmethod
    async def spawn(
        self, cmd: str, *, cwd: str = WORKDIR, env: Mapping[str, str] | None = None
    ) -> ProcessHandle:
        """Start `cmd` in the background in a new process group, logging to a file."""

    @abc.abstractmethod
    async def terminate(self, pid: int, *, grace: float) -> int | None:
        """SIGTERM the process group, SIGKILL after `grace` seconds; return its exit code if known."""

    @abc.abstractmethod
    async def tail_log(self, pid: int, *, lines: int) -> str:
        """The last `lines` lines of a background process's log."""

    @abc.abstractmethod
    async def processes(self) -> list[ProcessState]:
        """Every background process the executor knows, running or ended."""

    @abc.abstractmethod
    def set_exit_listener(self, listener: ExitListener | None) -> None:
        """Register the one callback told about background process exits."""

    @abc.abstractmethod
    async def status(self) -> SandboxStatus:
        """`running`, `exited` (stopped but recoverable), `missing` or `unknown`."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start a stopped sandbox again and reconnect to its executor."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the sandbox and everything in it; it can be started again."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Stop and remove the sandbox. The workspace folder is left alone."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop this server's connection without touching the sandbox (server shutdown)."""


class SandboxProvider(abc.ABC):
    """Creates, finds and cleans up sandboxes of one backend."""

    name: ClassVar[str]

    @abc.abstractmethod
    async def available(self) -> bool:
        """True when this backend can create sandboxes right now (engine up, binary present)."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox, returning once its executor answers."""

    @abc.abstractmethod
    async def attach(self, spec: SandboxSpec, sandbox_id: str) -> Sandbox:
        """Get an existing sandbox back after a server restart.

        A stopped one is restarted; a missing one is re-created around the kept workspace
        (the returned sandbox's `id` then differs from `sandbox_id`).
        """

    @abc.abstractmethod
    async def managed_ids(self) -> list[str]:
        """Ids of every sandbox this backend created (by label), running or not."""

    @abc.abstractmethod
    async def remove(self, sandbox_id: str) -> None:
        """Remove a sandbox by id (orphan clean-up); no error if it is already gone."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the provider's own resources (engine connections)."""

    async def userns_mode(self) -> str:
        """What sandbox root is on the host, for /api/health: "off" means the host's root."""
        return "off"

    async def seccomp_mode(self) -> str:
        """Which seccomp filter sandboxes run under, for /api/health ("off": none)."""
        return "off"
