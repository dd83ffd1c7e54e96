"""What users get when things around the server are wrong: engine down, image missing, bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_settings, need_docker
from tests.support.server import run_server


def leftovers(data_dir: Path) -> list[str]:
    found = []
    for sub in ("workspaces", "sandboxes"):
        folder = data_dir / sub
        if folder.exists():
            found += [p.name for p in folder.iterdir()]
    return found


async def test_docker_engine_down_gives_503_and_health_says_so(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{data_dir}/no-engine.sock")
    async with run_server(make_settings(data_dir, "docker")) as server:
        health = (await server.client.get("/api/health")).json()
        created = await server.client.post("/api/sessions", json={"task": "x"})
        listed = (await server.client.get("/api/sessions")).json()
    assert health["docker_available"] is False and health["sandbox_backend"] == "docker"
    assert created.status_code == 503 and "Docker" in created.json()["detail"]
    assert listed == [] and leftovers(data_dir) == []


@pytest.mark.docker
async def test_an_allowed_image_the_engine_lacks_is_a_400_naming_it_and_leaves_nothing(
    data_dir: Path,
) -> None:
    need_docker()
    images = ["crogia-sandbox:latest", "crogia-missing:nope"]
    async with run_server(make_settings(data_dir, "docker", sandbox_images=images)) as server:
        created = await server.client.post(
            "/api/sessions", json={"task": "x", "image": "crogia-missing:nope"}
        )
        listed = (await server.client.get("/api/sessions")).json()
        managed = await server.runtime.provider.managed_ids()
    assert created.status_code == 400 and "crogia-missing:nope" in created.json()["detail"]
    assert listed == [] and managed == [] and leftovers(data_dir) == []


def test_invalid_settings_stop_start_up_with_a_clear_message(data_dir: Path) -> None:
    env = {
        **os.environ,
        "PORT": "not-a-port",
        "SANDBOX_BACKEND": "kubernetes",
        "API_TOKENS": "alice",
        "BASE_DIRECTORY": str(data_dir),
    }
    done = subprocess.run(
        [sys.executable, "-m", "crogia", "serve"],
        cwd=data_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "PORT" in done.stderr and "SANDBOX_BACKEND" in done.stderr and "API_TOKENS" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_database_locked_elsewhere_gives_503_and_nothing_half_done(data_dir: Path) -> None:
    """Another process holding SQLite's write lock past busy_timeout: a retryable 503, not a 500."""
    import sqlite3

    async with run_server(make_settings(data_dir, "bubblewrap")) as server:
        sid = (await server.create_session(task="locked"))["session_id"]
        other = sqlite3.connect(data_dir / "crogia.db", isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            posted = await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "wait"})
            readable = await server.client.get(f"/api/sessions/{sid}")
        finally:
            other.execute("ROLLBACK")
            other.close()
        tasks = (await server.client.get(f"/api/sessions/{sid}/tasks")).json()
    assert posted.status_code == 503 and posted.headers["retry-after"] == "1"
    assert "database" in posted.json()["detail"]
    assert readable.status_code == 200  # WAL: reads go on while the writer waits
    assert tasks == []
