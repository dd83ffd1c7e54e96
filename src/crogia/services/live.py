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
from crogia.workspace import Workspace

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
    workspace: Workspace
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
