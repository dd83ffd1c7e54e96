"""The warm pool: sandboxes started ahead of time, so a new session claims one instead of booting it.

Each pooled sandbox is made for a session id chosen in advance (a fresh uuid4, as `create` would
choose): its folders are already `workspaces/<id>` and `sandboxes/<id>`, its Docker labels already
name that session. A claim hands it over as it is: the session takes the sandbox's id, its spec is
replaced by the session's (`dataclasses.replace`: same folders, the session's labels), nothing is
renamed or re-mounted. So a claimed sandbox is like any other: Docker can stop and start it again
(idle stop, engine restart) with its binds intact, and re-attach after a server restart finds it.

An empty marker file `sandboxes/.pool/<id>` (never mounted in a sandbox; the provider keeps it,
`mark_pooled`) says that a folder pair belongs to an unclaimed pool sandbox; a claim deletes it.
At start-up, `SessionService.reconcile` removes the previous server's pool sandboxes (orphans: no
session owns them) and calls `sweep`, which deletes marked folders that no session owns; `start()`
then refills.

Only sessions with the default image and no extra environment come from the pool; the others boot
their own. One owned task refills the pool, one sandbox at a time, so refilling never starves the
requests being served. With workspace quotas (SANDBOX_DISK_MB), a pooled sandbox's workspace is
already its own mounted disk image, made before the sandbox starts, as for any other session.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Collection

import anyio

from crogia.config import Settings
from crogia.sandbox import limits_from
from crogia.sandbox.base import POOL_LABEL, Sandbox, SandboxProvider, SandboxSpec, is_session_id

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
RETRY_MAX = 60.0


class SandboxPool:
    """Keeps up to `size` ready sandboxes of the default image; `claim` hands one to a new session."""

    def __init__(
        self,
        settings: Settings,
        provider: SandboxProvider,
        *,
        size: int | None = None,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.size = settings.sandbox_pool_size if size is None else size
        self._ready: deque[Sandbox] = deque()
        self._wanted = asyncio.Event()
        self._added = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None

    @property
    def ready(self) -> int:
        """How many sandboxes wait to be claimed."""
        return len(self._ready)

    def ready_ids(self) -> list[str]:
        """Session ids of the sandboxes waiting to be claimed."""
        return [sandbox.spec.session_id for sandbox in self._ready]

    def serves(self, spec: SandboxSpec) -> bool:
        """Whether a session with this spec may take a pooled sandbox (default image, no extra env)."""
        return self.size > 0 and spec.image == self.settings.docker_base_image and not spec.env

    async def start(self) -> None:
        """Start filling (when the pool is on); call after `sweep`."""
        if self.size > 0 and self._filler is None:
            self._wanted.set()
            self._filler = asyncio.create_task(self._fill(), name="crogia-sandbox-pool")

    async def sweep(self, owned: Collection[str]) -> None:
        """Delete the folders (and disks) of pool sandboxes an earlier server made and no session claimed."""
        unclaimed = await anyio.to_thread.run_sync(self._sweep, set(owned))
        for session_id in unclaimed:
            await self._forget(session_id)

    async def claim(self) -> Sandbox | None:
        """A ready sandbox, now the caller's (its `spec.session_id` is the session's id), or None."""
        while self._ready:
            sandbox = self._ready.popleft()
            self._wanted.set()
            if await self._healthy(sandbox):
                await anyio.to_thread.run_sync(self._unmark, sandbox.spec.session_id)
                return sandbox
            await self._discard(sandbox)
        return None

    async def wait_ready(self, count: int | None = None, *, timeout: float = 120.0) -> None:
        """Wait until `count` (default: all) sandboxes are ready; TimeoutError after `timeout` seconds."""
        wanted = self.size if count is None else count
        async with asyncio.timeout(timeout):
            while len(self._ready) < wanted:
                self._added.clear()
                await self._added.wait()

    async def close(self) -> None:
        """Stop refilling and remove every unclaimed sandbox with its folders."""
        filler, self._filler = self._filler, None
        if filler is not None:
            filler.cancel()
            await asyncio.gather(filler, return_exceptions=True)
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(self._discard(sandbox) for sandbox in ready))

    def placeholder(self) -> SandboxSpec:
        """A new pool sandbox's spec: a fresh session id and its folders, the default image and limits."""
        session_id = str(uuid.uuid4())
        return SandboxSpec(
            session_id=session_id,
            image=self.settings.docker_base_image,
            limits=limits_from(self.settings),
            labels={POOL_LABEL: "1"},
        )

    # --- helpers ---

    async def _fill(self) -> None:
        delay = 1.0
        while True:
            if len(self._ready) >= self.size:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            try:
                sandbox = await self._make()
            except Exception as exc:
                log.warning("warm pool: could not start a sandbox (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = 1.0
            self._ready.append(sandbox)
            self._added.set()

    async def _make(self) -> Sandbox:
        spec = self.placeholder()
        await anyio.to_thread.run_sync(self._mark, spec)
        try:
            return await self.provider.create(spec)
        except BaseException:
            await self._forget(spec.session_id)
            raise

    async def _healthy(self, sandbox: Sandbox) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await sandbox.processes()
        except Exception as exc:
            log.warning("pooled sandbox %s does not answer (%s): dropped", sandbox.id, exc)
            return False
        return True

    async def _discard(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.close()
            await self.provider.remove(sandbox.id)
        except Exception:
            log.warning("removing pooled sandbox %s failed", sandbox.id, exc_info=True)
        await self._forget(sandbox.spec.session_id)

    async def _forget(self, session_id: str) -> None:
        """Remove an unclaimed sandbox's disk image (if any), folders and marker."""
        try:
            await self.provider.remove_workspace(session_id)
            await self.provider.forget(session_id)
        except Exception:
            log.warning("removing pooled workspace %s failed", session_id, exc_info=True)
        await anyio.to_thread.run_sync(self._unmark, session_id)

    # --- markers (the provider's; blocking: run in a worker thread) ---

    def _mark(self, spec: SandboxSpec) -> None:
        self.provider.mark_pooled(spec.session_id)  # its folders: the provider's, made by `create`

    def _unmark(self, session_id: str) -> None:
        self.provider.mark_pooled(session_id, pooled=False)

    def _sweep(self, owned: set[str]) -> list[str]:
        """Unmark pool sandboxes claimed just before a crash; the unclaimed ones, to remove."""
        unclaimed = []
        for name in self.provider.pooled():
            if name in owned:  # the session keeps its folders
                self._unmark(name)
            elif is_session_id(name):
                unclaimed.append(name)
        return unclaimed
