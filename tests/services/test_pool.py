"""The warm sandbox pool through a real server, on both backends: claim, refill, delete, restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crogia.config import Settings
from crogia.sandbox import instance_id
from crogia.sandbox.base import HostStorage, SandboxSpec, make_dirs
from crogia.sandbox.config import backend_config
from crogia.services.pool import SandboxPool
from tests.conftest import make_settings, need_docker
from tests.support.server import RunningServer, run_server

POOL = 2


@pytest.fixture
async def settings(data_dir: Path, backend: str) -> Settings:
    """Pool settings on this test's data folder (its containers go with the folder: `data_dir`)."""
    return make_settings(data_dir, backend, sandbox_pool_size=POOL)


@pytest.fixture
async def docker_settings(data_dir: Path) -> Settings:
    need_docker()
    settings = make_settings(data_dir, "docker", sandbox_pool_size=POOL)
    # Containers are removed with the data folder (tests/conftest.py `data_dir`).
    return settings


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with run_server(settings) as running:
        await running.runtime.pool.wait_ready()
        yield running


async def shell(server: RunningServer, sid: str, cmd: str) -> dict[str, Any]:
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def folders(settings: Settings) -> set[str]:
    """Session ids that have a workspace or a state folder, and those marked as unclaimed pool ones."""
    found = {path.name for path in settings.workspaces_dir.iterdir()}
    found |= {path.name for path in settings.sandbox_state_dir.iterdir() if path.name != ".pool"}
    return found


def marked(settings: Settings) -> set[str]:
    markers = settings.sandbox_state_dir / ".pool"
    return {path.name for path in markers.iterdir()} if markers.is_dir() else set()


async def test_session_claims_a_started_sandbox_and_sees_its_workspace(
    server: RunningServer, settings: Settings
) -> None:
    pool = server.runtime.pool
    waiting = pool.ready_ids()
    sandboxes = set(await server.runtime.provider.managed_ids())
    created = await server.create_session(task="pooled")
    sid = str(created["session_id"])
    assert sid in waiting and created["container_id"] in sandboxes  # claimed, not booted
    assert created["container_status"] == "running"
    assert sid not in marked(settings)

    wrote = await server.client.post(
        f"/api/sessions/{sid}/files/content", json={"path": "notes/hello.txt", "content": "from rest\n"}
    )
    assert wrote.status_code == 200
    out = await shell(server, sid, "pwd && cat notes/hello.txt && echo from sandbox > back.txt")
    assert out["output"] == "/workspace\nfrom rest\n" and out["exit_code"] == 0
    assert (settings.workspaces_dir / sid / "back.txt").read_text() == "from sandbox\n"
    assert (settings.sandbox_state_dir / sid).is_dir()  # the server's folder of this session
    started = await server.client.post(f"/api/sessions/{sid}/processes", json={"cmd": "echo logged"})
    assert started.status_code == 200, started.text
    pid = started.json()["pid"]
    assert (await shell(server, sid, f"ls /run/crogia/logs/{pid}.log"))["exit_code"] == 0  # in the sandbox

    await pool.wait_ready(timeout=60)  # refilled, with a new sandbox
    assert sid not in pool.ready_ids()
    assert marked(settings) == set(pool.ready_ids())
    assert (await server.client.delete(f"/api/sessions/{sid}")).status_code == 200


async def test_sessions_with_their_own_env_bypass_the_pool(server: RunningServer) -> None:
    waiting = set(server.runtime.pool.ready_ids())
    created = await server.create_session(task="own env", env={"GREETING": "hi"})
    assert created["session_id"] not in waiting
    assert set(server.runtime.pool.ready_ids()) == waiting
    out = await shell(server, str(created["session_id"]), "echo $GREETING")
    assert out["output"] == "hi\n"
    await server.client.delete(f"/api/sessions/{created['session_id']}")


def test_only_default_image_and_env_free_specs_are_served(data_dir: Path) -> None:
    settings = make_settings(data_dir, "bubblewrap", sandbox_pool_size=1)
    pool = SandboxPool(settings, provider=None)  # type: ignore[arg-type]
    spec = SandboxSpec("s", image=settings.docker_base_image)
    assert pool.serves(spec)
    assert not pool.serves(SandboxSpec("s", image="python:3.12"))
    assert not pool.serves(SandboxSpec("s", image=spec.image, env={"A": "1"}))
    assert not SandboxPool(settings, provider=None, size=0).serves(spec)  # type: ignore[arg-type]


