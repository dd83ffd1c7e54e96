"""The sandbox interface: one session's isolated place to run commands.

A backend implements a few private hooks (`_start`, `_stop`, `_destroy`, `_status`);
the public methods do the shared checks once. Commands, background processes and
process logs all go through a small executor daemon that lives inside the sandbox
(see `crogia.sandbox.executor`), so the same client code serves every backend and a
sandbox need not live on the server's own machine.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from crogia.errors import SandboxError
from crogia.sandbox.egress import EgressPolicy

if TYPE_CHECKING:
    from crogia.sandbox.files import Files
    from crogia.sandbox.pty_channel import PtyListener
    from crogia.sandbox.quota import WorkspaceDisks
    from crogia.sandbox.tunnel_socket import AnyTunnel

log = logging.getLogger(__name__)

WORKDIR = "/workspace"
"""Where the session's workspace appears inside every sandbox."""

STATE_MOUNT = "/run/crogia"
"""The sandbox's own state: a size-limited tmpfs (`Limits.state_mb`) holding process logs."""

CHANNEL_MOUNT = "/run/crogia-channel"
"""Where a sandbox that dials its server (Docker) sees `SandboxSpec.state_dir`, read-only."""

POOL_MARKERS = ".pool"
"""The folder (in the state root) of the pool's markers."""

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
    image: str = "crogia-sandbox:latest"
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    """The session's egress policy (`crogia.sandbox.egress`); isolated networks only."""


@dataclass(frozen=True, slots=True)
class HostPaths:
    """A local sandbox's host folders, which its provider derives from the session id."""

    workspace: Path
    """Host folder bound read-write at `/workspace` (unused when the workspace is a Docker volume)."""
    state_dir: Path
    """Server-only host folder for the channel (Docker: socket and secret, bound read-only at
    `CHANNEL_MOUNT`; tcp: the secret's copy); nothing in it is the sandbox's to write."""


@dataclass(frozen=True, slots=True)
class HostStorage:
    """Where a local provider keeps its sandboxes' folders: `<workspaces>/<id>` and `<states>/<id>`,
    and (SANDBOX_DISK_MB) the size-limited disk image each workspace is the mount point of."""

    workspaces: Path
    states: Path
    disks: WorkspaceDisks | None = None

    def paths(self, session_id: str) -> HostPaths:
        return HostPaths(self.workspaces / session_id, self.states / session_id)


_REMOVALS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="crogia-remove")
"""Threads of their own for removing workspaces. A sandbox decides how many files its workspace
holds, and a removal walks every one (a million took ~36 s here): on the loop's default executor
(min(32, cores + 4) threads, shared with every sandbox start, cgroup and namespace step) a few such
deletes at once left no thread for anyone else. Here they take turns with each other only."""


def make_dirs(paths: HostPaths) -> None:
    """Create the host folders of a sandbox (blocking): its workspace, and its server-only state folder.

    The state folder's parent is the server's alone (0700); the folder itself only traversable by
    others (0711: a remapped container root must reach the socket). What an older version let a
    sandbox write there (logs, planted links) is removed without following anything.
    """
    paths.workspace.mkdir(parents=True, exist_ok=True)
    close_to_others(paths.workspace.parent)  # what a sandbox makes there is no host user's to use
    paths.state_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.state_dir.parent, 0o700)
    paths.state_dir.mkdir(exist_ok=True)
    os.chmod(paths.state_dir, 0o711)
    for entry in os.scandir(paths.state_dir):
        if entry.name in KEPT:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # rmtree works from fds, following nothing
        else:
            os.unlink(entry.path)


def _state_folders(states: Path) -> list[str]:
    """The session ids that have a state folder (blocking): real folders named as a session id."""
    with contextlib.suppress(FileNotFoundError):
        return [
            entry.name
            for entry in os.scandir(states)
            if entry.is_dir(follow_symlinks=False) and is_session_id(entry.name)
        ]
    return []


