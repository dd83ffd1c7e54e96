"""One state machine per session: the only code that brings a sandbox up, stops it, or lets it go.

    creating ──────> running <──────> asleep          dormant ──> running
        │               │               │                │
        └───────────────┴──> deleting <─┴────────────────┘
                                │
                                v
                              gone

- `creating`: `SessionService.create` makes (or claims from the pool) its sandbox and row.
- `running <-> asleep`: the idle reaper stops an unused sandbox (`sleep`); the next request that
  needs it starts it again (`running`).
- `dormant`: known from the store at start-up but without a sandbox on this server (stopped
  before the restart, or its re-attach failed); the next request that needs it starts it.
- `deleting`: entered at once, without waiting, when a delete starts; from then on every lookup
  is a 404 and nothing starts the sandbox again. `gone`: deleted; the id stays known as deleted.

Each session has one lock, held by every transition that waits (a start, a stop, a delete), so
transitions of one session never overlap. The hot path (`running` already) takes no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from crogia.errors import Conflict, NotFound
from crogia.sandbox.base import Sandbox, SandboxProvider
from crogia.services.live import LiveSession, State

log = logging.getLogger(__name__)

StopReason = Literal["idle", "deleted"]
SandboxHook = Callable[[LiveSession], Awaitable[None]]
StopHook = Callable[[LiveSession, StopReason], Awaitable[None]]
Record = Callable[..., Awaitable[None]]
"""`record(session_id, **columns)`: one update of the session's row."""

MOVES: dict[State, frozenset[State]] = {
    "creating": frozenset({"running", "deleting"}),
    "running": frozenset({"asleep", "deleting"}),
    "asleep": frozenset({"running", "deleting"}),
    "dormant": frozenset({"running", "deleting"}),
    "deleting": frozenset({"gone"}),
    "gone": frozenset(),
}
"""Every transition there is; anything else is a bug and raises."""
GONE_MEMORY = 10_000
"""Deleted session ids remembered, so a late request for one is a 404 without a database lookup."""


