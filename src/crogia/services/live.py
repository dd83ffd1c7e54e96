"""A session as this server holds it: its sandbox, its workspace and when it was last used."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from crogia.sandbox.base import Sandbox
from crogia.workspace import Workspace


@dataclass(eq=False)
class LiveSession:
    """A session whose sandbox this server holds: running, or stopped for idleness (`asleep`).

    The object lives as long as the session on this server, so holders (a task worker, the
    agent's tool host) keep working across a stop and start: they read `sandbox` at each use.
    """

    id: str
    tenant: str
    sandbox: Sandbox
    workspace: Workspace
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the sandbox is stopped or started again."""
    last_active: float = field(default_factory=time.time)
    """When it was last used (epoch seconds): a request, a command or a task ending."""
    flushed: float = 0.0
    """The `last_active` last written to the store."""
    busy: int = 0
    """Commands in flight: a long command or a log follow keeps the session awake."""
    asleep: bool = False

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