def is_session_id(name: str) -> bool:
    """Whether `name` is spelled as the server makes session ids (a uuid's canonical form)."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


KEPT = frozenset({"executor.sock", "secret", "tcp-secret"})
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


@dataclass(frozen=True, slots=True)
class PortState:
    """A TCP port something listens on inside a sandbox."""

    port: int
    address: str
    pid: int | None
    pgid: int | None = None
    """The owner's process group: a background process's pid when it (or a child of it) listens."""


class Sandbox(abc.ABC):
    """One session's sandbox. Obtain it from a `SandboxProvider`; never construct directly."""

    backend: ClassVar[str]

    def __init__(self, spec: SandboxSpec, sandbox_id: str, paths: HostPaths) -> None:
        self.spec = spec
        self.id = sandbox_id
        self.paths = paths
        """Its host folders (the provider's, derived from the session id)."""

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
        """Write `data` to the terminal, as typed (waits while the terminal is not taking input)."""

    @abc.abstractmethod
    async def pty_resize(self, tid: int, *, cols: int, rows: int) -> None:
        """Change the terminal's window size (its program gets SIGWINCH)."""

    @abc.abstractmethod
    async def pty_close(self, tid: int, *, grace: float) -> int | None:
        """SIGHUP every process the terminal started, SIGKILL after `grace`; its exit code if known."""

    @abc.abstractmethod
    async def ports(self, *, owners: bool = True) -> list[PortState]:
        """The TCP ports something listens on inside the sandbox (with its pid when `owners` and known)."""

    @abc.abstractmethod
    async def open_tunnel(self, port: int, *, hand_over: bool = False) -> AnyTunnel:
        """A byte stream to 127.0.0.1:`port` inside the sandbox, through its executor's channel.

        Returns as soon as it is asked for (bytes written meanwhile follow the connection); its
        `connected()` raises `CrogiaError` (code `refused`) when nobody listens there. With
        `hand_over`, where the channel can, the daemon connects first and hands the socket itself
        over (`tunnel_socket`; then this raises that error itself).
        """

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

    def files(self, *, max_read_bytes: int, timeout: float = 60.0) -> Files:
        """The workspace's files, served from inside this sandbox (`crogia.sandbox.files.Files`).

        `timeout` (FILES_TIMEOUT): seconds any one wait on the sandbox may last without progress."""
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

    transport: str = "unix"
    """How the server reaches its sandboxes' daemons (`unix` or `tcp`), for /api/health."""
    tls: bool = False
    """TLS on the TCP channel (SANDBOX_TCP_TLS)."""
    storage: HostStorage | None = None
    """Where its sandboxes' host folders are (a local provider's; set from the settings)."""

    def paths(self, session_id: str) -> HostPaths:
        """The session's host folders, derived from its id."""
        if self.storage is None:
            raise SandboxError(f"the {self.name} provider was made without host storage")
        return self.storage.paths(session_id)

    def workdir(self, session_id: str) -> str:
        """What names the session's workspace when it is no host folder (a Docker volume); else ""."""
        return ""

    async def prepare(self, session_id: str) -> HostPaths:
        """Make the session's host folders and mount its disk image, if any (before its sandbox is
        created or started again; `create` does it)."""
        paths = self.paths(session_id)
        await asyncio.to_thread(make_dirs, paths)
        if self.storage is not None and self.storage.disks is not None:
            await self.storage.disks.ensure(session_id, paths.workspace)
        return paths

    async def release(self, session_id: str) -> None:
        """Unmount the session's disk image, if any (a kept workspace, or the server going); it stays."""
        if self.storage is not None and self.storage.disks is not None:
            await self.storage.disks.release(self.paths(session_id).workspace)

    async def remove_workspace(self, session_id: str) -> None:
        """Remove the session's workspace: its disk image and host folder, or what the provider keeps
        instead (a Docker volume)."""
        if self.storage is None:
            return
        workspace = self.paths(session_id).workspace
        if self.storage.disks is not None:
            await self.storage.disks.remove(session_id, workspace)
        await asyncio.get_running_loop().run_in_executor(_REMOVALS, shutil.rmtree, workspace, True)

    def mark_pooled(self, session_id: str, pooled: bool = True) -> None:
        """Record (or drop) that the session's folders belong to an unclaimed pool sandbox: an empty
        marker `<states>/.pool/<id>`, never mounted in a sandbox (blocking)."""
        markers = self._markers()
        if pooled:
            markers.mkdir(parents=True, exist_ok=True)
            (markers / session_id).touch()
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(markers / session_id)

    def pooled(self) -> list[str]:
        """Session ids marked by `mark_pooled` (blocking)."""
        with contextlib.suppress(FileNotFoundError):
            return os.listdir(self._markers())
        return []

    def _markers(self) -> Path:
        if self.storage is None:
            raise SandboxError(f"the {self.name} provider was made without host storage")
        return self.storage.states / POOL_MARKERS

    async def sweep_workspaces(self, sessions: Collection[str], *, keep: bool = False) -> None:
        """Remove what a crash left of sessions not in `sessions`: their state folders, and their
        workspaces unless `keep` (WORKSPACE_RETENTION=keep; an unclaimed pool sandbox's goes anyway,
        it was never a session's). Call at start-up, before anything makes new sandboxes.

        Only ids with a state folder count: the server makes one (in its own 0700 folder) with
        every workspace, so a folder someone else put beside the workspaces is never touched."""
        if self.storage is None:
            return
        pooled = set(await asyncio.to_thread(self.pooled))
        for session_id in await asyncio.to_thread(_state_folders, self.storage.states):
            if session_id in sessions:
                continue
            log.info("removing what a crash left of session %s (its row is gone)", session_id)
            if keep and session_id not in pooled:
                await self.release(session_id)
            else:
                await self.remove_workspace(session_id)
            await self.forget(session_id)
            if session_id in pooled:
                await asyncio.to_thread(self.mark_pooled, session_id, False)

    async def forget(self, session_id: str) -> None:
        """Remove the session's server-only state folder (the session is gone, or never was)."""
        if self.storage is not None:
            await asyncio.to_thread(shutil.rmtree, self.paths(session_id).state_dir, True)

    async def userns_mode(self) -> str:
        """What sandbox root is on the host, for /api/health: "off" means the host's root."""
        return "off"

    async def seccomp_mode(self) -> str:
        """Which seccomp filter sandboxes run under, for /api/health ("off": none)."""
        return "off"