async def test_deleting_a_pooled_session_removes_its_sandbox_and_folders(
    server: RunningServer, settings: Settings
) -> None:
    created = await server.create_session(task="short-lived")
    sid = str(created["session_id"])
    await shell(server, sid, "echo data > file.txt")
    await server.runtime.pool.wait_ready(timeout=60)
    deleted = await server.client.delete(f"/api/sessions/{sid}")
    assert deleted.status_code == 200
    assert not (settings.workspaces_dir / sid).exists()
    assert not (settings.sandbox_state_dir / sid).exists()
    assert folders(settings) == marked(settings) == set(server.runtime.pool.ready_ids())
    assert len(await server.runtime.provider.managed_ids()) == POOL


async def test_restart_reattaches_pooled_sessions_and_leaves_no_leftovers(
    settings: Settings, backend: str
) -> None:
    async with run_server(settings) as first:
        await first.runtime.pool.wait_ready()
        created = await first.create_session(task="survivor")
        sid = str(created["session_id"])
        await shell(first, sid, "echo kept > kept.txt")
    # What a killed server leaves: placeholder folders, and (Docker) a pool container still running.
    stale = await _leftover_pool_sandbox(settings, backend)

    async with run_server(settings) as second:
        pool = second.runtime.pool
        await pool.wait_ready()
        got = (await second.client.get(f"/api/sessions/{sid}")).json()
        assert got["status"] == "active" and got["container_status"] == "running"
        if backend == "docker":  # the container kept running across the restart: same one, same socket
            assert got["container_id"] == created["container_id"]
        out = await shell(second, sid, "cat kept.txt")
        assert out["output"] == "kept\n"
        managed = set(await second.runtime.provider.managed_ids())
        assert len(managed) == 1 + POOL and got["container_id"] in managed
        assert stale not in managed
        assert folders(settings) == {sid, *pool.ready_ids()} and marked(settings) == set(pool.ready_ids())
        await second.client.delete(f"/api/sessions/{sid}")
    assert folders(settings) == marked(settings) == set()


@pytest.mark.docker
async def test_stopped_pooled_container_starts_again_with_its_binds(docker_settings: Settings) -> None:
    """A claimed container binds its session's own folders, so a stopped one (engine restart, idle
    stop) starts again as it was: files outside the workspace are still there."""
    settings = docker_settings
    async with run_server(settings) as first:
        await first.runtime.pool.wait_ready()
        created = await first.create_session(task="stopped")
        sid = str(created["session_id"])
        await shell(first, sid, "echo kept > kept.txt && echo layer > /root/layer.txt")
    await _docker("stop", "-t", "1", str(created["container_id"]))
    async with run_server(settings) as second:
        got = (await second.client.get(f"/api/sessions/{sid}")).json()
        assert got["status"] == "active" and got["container_id"] == created["container_id"]
        out = await shell(second, sid, "cat kept.txt /root/layer.txt")
        assert out["output"] == "kept\nlayer\n"
        await second.client.delete(f"/api/sessions/{sid}")


async def _leftover_pool_sandbox(settings: Settings, backend: str) -> str:
    """Marked folders as a killed server leaves them, plus (Docker) a running pool container."""
    pool = SandboxPool(settings, provider=backend_config(settings, "bubblewrap").build())
    spec = pool.placeholder()
    pool._mark(spec)
    make_dirs(HostStorage(settings.workspaces_dir, settings.sandbox_state_dir).paths(spec.session_id))
    if backend != "docker":
        return "bwrap-" + spec.session_id
    from crogia.sandbox.docker import DockerProvider

    provider = DockerProvider(
        instance=instance_id(settings),
        storage=HostStorage(settings.workspaces_dir, settings.sandbox_state_dir),
    )
    try:
        sandbox = await provider.create(spec)
        await sandbox.close()
        return sandbox.id
    finally:
        await provider.close()


async def _docker(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("docker", *args, stdout=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0
