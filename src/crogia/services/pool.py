"""The warm pool: sandboxes started ahead of time, so a new session claims one instead of booting it.

A pooled sandbox is made with a placeholder spec: workspace `workspaces/.pool-<id>`, state folder
`sandboxes/.pool-<id>`. A claim renames both folders to the session's: a bind mount holds the
directory, not its path, so the running sandbox sees the session's workspace at `/workspace`, and its
executor socket sits in the session's state folder. The sandbox's spec is then the session's, so a
later re-creation (after a crash or a server restart) uses the session's folders.

Docker labels cannot change after create: a claimed container keeps `crogia.session=pool-<id>` and
carries `crogia.pool`; the store's `sandbox_id` is what ties it to its session (see
`DockerProvider.attach`). Only sessions with the default image and no extra environment come from the
pool; the others boot their own. One owned task refills the pool, one sandbox at a time, so refilling
never starves the requests being served. At start-up the previous server's pool sandboxes are orphans,
removed by `SessionService.reconcile`; `start()` (called after it) deletes their folders and refills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections import deque

import anyio

from crogia.config import Settings
from crogia.sandbox import limits_from
from crogia.sandbox.base import POOL_LABEL, Sandbox, SandboxProvider, SandboxSpec

log = logging.getLogger(__name__)

FOLDER_PREFIX = ".pool-"
HEALTH_TIMEOUT = 2.0
RETRY_MAX = 60.0


class SandboxPool:
    """Keeps up to `size` ready sandboxes of the default image; `claim` hands one to a session."""

    def __init__(self, settings: Settings, provider: SandboxProvider, *, size: int | None = None) -> None:
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
        return [sandbox.id for sandbox in self._ready]

    def serves(self, spec: SandboxSpec) -> bool:
        """Whether a session with this spec may take a pooled sandbox (default image, no extra env)."""
        return self.size > 0 and spec.image == self.settings.docker_base_image and not spec.env

    async def start(self) -> None:
        """Delete placeholder folders an earlier server left, then start filling (if the pool is on)."""
        await anyio.to_thread.run_sync(self._sweep)
        if self.size > 0 and self._filler is None:
            self._wanted.set()
            self._filler = asyncio.create_task(self._fill(), name="crogia-sandbox-pool")

    async def claim(self, spec: SandboxSpec) -> Sandbox | None:
        """A ready sandbox moved onto `spec`'s folders, or None when none is ready (boot one then)."""
        while self._ready:
            sandbox = self._ready.popleft()
            self._wanted.set()
            if not await self._healthy(sandbox):
                await self._discard(sandbox)
                continue
            try:
                await anyio.to_thread.run_sync(_move, sandbox.spec, spec)
            except OSError:
                log.warning("could not move pooled sandbox %s to its session", sandbox.id, exc_info=True)
                await self._discard(sandbox)
                return None
            sandbox.spec = spec
            return sandbox
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

    # --- helpers ---

    def placeholder(self) -> SandboxSpec:
        """A fresh pool sandbox's spec: the settings' limits, the default image, its own folders."""
        pool_id = uuid.uuid4().hex[:12]
        folder = FOLDER_PREFIX + pool_id
        return SandboxSpec(
            session_id=f"pool-{pool_id}",
            workspace=self.settings.workspaces_dir / folder,
            state_dir=self.settings.sandbox_state_dir / folder,
            image=self.settings.docker_base_image,
            limits=limits_from(self.settings),
            labels={POOL_LABEL: pool_id},
        )

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
        await anyio.to_thread.run_sync(_make_dirs, spec)
        try:
            return await self.provider.create(spec)
        except BaseException:
            await anyio.to_thread.run_sync(_remove_dirs, spec)
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
        await anyio.to_thread.run_sync(_remove_dirs, sandbox.spec)

    def _sweep(self) -> None:
        for parent in (self.settings.workspaces_dir, self.settings.sandbox_state_dir):
            with contextlib.suppress(FileNotFoundError), os.scandir(parent) as entries:
                for entry in entries:
                    if entry.name.startswith(FOLDER_PREFIX) and entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)


def _make_dirs(spec: SandboxSpec) -> None:
    spec.workspace.mkdir(parents=True, exist_ok=True)
    (spec.state_dir / "logs").mkdir(parents=True, exist_ok=True)


def _remove_dirs(spec: SandboxSpec) -> None:
    shutil.rmtree(spec.state_dir, ignore_errors=True)
    shutil.rmtree(spec.workspace, ignore_errors=True)


def _move(old: SandboxSpec, new: SandboxSpec) -> None:
    """Rename the pooled sandbox's folders to the session's (both, or neither)."""
    os.rename(old.workspace, new.workspace)
    try:
        os.rename(old.state_dir, new.state_dir)
    except OSError:
        os.rename(new.workspace, old.workspace)
        raise
