"""kill -9 of a server whose workspaces are Docker volumes, then a restart: the volumes of sessions
that are gone are reclaimed; a dormant session's volume (and so its files) stays, as do the
volumes of another instance."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path

import aiodocker
import httpx
import pytest
from aiodocker.volumes import DockerVolume

from crogia.sandbox import instance_id
from crogia.sandbox.docker import INSTANCE_LABEL, MANAGED_LABEL, SESSION_LABEL
from crogia.sandbox.docker_network import tag_of
from tests.conftest import make_settings, need_docker, remove_containers_of
from tests.support.scripted_openai import ScriptedOpenAI
from tests.support.subprocess_server import ServerProcess, server_env

pytestmark = [pytest.mark.slow, pytest.mark.docker]


async def _exists(docker: aiodocker.Docker, name: str) -> bool:
    try:
        await DockerVolume(docker, name).show()  # type: ignore[no-untyped-call]
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def _stopped(client: httpx.AsyncClient, sid: str) -> None:
    """Wait (polling, bounded) until the idle reaper has put the session to sleep."""
    async with asyncio.timeout(30):
        while (await client.get(f"/api/sessions/{sid}")).json()["status"] != "stopped":  # noqa: ASYNC110 - no event says so
            await asyncio.sleep(0.1)


def _forget_row(db: Path, sid: str) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


async def test_a_crash_leaves_no_volume_of_a_gone_session(data_dir: Path) -> None:
    need_docker()
    instance = instance_id(make_settings(data_dir, "docker"))
    other = f"t{uuid.uuid4().hex[:15]}"
    docker = aiodocker.Docker()
    made: list[str] = []

    async def volume(owner: str, session_id: str) -> str:
        name = f"crogia-ws-{tag_of(owner)}-{session_id}"
        labels = {MANAGED_LABEL: "crogia", INSTANCE_LABEL: owner, SESSION_LABEL: session_id}
        await docker.volumes.create({"Name": name, "Labels": labels})  # type: ignore[no-untyped-call]
        made.append(name)
        return name

    async with ScriptedOpenAI() as model:
        env = server_env(data_dir, "docker", model.base_url)
        env |= {
            "SANDBOX_TRANSPORT": "tcp",
            "DOCKER_WORKSPACE": "volume",
            "SANDBOX_FILES": "daemon",
            "SESSION_IDLE_TTL": "1",
        }
        server = ServerProcess(data_dir, env)
        try:
            await server.start()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                dormant = (await client.post("/api/sessions", json={})).json()
                gone = (await client.post("/api/sessions", json={})).json()
                for session in (dormant, gone):
                    made.append(session["workdir"])
                    write = {"cmd": "echo kept > k; cat k"}
                    shell = (
                        await client.post(f"/api/sessions/{session['session_id']}/shell", json=write)
                    ).json()
                    assert shell["output"] == "kept\n"
                await _stopped(client, dormant["session_id"])
            await server.kill()
            # What a crash leaves: a session whose row went but not its volume (nor its container),
            # and a bare volume of this instance; and a volume of another server on the same engine.
            await asyncio.to_thread(_forget_row, data_dir / "crogia.db", gone["session_id"])
            bare = await volume(instance, "t" + uuid.uuid4().hex[:10])
            foreign = await volume(other, "t" + uuid.uuid4().hex[:10])
            assert await _exists(docker, gone["workdir"]) and await _exists(docker, dormant["workdir"])

            await server.start()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                assert not await _exists(docker, gone["workdir"]), "a gone session's volume was kept"
                assert not await _exists(docker, bare), "a leftover volume of this instance was kept"
                assert await _exists(docker, foreign), "another instance's volume was removed"
                sid = dormant["session_id"]
                assert (await client.get(f"/api/sessions/{sid}")).json()["status"] == "stopped"
                shell = (await client.post(f"/api/sessions/{sid}/shell", json={"cmd": "cat k"})).json()
                assert shell["output"] == "kept\n", "the dormant session lost its workspace"
                await client.delete(f"/api/sessions/{sid}")
            await server.stop()
        finally:
            if server.proc is not None and server.proc.returncode is None:
                await server.kill()
            remove_containers_of(data_dir)
            for name in made:
                with contextlib.suppress(aiodocker.DockerError):
                    await DockerVolume(docker, name).delete()  # type: ignore[no-untyped-call]
            await docker.close()
