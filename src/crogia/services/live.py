"""A session as this server holds it: its state, its sandbox (while it has one), its workspace, its use."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from crogia.errors import Unavailable
from crogia.sandbox.base import Sandbox, SandboxSpec
from crogia.sandbox.files import Files, FilesMode
from crogia.workspace import HostFiles

State = Literal["creating", "running", "asleep", "dormant", "deleting", "gone"]
"""Where a session is in its life on this server (see `crogia.services.lifecycle`)."""


@dataclass(eq=False)
class LiveSession:
    """One session this server knows, in exactly one `state`; `crogia.services.lifecycle` changes it.

    The object lives as long as the session on this server, so holders (a task worker, the
    agent's tool host) keep working across a stop and start: they read `sandbox` at each use.
    """

    id: str
    tenant: str
    spec: SandboxSpec
    """What its sandbox is made from (image, folders, limits, labels)."""
    host_files: HostFiles | None
    """Its files on the host folder (`SANDBOX_FILES=host`); None: its sandbox's daemon serves them."""
    state: State = "creating"
    sandbox_id: str = ""
    """The backend's id of its sandbox (kept while stopped: Docker starts the same container again)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by every transition that waits (a start, a stop, a delete): one at a time."""
    last_active: float = field(default_factory=time.time)
    """When it was last used (epoch seconds): a request, a command or a task ending."""
    flushed: float = 0.0
    """The `last_active` last written to the store."""
    busy: int = 0
    """Commands in flight: a long command or a log follow keeps the session awake."""
    _sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        """Its sandbox handle; Unavailable while it has none (not created yet, stopped before a restart)."""
        if self._sandbox is None:
            raise Unavailable(f"The sandbox of session {self.id} is not running.", session_id=self.id)
        return self._sandbox

    @sandbox.setter
    def sandbox(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self.sandbox_id = sandbox.id

    max_read_bytes: int = 10_485_760
    """FILE_READ_MAX_BYTES, for files its daemon serves."""
    files_timeout: float = 60.0
    """FILES_TIMEOUT, for files its daemon serves."""

    @property
    def files(self) -> Files:
        """Its files, by SANDBOX_FILES: the host folder, or its running sandbox's daemon."""
        if self.host_files is not None:
            return self.host_files
        return self.sandbox.files(max_read_bytes=self.max_read_bytes, timeout=self.files_timeout)

    @property
    def files_mode(self) -> FilesMode:
        return "host" if self.host_files is not None else "daemon"

    @property
    def has_sandbox(self) -> bool:
        return self._sandbox is not None

    @property
    def asleep(self) -> bool:
        """Not running: its sandbox is stopped (or not up yet) and the next use starts it."""
        return self.state != "running"

    def touch(self) -> None:
        self.last_active = time.time()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Counts as activity for as long as it lasts."""
        self.busy += 1
        self.touch()
        try:
            yield
        finally:
            self.busy -= 1
            self.touch()
