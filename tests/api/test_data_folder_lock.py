"""Two servers on one data folder: the second refuses to start, and the first loses nothing.

Both would be one instance (the folder names it): a starting server removes what it takes for a
crash's leftovers of its instance (bubblewrap cgroups and namespaces, Docker containers, private
folders), which here would be the running server's live sandboxes.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.subprocess_server import ServerProcess, server_env

pytestmark = pytest.mark.slow


async def test_a_second_server_on_the_same_data_folder_refuses_to_start(data_dir: Path, backend: str) -> None:
    """(Without the lock the second started, and marked the first's running process exited.)"""
    env = server_env(data_dir, backend, "http://127.0.0.1:9")  # no model is asked here
    first = ServerProcess(data_dir, env)
    await first.start()
    try:
        async with httpx.AsyncClient(base_url=first.base_url, timeout=60) as client:
            sid = (await client.post("/api/sessions", json={})).json()["session_id"]
            started = await client.post(f"/api/sessions/{sid}/processes", json={"cmd": "sleep 600"})
            assert started.status_code == 200, started.text
            second = ServerProcess(data_dir, env)
            try:
                with pytest.raises(RuntimeError, match="server exited") as refused:
                    await second.start()
            finally:
                if second.proc is not None and second.proc.returncode is None:  # it started: end it
                    await second.stop()
            assert "another Crogia server" in str(refused.value), str(refused.value)[-2000:]
            assert f"pid {first.proc.pid if first.proc else '?'}" in str(refused.value)
            ran = await client.post(f"/api/sessions/{sid}/shell", json={"cmd": "echo still here"})
            assert ran.json()["output"].strip() == "still here", ran.text
            listed = await client.get(f"/api/sessions/{sid}/processes")
            assert [p["status"] for p in listed.json()] == ["running"], listed.text
            await client.delete(f"/api/sessions/{sid}")
    finally:
        await first.stop()
    again = ServerProcess(data_dir, env)  # the lock went with the first server
    await again.start()
    await again.stop()
