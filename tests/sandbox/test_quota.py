"""Workspace quotas (SANDBOX_DISK_MB): a loop-mounted ext4 image per workspace, on both backends."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crogia.config import Settings
from crogia.sandbox.quota import WorkspaceDisks
from tests.conftest import make_settings, remove_containers_of
from tests.support.server import RunningServer, run_server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="workspace quotas need root (mount)")

DISK_MB = 64


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def allocated_mb(path: Path) -> float:
    return path.stat().st_blocks * 512 / 1024 / 1024


@pytest.fixture
async def settings(data_dir: Path, backend: str) -> AsyncIterator[Settings]:
    settings = make_settings(data_dir, backend, sandbox_disk_mb=DISK_MB)
    yield settings
    if backend == "docker":  # before unmounting: a running container still binds the workspace
        remove_containers_of(data_dir)
    for folder in (data_dir / "workspaces").glob("*"):  # never leave a mount behind, even on failure
        if mounted(folder):
            await WorkspaceDisks(data_dir / "disks", 0).release(folder)


async def shell(server: RunningServer, sid: str, cmd: str) -> dict[str, Any]:
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, "timeout": 60})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_full_workspace_is_enospc_and_gives_its_space_back(settings: Settings) -> None:
    async with run_server(settings) as server:
        sid = str((await server.create_session(task="quota"))["session_id"])
        workspace = settings.workspaces_dir / sid
        image = settings.data_dir / "disks" / f"{sid}.ext4"
        listing = (await server.client.get(f"/api/sessions/{sid}/files")).json()["items"]
        fill = await shell(server, sid, "dd if=/dev/zero of=/workspace/fill bs=1M count=200")
        full_mb = allocated_mb(image)
        write = await server.client.post(
            f"/api/sessions/{sid}/files/content", json={"path": "more.txt", "content": "x" * 1_000_000}
        )
        freed = await shell(server, sid, "rm /workspace/fill && sync && echo ok")
        for _ in range(100):  # discards reach the image file a moment after the journal commits
            freed_mb = allocated_mb(image)
            if freed_mb < full_mb / 2:
                break
            await asyncio.sleep(0.1)
        await server.client.delete(f"/api/sessions/{sid}")
        gone = not image.exists() and not workspace.exists()

    assert listing == []  # no lost+found
    assert fill["exit_code"] != 0 and "No space left on device" in fill["output"]
    assert DISK_MB * 0.7 < full_mb <= DISK_MB  # the host spent what was written, and no more
    assert write.status_code == 413 and "space" in write.json()["detail"].lower()
    assert freed["output"].strip() == "ok" and freed_mb < full_mb / 2  # discard gave it back
    assert gone


async def test_the_disk_outlives_restarts_and_idle_stops(settings: Settings) -> None:
    async with run_server(settings.model_copy(update={"session_idle_ttl": 0.5})) as server:
        sid = str((await server.create_session(task="quota"))["session_id"])
        await shell(server, sid, "echo kept > kept.txt")
        for _ in range(100):
            if (await server.client.get(f"/api/sessions/{sid}")).json()["status"] == "stopped":
                break
            await asyncio.sleep(0.1)
        after_idle = await shell(server, sid, "cat kept.txt; df -m --output=size /workspace | tail -1")
    workspace = settings.workspaces_dir / sid
    unmounted_at_shutdown = not mounted(workspace)
    async with run_server(settings) as server:
        after_restart = await shell(server, sid, "cat kept.txt")
        await server.client.delete(f"/api/sessions/{sid}")
    kept, size = after_idle["output"].split()
    assert kept == "kept" and DISK_MB * 0.8 < int(size) <= DISK_MB
    assert unmounted_at_shutdown
    assert after_restart["output"].strip() == "kept"


async def test_kept_workspaces_keep_their_image(settings: Settings) -> None:
    async with run_server(settings.model_copy(update={"workspace_retention": "keep"})) as server:
        sid = str((await server.create_session(task="keep"))["session_id"])
        await shell(server, sid, "echo kept > kept.txt")
        await server.client.delete(f"/api/sessions/{sid}")
    image = settings.data_dir / "disks" / f"{sid}.ext4"
    assert image.exists() and not mounted(settings.workspaces_dir / sid)
    image.unlink()


async def test_without_root_or_mount_there_is_no_quota(data_dir: Path) -> None:
    disks = WorkspaceDisks(data_dir / "disks", 0)
    assert not await disks.probe() and not disks.active
    broken = WorkspaceDisks(data_dir / "not-a-dir" / "x", 64)
    (data_dir / "not-a-dir").write_text("a file where a folder should be")
    assert not await broken.probe() and broken.problem
    workspace = data_dir / "ws"
    workspace.mkdir()
    await broken.ensure("s1", workspace)  # no quota: a plain folder, nothing mounted
    assert not mounted(workspace)


async def test_a_workspace_from_before_the_quota_is_left_alone(data_dir: Path) -> None:
    disks = WorkspaceDisks(data_dir / "disks", DISK_MB)
    assert await disks.probe()
    workspace = data_dir / "ws"
    workspace.mkdir()
    (workspace / "old.txt").write_text("from before")
    await disks.ensure("s1", workspace)
    assert not mounted(workspace) and (workspace / "old.txt").exists()
    fresh = data_dir / "fresh"
    await disks.ensure("s2", fresh)
    await disks.ensure("s2", fresh)  # idempotent: one mount
    mounts = Path("/proc/self/mountinfo").read_text().count(f" {fresh} ")
    await disks.remove("s2", fresh)
    assert mounts == 1 and not mounted(fresh) and not disks.image("s2").exists()


async def test_pooled_sandboxes_come_with_their_disk(settings: Settings) -> None:
    """SANDBOX_POOL_SIZE with SANDBOX_DISK_MB: a claimed session has its quota from the first command."""
    disks = settings.data_dir / "disks"
    async with run_server(settings.model_copy(update={"sandbox_pool_size": 2})) as server:
        pool = server.runtime.pool
        await pool.wait_ready(timeout=60)
        waiting = pool.ready_ids()
        pooled_mounted = all(mounted(settings.workspaces_dir / sid) for sid in waiting)
        sid = str((await server.create_session(task="pooled quota"))["session_id"])
        fill = await shell(
            server, sid, "df -m --output=size /workspace | tail -1; head -c 100M /dev/zero > f"
        )
        await pool.wait_ready(timeout=60)
        unclaimed = pool.ready_ids()
    # Stopping the server removed the unclaimed pool sandboxes with their disks; the session kept its own.
    leftovers = [
        sid_
        for sid_ in unclaimed
        if (disks / f"{sid_}.ext4").exists() or mounted(settings.workspaces_dir / sid_)
    ]
    session_image = (disks / f"{sid}.ext4").exists()
    async with run_server(settings) as server:
        await server.client.delete(f"/api/sessions/{sid}")
    size, *_ = fill["output"].split()

    assert sid in waiting and pooled_mounted
    assert DISK_MB * 0.8 < int(size) <= DISK_MB
    assert fill["exit_code"] != 0 and "No space left on device" in fill["output"]
    assert leftovers == [] and session_image
    assert not (disks / f"{sid}.ext4").exists() and not mounted(settings.workspaces_dir / sid)
