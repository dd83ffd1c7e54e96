"""What a crash leaves of a session in host folders (bind-mounted workspaces), through a real server
and its restart on both backends: the folders of a session whose row is gone are removed at
start-up (its workspace too unless WORKSPACE_RETENTION=keep), a live session's stay, and a folder
the server did not make (no state folder of its own) is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path

import aiodocker
import pytest
from aiodocker.volumes import DockerVolume

from crogia.config import Settings
from crogia.sandbox.base import HostStorage, make_dirs
from tests.conftest import make_settings, need_docker
from tests.support.server import RunningServer, run_server


def _forget_row(db: Path, sid: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


async def _shell(server: RunningServer, sid: str, cmd: str) -> str:
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    return str(response.json()["output"])


@pytest.mark.parametrize("retention", ["delete", "keep"])
async def test_a_crash_leaves_no_folders_of_a_gone_session(
    data_dir: Path, backend: str, retention: str
) -> None:
    settings: Settings = make_settings(data_dir, backend, workspace_retention=retention)
    workspaces, states = settings.workspaces_dir, settings.sandbox_state_dir
    async with run_server(settings) as first:
        kept = str((await first.create_session())["session_id"])
        gone = str((await first.create_session())["session_id"])
        for sid in (kept, gone):
            assert await _shell(first, sid, "echo mine > mine.txt; cat mine.txt") == "mine\n"
    # As a crash leaves them: a session whose row went before its folders (mid-delete), the
    # folders of one whose row was never written (mid-create), a state folder alone; and what
    # the server never made: a folder of someone else's, and a workspace-like one without state.
    await asyncio.to_thread(_forget_row, data_dir / "crogia.db", gone)
    half_made, state_only, stranger = (str(uuid.uuid4()) for _ in range(3))
    make_dirs(HostStorage(workspaces, states).paths(half_made))
    (workspaces / half_made / "planted").write_text("x")
    outside = data_dir / "host-file"  # what the sandbox's links point at: the sweep must not follow
    outside.write_text("host")
    (workspaces / gone / "link").symlink_to(outside)
    (workspaces / gone / "dirlink").symlink_to(data_dir, target_is_directory=True)
    (states / state_only).mkdir()
    (workspaces / "notes").mkdir()
    (workspaces / stranger).mkdir()
    assert {gone, half_made} <= {path.name for path in workspaces.iterdir()}

    async with run_server(settings) as second:
        left = {path.name for path in workspaces.iterdir()}
        assert not {path.name for path in states.iterdir()} & {gone, half_made, state_only}
        assert "notes" in left and stranger in left, "a folder the server never made was removed"
        assert outside.read_text() == "host" and (data_dir / "crogia.db").exists(), (
            "the sweep followed a link"
        )
        if retention == "keep":  # a deleted session keeps its workspace, as a delete would have
            assert (workspaces / gone / "mine.txt").read_text() == "mine\n"
            assert half_made in left
        else:
            assert not {gone, half_made} & left
        assert await _shell(second, kept, "cat mine.txt") == "mine\n", "a live session lost its workspace"
        assert (await second.client.get(f"/api/sessions/{gone}")).status_code == 404
        await second.client.delete(f"/api/sessions/{kept}")


@pytest.mark.docker
async def test_a_kept_volume_survives_the_next_start(data_dir: Path) -> None:
    """WORKSPACE_RETENTION=keep with volume workspaces: a deleted session's volume stays at delete,
    and the next start's sweep (which removes a gone session's volume otherwise) leaves it too."""
    need_docker()
    settings = make_settings(
        data_dir,
        "docker",
        workspace_retention="keep",
        docker_workspace="volume",
        sandbox_transport="tcp",
        sandbox_files="daemon",
    )
    docker = aiodocker.Docker()
    volume = ""
    try:
        async with run_server(settings) as first:
            created = await first.create_session()
            sid, volume = str(created["session_id"]), str(created["workdir"])
            assert await _shell(first, sid, "echo mine > mine.txt; cat mine.txt") == "mine\n"
            assert (await first.client.delete(f"/api/sessions/{sid}")).status_code == 200
        await DockerVolume(docker, volume).show()  # type: ignore[no-untyped-call]
        async with run_server(settings):
            await DockerVolume(docker, volume).show()  # type: ignore[no-untyped-call]  # still there
    finally:
        if volume:
            with contextlib.suppress(aiodocker.DockerError):
                await DockerVolume(docker, volume).delete()  # type: ignore[no-untyped-call]
        await docker.close()
