"""Sessions: a workspace folder plus a sandbox, recorded in the store and kept alive across restarts."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from crogia.bus import EventBus
from crogia.config import Settings
from crogia.errors import Conflict, CrogiaError, NotFound
from crogia.sandbox import limits_from
from crogia.sandbox.base import Sandbox, SandboxProvider, SandboxSpec, SandboxStatus
from crogia.services.pool import SandboxPool
from crogia.store import Database, repo
from crogia.store.tables import SessionRow
from crogia.workspace import Workspace

log = logging.getLogger(__name__)

SandboxHook = Callable[["LiveSession"], Awaitable[None]]


@dataclass(eq=False)
class LiveSession:
    """A session whose sandbox this server holds a connection to."""

    id: str
    tenant: str
    sandbox: Sandbox
    workspace: Workspace
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionService:
    """Creates, finds, re-attaches and deletes sessions."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        bus: EventBus,
        provider: SandboxProvider,
        pool: SandboxPool | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.provider = provider
        self.pool = pool
        """Pre-started sandboxes that `create` claims instead of booting one (SANDBOX_POOL_SIZE)."""
        self._live: dict[str, LiveSession] = {}
        self.on_sandbox: list[SandboxHook] = []
        """Called whenever a session's sandbox is created or re-attached (process exit wiring)."""

    # --- lookups ---

    async def get(self, session_id: str, *, tenant: str | None) -> SessionRow:
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id=session_id, tenant=tenant)
        if row is None:
            raise NotFound(f"Session {session_id} not found.", session_id=session_id)
        return row

    async def list(self, *, tenant: str | None) -> list[SessionRow]:
        async with self.db.session() as db:
            return list(await repo.list_sessions(db, tenant=tenant))

    async def live(self, session_id: str, *, tenant: str | None) -> LiveSession:
        """The running session, or NotFound (unknown / other tenant) or Conflict (not running)."""
        live = self._live.get(session_id)
        if live is None or (tenant is not None and live.tenant != tenant):
            row = await self.get(session_id, tenant=tenant)
            raise Conflict(f"Session {row.id} is {row.status}; its sandbox is not running.")
        return live

    def live_count(self) -> int:
        return len(self._live)

    def peek(self, session_id: str) -> LiveSession | None:
        return self._live.get(session_id)

    async def container_status(self, session_id: str) -> SandboxStatus:
        live = self._live.get(session_id)
        if live is None:
            return "unknown"
        try:
            return await live.sandbox.status()
        except Exception:
            log.warning("status of sandbox for session %s failed", session_id, exc_info=True)
            return "unknown"

    async def touch(self, session_id: str, **values: Any) -> None:
        async with self.db.transaction() as db:
            await repo.touch_session(db, session_id=session_id, **values)

    # --- create / delete ---

    def spec_for(self, session_id: str, *, tenant: str, image: str, env: Mapping[str, str]) -> SandboxSpec:
        return SandboxSpec(
            session_id=session_id,
            workspace=self.settings.workspaces_dir / session_id,
            state_dir=self.settings.sandbox_state_dir / session_id,
            image=image,
            limits=limits_from(self.settings),
            env=dict(env),
            labels={"crogia.tenant": tenant},
        )

    async def create(
        self, *, tenant: str, label: str, image: str | None, env: Mapping[str, str], metadata: dict[str, Any]
    ) -> SessionRow:
        session_id = str(uuid.uuid4())
        spec = self.spec_for(
            session_id, tenant=tenant, image=image or self.settings.docker_base_image, env=env
        )
        sandbox: Sandbox | None = None
        try:
            sandbox = await self._new_sandbox(spec)
            row = SessionRow(
                id=session_id,
                tenant=tenant,
                label=label,
                last_task="",
                status="active",
                sandbox_backend=self.provider.name,
                sandbox_id=sandbox.id,
                image=spec.image,
                env=dict(env),
                meta=metadata,
            )
            async with self.db.transaction() as db:
                db.add(row)
            await self._go_live(LiveSession(session_id, tenant, sandbox, self._workspace(spec)))
        except BaseException:
            # A half-made session leaves nothing behind: no container, no row, no folder.
            await self._discard(session_id, spec, sandbox)
            raise
        log.info("session %s created on %s sandbox %s", session_id, self.provider.name, sandbox.id)
        return row

    async def delete(self, session_id: str, *, tenant: str | None) -> None:
        row = await self.get(session_id, tenant=tenant)
        live = self._live.pop(session_id, None)
        if live is not None:
            try:
                await live.sandbox.destroy()
            except Exception:
                log.warning("destroying sandbox of session %s failed", session_id, exc_info=True)
        if row.sandbox_id or live is not None:
            # Also tells the provider to forget it (idempotent when already gone).
            await self.provider.remove(live.sandbox.id if live is not None else row.sandbox_id)
        async with self.db.transaction() as db:
            await repo.delete_session(db, session_id=session_id)
        self.bus.drop_session(session_id)
        spec = self.spec_for(session_id, tenant=row.tenant, image=row.image, env=row.env)
        await anyio.to_thread.run_sync(_remove_dirs, spec, self.settings.workspace_retention == "delete")
        log.info("session %s deleted", session_id)

    # --- start-up / shutdown ---

    async def reconcile(self) -> None:
        """Give every stored session its sandbox back; remove managed sandboxes no session owns."""
        rows = await self.list(tenant=None)
        limit = asyncio.Semaphore(8)

        async def attach(row: SessionRow) -> None:
            async with limit:
                await self._attach(row)

        await asyncio.gather(*(attach(row) for row in rows))
        owned = {live.sandbox.id for live in self._live.values()}
        try:
            managed = await self.provider.managed_ids()
        except CrogiaError as exc:
            log.warning("could not look for orphan sandboxes: %s", exc.message)
            return
        for sandbox_id in managed:
            if sandbox_id not in owned:
                log.info("removing orphan sandbox %s", sandbox_id)
                await self.provider.remove(sandbox_id)

    async def close(self) -> None:
        """Drop connections; sandboxes keep running for the next start (Docker), or die with us (bwrap)."""
        lives, self._live = list(self._live.values()), {}
        for live in lives:
            try:
                await live.sandbox.close()
            except Exception:
                log.warning("closing sandbox connection of %s failed", live.id, exc_info=True)

    # --- helpers ---

    async def _new_sandbox(self, spec: SandboxSpec) -> Sandbox:
        """A pooled sandbox moved onto `spec`'s folders when the pool serves it, else a new one."""
        if self.pool is not None and self.pool.serves(spec):
            claimed = await self.pool.claim(spec)
            if claimed is not None:
                return claimed
        await anyio.to_thread.run_sync(_make_dirs, spec)
        return await self.provider.create(spec)

    def _workspace(self, spec: SandboxSpec) -> Workspace:
        return Workspace(spec.workspace, max_read_bytes=self.settings.file_read_max_bytes)

    async def _go_live(self, live: LiveSession) -> None:
        self._live[live.id] = live
        for hook in self.on_sandbox:
            await hook(live)

    async def _attach(self, row: SessionRow) -> None:
        spec = self.spec_for(row.id, tenant=row.tenant, image=row.image, env=row.env)
        try:
            await anyio.to_thread.run_sync(_make_dirs, spec)
            sandbox = await self.provider.attach(spec, row.sandbox_id)
        except Exception as exc:
            log.error("session %s: sandbox could not be re-attached: %s", row.id, exc)
            await self.touch(row.id, status="stopped")
            return
        if sandbox.id != row.sandbox_id or row.status != "active":
            await self.touch(
                row.id, sandbox_id=sandbox.id, status="active", sandbox_backend=self.provider.name
            )
        await self._go_live(LiveSession(row.id, row.tenant, sandbox, self._workspace(spec)))

    async def _discard(self, session_id: str, spec: SandboxSpec, sandbox: Sandbox | None) -> None:
        self._live.pop(session_id, None)
        if sandbox is not None:
            try:
                await sandbox.destroy()
                await self.provider.remove(sandbox.id)
            except Exception:
                log.warning("clean-up of half-made sandbox %s failed", sandbox.id, exc_info=True)
        try:
            async with self.db.transaction() as db:
                await repo.delete_session(db, session_id=session_id)
        except Exception:
            log.warning("clean-up of half-made session row %s failed", session_id, exc_info=True)
        await anyio.to_thread.run_sync(_remove_dirs, spec, True)


def _make_dirs(spec: SandboxSpec) -> None:
    spec.workspace.mkdir(parents=True, exist_ok=True)
    (spec.state_dir / "logs").mkdir(parents=True, exist_ok=True)


def _remove_dirs(spec: SandboxSpec, workspace_too: bool) -> None:
    shutil.rmtree(spec.state_dir, ignore_errors=True)
    if workspace_too:
        shutil.rmtree(spec.workspace, ignore_errors=True)
