"""Sessions: a workspace folder plus a sandbox, recorded in the store and kept alive across restarts.

A session idle for SESSION_IDLE_TTL has its sandbox stopped (`sleep`, called by the idle reaper);
the next request that needs it starts it again (`live`). Sessions stopped before a restart stay
stopped until then. Activity is kept in memory (`LiveSession.touch`) and written to the store in
batches (`flush_activity`). With SANDBOX_DISK_MB, each workspace is its own size-limited disk.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from crogia.bus import EventBus
from crogia.config import Settings
from crogia.errors import Conflict, NotFound
from crogia.sandbox import limits_from
from crogia.sandbox.base import Sandbox, SandboxProvider, SandboxSpec, SandboxStatus
from crogia.sandbox.egress import EgressPolicy
from crogia.sandbox.network import mode_of
from crogia.sandbox.quota import WorkspaceDisks
from crogia.services.lifecycle import Lifecycle
from crogia.services.live import LiveSession as LiveSession
from crogia.services.pool import SandboxPool
from crogia.services.quotas import SessionQuotas, capped
from crogia.services.reconcile import reconcile
from crogia.store import Database, repo
from crogia.store.tables import SessionRow
from crogia.workspace import HostFiles

log = logging.getLogger(__name__)


class SessionService:
    """Creates, finds and deletes sessions; their liveness is `self.states` (the state machine)."""

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
        own = provider.storage.disks if provider.storage is not None else None
        self.disks = disks or own or WorkspaceDisks(settings.data_dir / "disks", 0)
        """Workspace quotas (SANDBOX_DISK_MB): the provider's, which mounts them (reconcile probes them)."""
        self.states = Lifecycle(provider, self.touch)
        self.on_sandbox = self.states.on_sandbox
        """Called whenever a session's sandbox is created or started again (process exit wiring)."""
        self.on_stop = self.states.on_stop
        """Called before a sandbox stops for idleness or its session is deleted (see `Lifecycle`)."""
        self.quotas = SessionQuotas(settings, db)

    # --- lookups ---

    async def get(self, session_id: str, *, tenant: str | None) -> SessionRow:
        if self.states.deleted(session_id):
            raise NotFound(f"Session {session_id} not found.", session_id=session_id)
        async with self.db.session() as db:
            row = await repo.get_session(db, session_id=session_id, tenant=tenant)
        if row is None:
            raise NotFound(f"Session {session_id} not found.", session_id=session_id)
        return row

    async def list(self, *, tenant: str | None) -> list[SessionRow]:
        async with self.db.session() as db:
            rows = await repo.list_sessions(db, tenant=tenant)
        return [row for row in rows if not self.states.deleted(row.id)]

    async def live(self, session_id: str, *, tenant: str | None) -> LiveSession:
        """The session with its sandbox running (started again if it was stopped); counts as activity.

        NotFound for an unknown, deleted or being-deleted session or another tenant's; Conflict
        while it is being created; the backend's error (Unavailable, SandboxError) when a stopped
        sandbox cannot be started.
        """
        live = self.states.get(session_id)
        if live is None or (tenant is not None and live.tenant != tenant):
            live = await self._known(session_id, tenant)
        if live.state != "running":
            await self.states.up(live)
        live.touch()
        return live

    def live_count(self) -> int:
        """Sessions whose sandbox runs."""
        return len(self.states.running())

    def awake(self) -> Sequence[LiveSession]:
        return self.states.running()

    def peek(self, session_id: str) -> LiveSession | None:
        return self.states.get(session_id)

    def deleted(self, session_id: str) -> bool:
        """Whether a delete of the session has started (or ended): requests for it are 404s."""
        return self.states.deleted(session_id)

    async def container_status(self, session_id: str) -> SandboxStatus:
        live = self.states.get(session_id)
        if live is None:
            return "unknown"
        if not live.has_sandbox:
            return "exited" if live.state == "dormant" else "unknown"
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
            (live, live.last_active)
            for live in self.states.known()
            if live.last_active > live.flushed and live.state in ("running", "asleep")
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

        def still_idle() -> bool:
            return time.time() - live.last_active >= idle_for and not live.busy

        if not await self.states.sleep(live, still_idle):
            return False
        log.info("session %s idle for %.0f s: sandbox %s stopped", live.id, idle_for, live.sandbox_id)
        return True

    async def _known(self, session_id: str, tenant: str | None) -> LiveSession:
        """A session the store has that this server holds in no state yet (another tenant's: 404)."""
        row = await self.get(session_id, tenant=tenant)
        live = self.states.add(self.dormant(row))
        if tenant is not None and live.tenant != tenant:
            raise NotFound(f"Session {session_id} not found.", session_id=session_id)
        return live

    def dormant(self, row: SessionRow) -> LiveSession:
        """A stored session without a sandbox on this server: it starts on first use."""
        spec = self.spec_for(row.id, tenant=row.tenant, image=row.image, env=row.env)
        spec = replace(spec, egress=EgressPolicy.from_json(row.network))
        active = row.last_activity.timestamp()
        return LiveSession(
            row.id,
            row.tenant,
            spec,
            self._host_files(spec),
            max_read_bytes=self.settings.file_read_max_bytes,
            files_timeout=self.settings.files_timeout,
            state="dormant",
            sandbox_id=row.sandbox_id or "",
            last_active=active,
            flushed=active,
        )

    # --- create / delete ---

    def spec_for(self, session_id: str, *, tenant: str, image: str, env: Mapping[str, str]) -> SandboxSpec:
        return SandboxSpec(
            session_id=session_id,
            image=image,
            limits=limits_from(self.settings),
            env=dict(env),
            labels={"crogia.tenant": tenant},
        )

    def check_egress(self, policy: EgressPolicy) -> None:
        """Conflict unless this server can enforce `policy` (`internet` it always can)."""
        if policy == EgressPolicy():
            return
        if mode_of(self.settings.sandbox_network) != "isolated":
            raise Conflict(
                f"egress policies need SANDBOX_NETWORK=isolated (it is {self.settings.sandbox_network})"
            )
        if not self.provider.egress_policies:
            raise Conflict(f"the {self.provider.name} backend does not enforce egress policies")

    @capped  # MAX_SESSIONS, MAX_SESSIONS_PER_TENANT, SANDBOX_IMAGES
    async def create(
        self,
        *,
        tenant: str,
        label: str,
        image: str | None,
        env: Mapping[str, str],
        metadata: dict[str, Any],
        network: EgressPolicy | None = None,
    ) -> SessionRow:
        # (admission checks, e.g. a per-tenant session cap, go here: before anything is made)
        policy = network or EgressPolicy()
        self.check_egress(policy)
        spec = self.spec_for(
            str(uuid.uuid4()), tenant=tenant, image=image or self.settings.docker_base_image, env=env
        )
        spec = replace(spec, egress=policy)
        sandbox: Sandbox | None = None
        live: LiveSession | None = None
        try:
            sandbox = await self._new_sandbox(spec)
            spec = sandbox.spec  # a pooled sandbox brings the session id it was made for
            live = self.states.add(
                LiveSession(
                    spec.session_id,
                    tenant,
                    spec,
                    self._host_files(spec),
                    max_read_bytes=self.settings.file_read_max_bytes,
                    files_timeout=self.settings.files_timeout,
                )
            )
            row = SessionRow(
                id=spec.session_id,
                tenant=tenant,
                label=label,
                last_task=label,  # until the first task replaces it, as the original server did
                status="active",
                sandbox_backend=self.provider.name,
                sandbox_id=sandbox.id,
                image=spec.image,
                env=dict(env),
                meta=metadata,
                network=None if policy == EgressPolicy() else policy.to_json(),
            )
            async with live.lock:
                if live.state != "creating":  # deleted before it was even handed out
                    raise NotFound(f"Session {live.id} not found.", session_id=live.id)
                async with self.db.transaction() as db:
                    db.add(row)
                await self.states.came_up(live, sandbox)
        except BaseException:
            # A half-made session leaves nothing behind: no container, no row, no folder.
            await self._discard(spec, sandbox, live)
            raise
        log.info("session %s created on %s sandbox %s", live.id, self.provider.name, sandbox.id)
        return row

    async def set_network(self, session_id: str, *, tenant: str | None, policy: EgressPolicy) -> SessionRow:
        """Change a session's egress policy: stored, kept for its next start, live now for new
        connections if its sandbox runs (open connections stay as they are)."""
        self.check_egress(policy)
        live = self.states.get(session_id)
        if live is None or (tenant is not None and live.tenant != tenant):
            live = await self._known(session_id, tenant)
        async with live.lock:
            if live.state in ("deleting", "gone"):
                raise NotFound(f"Session {session_id} not found.", session_id=session_id)
            async with self.db.transaction() as db:
                await repo.touch_session(
                    db, session_id=session_id, network=None if policy == EgressPolicy() else policy.to_json()
                )
            live.spec = replace(live.spec, egress=policy)
            if live.has_sandbox:
                await live.sandbox.set_egress(policy)
        log.info("session %s egress policy now %s", session_id, policy.egress)
        return await self.get(session_id, tenant=tenant)

    async def delete(self, session_id: str, *, tenant: str | None) -> None:
        """Delete a session: from its first step on, every request for it is a 404 and nothing
        starts its sandbox again; the `on_stop` hooks run ("deleted"), then everything goes."""
        live = self.states.get(session_id)
        if live is None or (tenant is not None and live.tenant != tenant):
            live = await self._known(session_id, tenant)
        await self.states.begin_delete(live)
        async with self.db.transaction() as db:
            await repo.delete_session(db, session_id=session_id)
        self.bus.drop_session(session_id)
        self.states.bury(live)
        if self.settings.workspace_retention == "delete":
            await self.provider.remove_workspace(session_id)
        else:  # a kept workspace with a quota is its image, disks/<id>.ext4
            await self.provider.release(session_id)
        await self.provider.forget(session_id)
        log.info("session %s deleted", session_id)

    # --- start-up / shutdown ---

    async def reconcile(self) -> None:
        """Start-up: see `crogia.services.reconcile`."""
        await reconcile(self)

    async def close(self) -> None:
        """Drop connections; sandboxes keep running for the next start (Docker), or die with us (bwrap)."""
        lives = [live for live in self.states.drop_all() if live.has_sandbox]
        for live in lives:
            try:
                await live.sandbox.close()
            except Exception:
                log.warning("closing sandbox connection of %s failed", live.id, exc_info=True)
        # A running container keeps its own view of the disk; the next start mounts it again first.
        for live in lives:
            await self.provider.release(live.id)

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
                claimed.spec = replace(spec, session_id=own.session_id)
                if spec.egress != EgressPolicy():  # it was made (and runs) before the policy was known
                    try:
                        await claimed.set_egress(spec.egress)
                    except BaseException:
                        await self._discard(claimed.spec, claimed, None)
                        raise
                return claimed
        return await self.provider.create(spec)  # it makes the folders (and mounts the disk)

    def _host_files(self, spec: SandboxSpec) -> HostFiles | None:
        """The session's files on its host folder, or None where its daemon serves them (SANDBOX_FILES)."""
        if self.settings.sandbox_files == "daemon":
            return None
        return HostFiles(
            self.provider.paths(spec.session_id).workspace, max_read_bytes=self.settings.file_read_max_bytes
        )

    async def _discard(self, spec: SandboxSpec, sandbox: Sandbox | None, live: LiveSession | None) -> None:
        if live is not None:
            self.states.forget(live)
        if sandbox is not None:
            try:
                await sandbox.destroy()
                await self.provider.remove(sandbox.id)
            except Exception:
                log.warning("clean-up of half-made sandbox %s failed", sandbox.id, exc_info=True)
        try:
            async with self.db.transaction() as db:
                await repo.delete_session(db, session_id=spec.session_id)
        except Exception:
            log.warning("clean-up of half-made session row %s failed", spec.session_id, exc_info=True)
        try:
            await self.provider.remove_workspace(spec.session_id)
        except Exception:
            log.warning("clean-up of half-made workspace %s failed", spec.session_id, exc_info=True)
        await self.provider.forget(spec.session_id)


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
