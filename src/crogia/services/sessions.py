"""Sessions: a workspace folder plus a sandbox, recorded in the store and kept alive across restarts.

A session idle for SESSION_IDLE_TTL has its sandbox stopped (`sleep`, called by the idle reaper);
the next request that needs it starts it again (`live`). Sessions stopped before a restart stay
stopped until then. Activity is kept in memory (`LiveSession.touch`) and written to the store in
batches (`flush_activity`). With SANDBOX_DISK_MB, each workspace is its own size-limited disk.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio

from crogia.bus import EventBus
from crogia.config import Settings
from crogia.errors import CrogiaError, NotFound
from crogia.sandbox import limits_from
from crogia.sandbox.base import Sandbox, SandboxProvider, SandboxSpec, SandboxStatus, make_dirs
from crogia.sandbox.quota import WorkspaceDisks
from crogia.services.live import LiveSession as LiveSession
from crogia.services.pool import SandboxPool
from crogia.services.quotas import SessionQuotas, capped
from crogia.store import Database, repo
from crogia.store.tables import SessionRow
from crogia.workspace import Workspace

log = logging.getLogger(__name__)

SandboxHook = Callable[["LiveSession"], Awaitable[None]]


class SessionService:
    """Creates, finds, re-attaches and deletes sessions."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        bus: EventBus,
        provider: SandboxProvider,
        pool: SandboxPool | None = None,
        disks: WorkspaceDisks | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.provider = provider
        self.pool = pool
        """Pre-started sandboxes that `create` claims instead of booting one (SANDBOX_POOL_SIZE)."""
        self.disks = disks or WorkspaceDisks(settings.data_dir / "disks", settings.sandbox_disk_mb)
        """Workspace quotas (SANDBOX_DISK_MB), shared with the pool."""
        self._live: dict[str, LiveSession] = {}
        self._dormant: set[str] = set()
        """Sessions stopped before this server started: their sandbox starts on first use."""
        self._reviving: dict[str, asyncio.Lock] = {}
        self.on_sandbox: list[SandboxHook] = []
        """Called whenever a session's sandbox is created or re-attached (process exit wiring)."""
        self.quotas = SessionQuotas(settings, db)

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
        """The session with its sandbox running (started again if it was stopped); counts as activity.

        NotFound for an unknown session or another tenant's; the backend's error (Unavailable,
        SandboxError) when a stopped sandbox cannot be started.
        """
        live = self._live.get(session_id)
        if live is None or (tenant is not None and live.tenant != tenant):
            live = await self._revive(await self.get(session_id, tenant=tenant))
        if live.asleep:
            await self._wake(live)
        live.touch()
        return live

    def live_count(self) -> int:
        """Sessions whose sandbox runs."""
        return sum(1 for live in self._live.values() if not live.asleep)

    def awake(self) -> Sequence[LiveSession]:
        return [live for live in self._live.values() if not live.asleep]

    def peek(self, session_id: str) -> LiveSession | None:
        return self._live.get(session_id)

    async def container_status(self, session_id: str) -> SandboxStatus:
        live = self._live.get(session_id)
        if live is None:
            return "exited" if session_id in self._dormant else "unknown"
        try:
            return await live.sandbox.status()
        except Exception:
            log.warning("status of sandbox for session %s failed", session_id, exc_info=True)
            return "unknown"

    async def touch(self, session_id: str, **values: Any) -> None:
        async with self.db.transaction() as db:
            await repo.touch_session(db, session_id=session_id, **values)

    async def flush_activity(self) -> None:
        """Write `last_active` of the sessions used since the last flush to the store, in one go."""
        changed = [
            (live, live.last_active) for live in self._live.values() if live.last_active > live.flushed
        ]
        if not changed:
            return
        async with self.db.transaction() as db:
            for live, when in changed:
                await repo.touch_session(db, session_id=live.id, last_activity=_utc(when))
        for live, when in changed:
            live.flushed = max(live.flushed, when)

    # --- idle stop / start again ---

    async def sleep(self, live: LiveSession, *, idle_for: float) -> bool:
        """Stop the sandbox of a session unused for `idle_for` seconds; False if it was used meanwhile."""
        async with live.lock:
            idle = time.time() - live.last_active >= idle_for and not live.busy
            if live.asleep or not idle or self._live.get(live.id) is not live:
                return False
            live.asleep = True
            try:
                await live.sandbox.stop()
            except Exception:  # the start on next use sorts out whatever state it is in
                log.warning("stopping the sandbox of idle session %s failed", live.id, exc_info=True)
            await self.touch(live.id, status="stopped", last_activity=_utc(live.last_active))
            live.flushed = live.last_active
        log.info("session %s idle for %.0f s: sandbox %s stopped", live.id, idle_for, live.sandbox.id)
        return True

    async def _wake(self, live: LiveSession) -> None:
        async with live.lock:
            if not live.asleep:
                return
            spec = live.sandbox.spec
            await self.disks.ensure(live.id, spec.workspace)
            live.sandbox = await self.provider.attach(spec, live.sandbox.id)
            live.asleep = False
            live.touch()
            await self.touch(live.id, status="active", sandbox_id=live.sandbox.id)
            for hook in self.on_sandbox:
                await hook(live)
        log.info("session %s: sandbox %s started again", live.id, live.sandbox.id)

    async def _revive(self, row: SessionRow) -> LiveSession:
        """A session this server holds no sandbox for (stopped before a restart, or re-attach failed)."""
        async with self._reviving.setdefault(row.id, asyncio.Lock()):
            live = self._live.get(row.id)
            if live is None:
                live = await self._bring_up(row)
                log.info("session %s: sandbox %s started again", row.id, live.sandbox.id)
        return live

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

    @capped  # MAX_SESSIONS, MAX_SESSIONS_PER_TENANT, SANDBOX_IMAGES
    async def create(
        self, *, tenant: str, label: str, image: str | None, env: Mapping[str, str], metadata: dict[str, Any]
    ) -> SessionRow:
        spec = self.spec_for(
            str(uuid.uuid4()), tenant=tenant, image=image or self.settings.docker_base_image, env=env
        )
        sandbox: Sandbox | None = None
        try:
            sandbox = await self._new_sandbox(spec)
            spec = sandbox.spec  # a pooled sandbox brings the session id it was made for
            session_id = spec.session_id
            row = SessionRow(
                id=session_id,
                tenant=tenant,
                label=label,
                last_task=label,  # until the first task replaces it, as the original server did
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
            await self._discard(spec.session_id, spec, sandbox)
            raise
        log.info("session %s created on %s sandbox %s", session_id, self.provider.name, sandbox.id)
        return row

    async def delete(self, session_id: str, *, tenant: str | None) -> None:
        row = await self.get(session_id, tenant=tenant)
        live = self._live.pop(session_id, None)
        self._dormant.discard(session_id)
        self._reviving.pop(session_id, None)
        if live is not None:
            async with live.lock:  # not in the middle of a stop or a start
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
        workspace_too = self.settings.workspace_retention == "delete"
        if workspace_too:
            await self.disks.remove(session_id, spec.workspace)
        else:  # a kept workspace with a quota is its image, disks/<id>.ext4
            await self.disks.release(spec.workspace)
        await anyio.to_thread.run_sync(_remove_dirs, spec, workspace_too)
        log.info("session %s deleted", session_id)

    # --- start-up / shutdown ---

    async def reconcile(self) -> None:
        """Give every active session its sandbox back; remove managed sandboxes no session owns.

        Sessions stopped for idleness stay stopped until a request needs them.
        """
        await self.disks.probe()
        rows = await self.list(tenant=None)
        limit = asyncio.Semaphore(8)

        async def attach(row: SessionRow) -> None:
            async with limit:
                await self._attach(row)

        self._dormant.update(row.id for row in rows if row.status == "stopped")
        await asyncio.gather(*(attach(row) for row in rows if row.status != "stopped"))
        owned = {live.sandbox.id for live in self._live.values()}
        owned |= {row.sandbox_id for row in rows if row.id in self._dormant}
        try:
            managed = await self.provider.managed_ids()
        except CrogiaError as exc:
            log.warning("could not look for orphan sandboxes: %s", exc.message)
            managed = []
        for sandbox_id in managed:
            if sandbox_id not in owned:
                log.info("removing orphan sandbox %s", sandbox_id)
                await self.provider.remove(sandbox_id)
        if self.pool is not None:  # the previous server's unclaimed pool sandboxes: their folders go too
            await self.pool.sweep({row.id for row in rows})

    async def close(self) -> None:
        """Drop connections; sandboxes keep running for the next start (Docker), or die with us (bwrap)."""
        lives, self._live = list(self._live.values()), {}
        for live in lives:
            try:
                await live.sandbox.close()
            except Exception:
                log.warning("closing sandbox connection of %s failed", live.id, exc_info=True)
        # A running container keeps its own view of the disk; the next start mounts it again first.
        for live in lives:
            await self.disks.release(live.workspace.root)

    # --- helpers ---

    async def _new_sandbox(self, spec: SandboxSpec) -> Sandbox:
        """A pooled sandbox when the pool serves `spec`, else a new one.

        A pooled sandbox was made for a session id of its own, with its folders: it keeps them, and
        takes `spec` for the rest (labels, tenant).
        """
        if self.pool is not None and self.pool.serves(spec):
            claimed = await self.pool.claim()
            if claimed is not None:
                own = claimed.spec
                claimed.spec = replace(
                    spec, session_id=own.session_id, workspace=own.workspace, state_dir=own.state_dir
                )
                return claimed
        await anyio.to_thread.run_sync(make_dirs, spec)
        await self.disks.ensure(spec.session_id, spec.workspace)
        return await self.provider.create(spec)

    def _workspace(self, spec: SandboxSpec) -> Workspace:
        return Workspace(spec.workspace, max_read_bytes=self.settings.file_read_max_bytes)

    async def _go_live(self, live: LiveSession) -> None:
        self._live[live.id] = live
        for hook in self.on_sandbox:
            await hook(live)

    async def _attach(self, row: SessionRow) -> None:
        try:
            await self._bring_up(row)
        except Exception as exc:
            log.error("session %s: sandbox could not be re-attached: %s", row.id, exc)
            await self.touch(row.id, status="stopped", last_activity=row.last_activity)
            self._dormant.add(row.id)

    async def _bring_up(self, row: SessionRow) -> LiveSession:
        """Start (or re-create) a stored session's sandbox around its kept workspace."""
        spec = self.spec_for(row.id, tenant=row.tenant, image=row.image, env=row.env)
        await anyio.to_thread.run_sync(make_dirs, spec)
        await self.disks.ensure(row.id, spec.workspace)
        sandbox = await self.provider.attach(spec, row.sandbox_id)
        if sandbox.id != row.sandbox_id or row.status != "active":
            await self.touch(
                row.id,
                sandbox_id=sandbox.id,
                status="active",
                sandbox_backend=self.provider.name,
                last_activity=row.last_activity,  # being started again is not activity
            )
        active = row.last_activity.timestamp()
        live = LiveSession(
            row.id, row.tenant, sandbox, self._workspace(spec), last_active=active, flushed=active
        )
        self._dormant.discard(row.id)
        await self._go_live(live)
        return live

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
        await self.disks.remove(session_id, spec.workspace)
        await anyio.to_thread.run_sync(_remove_dirs, spec, True)


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _remove_dirs(spec: SandboxSpec, workspace_too: bool) -> None:
    shutil.rmtree(spec.state_dir, ignore_errors=True)
    if workspace_too:
        shutil.rmtree(spec.workspace, ignore_errors=True)
