"""Workspace disk quotas: each workspace is the mount point of its own size-limited ext4 image.

Neither backend can cap a bind-mounted host folder: Docker's `--storage-opt size` covers only
the container's own layer, and only on overlay2 over XFS with project quotas. So with
SANDBOX_DISK_MB set, a session's workspace folder gets a sparse ext4 image of that size
(`<data>/disks/<session>.ext4`, outside every sandbox's reach) mounted on it with
`loop,discard,nosuid,nodev`. A command that fills it gets ENOSPC; the host only spends what
is written, and gets back what is deleted (discard punches holes into the sparse file).

It needs root (mount) and loop devices; `probe()` tries once at start-up. Where it fails,
workspaces stay plain folders (no quota) and a warning says why. An image made earlier is
mounted whatever the setting, so a workspace never looks empty because the setting changed.
Mounts outlive the server (as Docker containers do); `ensure()` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

from crogia.errors import CrogiaError, SandboxError
from crogia.sandbox._cmd import capture

log = logging.getLogger(__name__)

MOUNT_OPTIONS = "loop,discard,nosuid,nodev,noatime"
_MKFS = ("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")


class WorkspaceDisks:
    """Creates, mounts and removes the workspace images in `folder`."""

    def __init__(self, folder: Path, size_mb: int) -> None:
        self.folder = folder
        self.size_mb = size_mb
        self.problem: str | None = "not probed yet" if size_mb else "SANDBOX_DISK_MB is 0"
        """Why new workspaces get no quota; None when they do."""
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def active(self) -> bool:
        """True when new workspaces get a quota."""
        return self.problem is None

    def image(self, session_id: str) -> Path:
        return self.folder / f"{session_id}.ext4"

    async def probe(self) -> bool:
        """Check once that an image can be made and mounted here; log why not."""
        if not self.size_mb:
            return False
        self.problem = await self._try()
        if self.problem:
            log.warning(
                "SANDBOX_DISK_MB=%d but workspace quotas are unavailable here (%s): "
                "workspaces are plain folders without a size limit",
                self.size_mb,
                self.problem,
            )
        else:
            log.info("workspace quota: %d MB per session (loop-mounted ext4)", self.size_mb)
        return self.active

    async def _try(self) -> str | None:
        if os.geteuid() != 0:
            return "mounting needs root"
        name = f".probe-{uuid.uuid4().hex[:8]}"
        image, mount = self.folder / f"{name}.ext4", self.folder / name
        try:
            await asyncio.to_thread(self.folder.mkdir, parents=True, exist_ok=True)
            await self._make(image, 64)
            await asyncio.to_thread(mount.mkdir)
            await self._mount(image, mount)
            await self._unmount(mount)
        except (CrogiaError, OSError) as exc:
            return exc.message if isinstance(exc, CrogiaError) else str(exc)
        finally:
            await asyncio.to_thread(_remove, image, mount)
        return None

    async def ensure(self, session_id: str, workspace: Path) -> None:
        """Mount the session's image on `workspace`, making it first when quotas are active.

        A workspace that already holds files and has no image (made before the quota was
        set) is left as it is: mounting over it would hide them.
        """
        async with self._locks.setdefault(session_id, asyncio.Lock()):
            await self._ensure(session_id, workspace)

    async def _ensure(self, session_id: str, workspace: Path) -> None:
        image = self.image(session_id)
        if await asyncio.to_thread(os.path.ismount, workspace):
            return
        exists = await asyncio.to_thread(image.exists)
        if not exists:
            if not self.active:
                return
            if await asyncio.to_thread(_has_files, workspace):
                log.warning("workspace of session %s predates SANDBOX_DISK_MB: no quota", session_id)
                return
            await self._make(image, self.size_mb)
        await asyncio.to_thread(workspace.mkdir, parents=True, exist_ok=True)
        try:
            await self._mount(image, workspace)
        except BaseException:
            if not exists:
                await asyncio.to_thread(_remove, image, None)
            raise
        if not exists:
            with contextlib.suppress(OSError):  # mkfs's lost+found would show in every listing
                await asyncio.to_thread((workspace / "lost+found").rmdir)

    async def release(self, workspace: Path) -> None:
        """Unmount `workspace` if it is mounted (lazily when busy); its image stays."""
        if await asyncio.to_thread(os.path.ismount, workspace):
            await self._unmount(workspace)

    async def remove(self, session_id: str, workspace: Path) -> None:
        """Unmount and delete the session's image (its files go with it)."""
        async with self._locks.setdefault(session_id, asyncio.Lock()):
            await self.release(workspace)
            await asyncio.to_thread(_remove, self.image(session_id), None)
        self._locks.pop(session_id, None)

    async def _make(self, image: Path, size_mb: int) -> None:
        await asyncio.to_thread(self.folder.chmod, 0o700)  # an image holds a whole workspace
        await asyncio.to_thread(_sparse_file, image, size_mb * 1024 * 1024)
        code, _, err = await capture(*_MKFS, str(image))
        if code != 0:
            await asyncio.to_thread(_remove, image, None)
            raise SandboxError(f"mkfs.ext4 failed: {_last_line(err)}", exit_code=code)

    async def _mount(self, image: Path, target: Path) -> None:
        code, _, err = await capture("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(target))
        if code != 0:
            raise SandboxError(f"mounting the workspace image failed: {_last_line(err)}", exit_code=code)

    async def _unmount(self, target: Path) -> None:
        code, _, err = await capture("umount", str(target))
        if code != 0:
            # Busy (a host-side search still reading it): detach now, the kernel frees it after.
            code, _, err = await capture("umount", "-l", str(target))
            if code != 0:
                log.warning("could not unmount %s: %s", target, _last_line(err))


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "xb") as f:
        f.truncate(size)


def _has_files(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False


def _remove(image: Path, mount: Path | None) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        image.unlink()
    if mount is not None:
        with contextlib.suppress(OSError):
            mount.rmdir()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