class Lifecycle:
    """The sessions this server knows, each in one state, and the transitions between them."""

    def __init__(self, provider: SandboxProvider, record: Record) -> None:
        self.provider = provider
        self._record = record
        """Writes a session's row (its `status`: `active` while running, `stopped` otherwise)."""
        self._sessions: dict[str, LiveSession] = {}
        self._gone: dict[str, None] = {}
        self.get = self._sessions.get
        """The session with this id this server tracks, or None (the dict's own `get`: the hot path)."""
        self.on_sandbox: list[SandboxHook] = []
        """Called whenever a session's sandbox comes up (created, started again, re-attached)."""
        self.on_stop: list[StopHook] = []
        """Called when a sandbox is about to stop: for idleness ("idle", under the session's lock,
        before the stop) or because the session is being deleted ("deleted", state `deleting`,
        before the sandbox is destroyed). Terminals and tasks of the session end here."""

    def known(self) -> list[LiveSession]:
        return list(self._sessions.values())

    def running(self) -> list[LiveSession]:
        return [live for live in self._sessions.values() if live.state == "running"]

    def deleted(self, session_id: str) -> bool:
        """Whether the session is being deleted or was deleted (requests for it are 404s)."""
        live = self._sessions.get(session_id)
        return session_id in self._gone or (live is not None and live.state in ("deleting", "gone"))

    def add(self, live: LiveSession) -> LiveSession:
        """Track a session (`creating`, or `dormant` from the store); the one already tracked wins."""
        if live.id in self._gone:
            raise NotFound(f"Session {live.id} not found.", session_id=live.id)
        return self._sessions.setdefault(live.id, live)

    def move(self, live: LiveSession, to: State) -> None:
        if to not in MOVES[live.state]:
            raise RuntimeError(f"session {live.id}: no transition {live.state} -> {to}")
        live.state = to

    async def up(self, live: LiveSession) -> LiveSession:
        """The session with its sandbox running: started here if asleep or dormant.

        NotFound once a delete has started; Conflict while it is still being created; the
        backend's error (Unavailable, SandboxError) when its sandbox cannot be started.
        """
        if live.state == "running":
            return live
        async with live.lock:
            await self._ensure_running(live)
        return live

    async def _ensure_running(self, live: LiveSession) -> None:
        """Under the lock: the state may have changed while the caller waited for it."""
        state = live.state
        if state in ("deleting", "gone"):
            raise NotFound(f"Session {live.id} not found.", session_id=live.id)
        if state == "creating":
            raise Conflict(f"Session {live.id} is still being created.", session_id=live.id)
        if state != "running":
            await self._start(live)

    async def _start(self, live: LiveSession) -> None:
        """Start (or re-create) the sandbox of an asleep or dormant session around its workspace."""
        spec = live.spec
        await self.provider.prepare(live.id)  # folders, and the workspace's disk (unmounted at shutdown)
        sandbox = await self.provider.attach(spec, live.sandbox_id)
        await self.came_up(live, sandbox)
        await self._record(
            live.id,
            status="active",
            sandbox_id=sandbox.id,
            sandbox_backend=self.provider.name,
            last_activity=_utc(live.last_active),  # being started again is not activity
        )
        log.info("session %s: sandbox %s started", live.id, sandbox.id)

    async def came_up(self, live: LiveSession, sandbox: Sandbox) -> None:
        """Record a sandbox that came up (under the lock): `running`, then the hooks."""
        live.sandbox = sandbox
        self.move(live, "running")
        for hook in self.on_sandbox:
            await hook(live)

    async def sleep(self, live: LiveSession, still_idle: Callable[[], bool]) -> bool:
        """Stop a running session's sandbox if `still_idle()` holds under the lock; whether it did."""
        async with live.lock:
            if live.state != "running" or not still_idle():
                return False
            for hook in self.on_stop:
                await _quietly(hook(live, "idle"), "an idle stop hook", live.id)
            self.move(live, "asleep")
            try:
                await live.sandbox.stop()
            except Exception:  # the start on next use sorts out whatever state it is in
                log.warning("stopping the sandbox of idle session %s failed", live.id, exc_info=True)
            await self._record(live.id, status="stopped", last_activity=_utc(live.last_active))
            live.flushed = live.last_active
        return True

    async def begin_delete(self, live: LiveSession) -> None:
        """Enter `deleting` at once (every later lookup is a 404), then destroy its sandbox."""
        if live.state in ("deleting", "gone"):
            raise NotFound(f"Session {live.id} not found.", session_id=live.id)
        self.move(live, "deleting")
        async with live.lock:  # an in-flight start or stop ends first
            for hook in self.on_stop:
                await _quietly(hook(live, "deleted"), "a delete hook", live.id)
            if live.has_sandbox:
                await _quietly(live.sandbox.destroy(), "destroying the sandbox", live.id)
            if live.sandbox_id:  # also tells the provider to forget it (idempotent when gone)
                await _quietly(self.provider.remove(live.sandbox_id), "removing the sandbox", live.id)

    def bury(self, live: LiveSession) -> None:
        """`deleting -> gone`: forgotten, but remembered as deleted."""
        self.move(live, "gone")
        self._sessions.pop(live.id, None)
        self._gone[live.id] = None
        if len(self._gone) > GONE_MEMORY:
            del self._gone[next(iter(self._gone))]

    def forget(self, live: LiveSession) -> None:
        """Drop a session that never came to be (a failed create): no tombstone, the id was never out."""
        if self._sessions.get(live.id) is live:
            del self._sessions[live.id]

    def drop_all(self) -> list[LiveSession]:
        """Shutdown: every tracked session, no longer tracked."""
        lives = list(self._sessions.values())
        self._sessions.clear()  # the same dict: `get` is its method
        return lives


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def _quietly(step: Awaitable[object], what: str, session_id: str) -> None:
    try:
        await step
    except Exception:
        log.warning("session %s: %s failed", session_id, what, exc_info=True)
