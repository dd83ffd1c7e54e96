"""The sandbox interface: one session's isolated place to run commands.

A backend implements a few private hooks (`_start`, `_stop`, `_destroy`, `_status`);
the public methods do the shared checks once. Commands, background processes and
process logs all go through a small executor daemon that lives inside the sandbox
(see `crogia.sandbox.executor`), so the same client code serves every backend and a
sandbox need not live on the server's own machine.
"""

from __future__ import annotations

import abc
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from crogia.sandbox.egress import EgressPolicy

if TYPE_CHECKING:
    from crogia.sandbox.files import Files
    from crogia.sandbox.pty_channel import PtyListener

WORKDIR = "/workspace"
"""Where the session's workspace appears inside every sandbox."""

STATE_MOUNT = "/run/crogia"
"""The sandbox's own state: a size-limited tmpfs (`Limits.state_mb`) holding process logs."""

CHANNEL_MOUNT = "/run/crogia-channel"
"""Where a sandbox that dials its server (Docker) sees `SandboxSpec.state_dir`, read-only."""

POOL_LABEL = "crogia.pool"
"""Label of a sandbox started ahead of the session it now serves, by the warm pool (informational)."""

SandboxStatus = Literal["running", "exited", "missing", "unknown"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits applied to one sandbox."""

    memory_mb: int = 2048
    cpus: float = 1.0
    pids: int = 512
    network: str = "isolated"
    """`isolated` (public internet only), `none`, or an old Docker mode (shared, not isolated)."""
    tmp_mb: int = 0
    """Size of the tmpfs at /tmp (and /var/tmp); 0 leaves the backend's default."""
    state_mb: int = 64
    """Size of the tmpfs at /run/crogia (process logs); in the memory limit, like /tmp."""


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything a provider needs to create (or re-create) a session's sandbox."""

    session_id: str
    workspace: Path
    """Host folder bound read-write at `/workspace`."""
    state_dir: Path
    """Server-only host folder for the channel (Docker: socket and secret, bound read-only at
    `CHANNEL_MOUNT`); nothing in it is the sandbox's to write."""
    image: str = "crogia-sandbox:latest"
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    """The session's egress policy (`crogia.sandbox.egress`); isolated networks only."""


def make_dirs(spec: SandboxSpec) -> None:
    """Create the host folders of a sandbox (blocking): its workspace, and its server-only state folder.

    The state folder's parent is the server's alone (0700); the folder itself only traversable by
    others (0711: a remapped container root must reach the socket). What an older version let a
    sandbox write there (logs, planted links) is removed without following anything.
    """
    spec.workspace.mkdir(parents=True, exist_ok=True)
    close_to_others(spec.workspace.parent)  # what a sandbox makes there is no host user's to use
    spec.state_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(spec.state_dir.parent, 0o700)
    spec.state_dir.mkdir(exist_ok=True)
    os.chmod(spec.state_dir, 0o711)
    for entry in os.scandir(spec.state_dir):
        if entry.name in KEPT:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # rmtree works from fds, following nothing
        else:
            os.unlink(entry.path)


KEPT = frozenset({"executor.sock", "secret"})
"""What the server itself keeps in a state folder."""


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
    async def pty_open(self, *, cols: int, rows: int, listener: PtyListener) -> int:
        """Open an interactive terminal (a login `bash` in /workspace); returns its id in the sandbox.

        `listener` hears its output and its end; the terminal ends with this server's connection.
        """

    @abc.abstractmethod
    async def pty_input(self, tid: int, data: bytes) -> None:
        """Write `data` (at most 64 KiB) to the terminal, as typed."""

    @abc.abstractmethod
    async def pty_resize(self, tid: int, *, cols: int, rows: int) -> None:
        """Change the terminal's window size (its program gets SIGWINCH)."""

    @abc.abstractmethod
    async def pty_close(self, tid: int, *, grace: float) -> int | None:
        """SIGHUP every process the terminal started, SIGKILL after `grace`; its exit code if known."""

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

    def files(self, *, max_read_bytes: int) -> Files:
        """The workspace's files, served from inside this sandbox (`crogia.sandbox.files.Files`)."""
        raise NotImplementedError(f"the {self.backend} backend serves no files from its sandboxes")

    async def set_egress(self, policy: EgressPolicy) -> None:
        """Apply `policy` to new connections now, and keep it (in `spec`) for every later start."""
        self.spec = replace(self.spec, egress=policy)


class SandboxProvider(abc.ABC):
    """Creates, finds and cleans up sandboxes of one backend."""

    name: ClassVar[str]
    egress_policies: ClassVar[bool] = False
    """Whether its isolated sandboxes enforce `none` and `allow` egress policies."""
    egress_listener: Callable[[str, str], None] | None = None
    """Told (session id, destination) of each refused egress, rate-limited per sandbox."""

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
