"""Sessions through a real server on both sandbox backends: the seed's flow and the compat fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import websockets

from tests.support.server import RunningServer

COMPAT_FIELDS = {
    "session_id",
    "container_id",
    "workdir",
    "created",
    "last_task",
    "status",
    "container_status",
}


async def test_health_reports_backend(server: RunningServer, backend: str) -> None:
    response = await server.client.get("/api/health")
    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "healthy" and body["sandbox_backend"] == backend
    assert body["docker_available"] is (backend == "docker")
    assert body["timestamp"].endswith("Z")
    assert body["files"] == "host" and body["transport"] == "unix"


async def test_create_get_list_delete(server: RunningServer, backend: str) -> None:
    created = await server.create_session(task="build a flask app")
    assert created.keys() >= COMPAT_FIELDS
    assert created["status"] == "active" and created["container_status"] == "running"
    assert created["last_task"] == "build a flask app" and created["sandbox"] == backend  # until a task
    workdir = Path(str(created["workdir"]))
    assert workdir.is_dir()
    sid = created["session_id"]

    got = (await server.client.get(f"/api/sessions/{sid}")).json()
    assert got["session_id"] == sid and got["container_id"] == created["container_id"]
    listed = (await server.client.get("/api/sessions")).json()
    assert [s["session_id"] for s in listed] == [sid]

    deleted = await server.client.delete(f"/api/sessions/{sid}")
    assert deleted.status_code == 200 and "message" in deleted.json()
    assert (await server.client.get(f"/api/sessions/{sid}")).status_code == 404
    assert not workdir.exists()
    assert await server.runtime.provider.managed_ids() == []


async def test_bad_input_gets_clear_4xx(server: RunningServer) -> None:
    missing = await server.client.get("/api/sessions/nope")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    assert (await server.client.delete("/api/sessions/nope")).status_code == 404
    bad = await server.client.post(
        "/api/sessions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422
    wrong_type = await server.client.post("/api/sessions", json={"task": 5})
    assert wrong_type.status_code == 422
    assert (await server.client.post("/api/sessions/nope/tasks", json={"task": "x"})).status_code == 404


async def test_a_nul_byte_anywhere_is_a_400(server: RunningServer) -> None:
    """Commands, paths and patterns become C strings (argv, file names): a NUL is refused, never a 5xx."""
    sid = (await server.create_session(task="nul"))["session_id"]
    base = f"/api/sessions/{sid}"
    c = server.client
    answers = {
        "shell": await c.post(f"{base}/shell", json={"cmd": "echo a\x00b"}),
        "process": await c.post(f"{base}/processes", json={"cmd": "echo a\x00b"}),
        "write": await c.post(f"{base}/files/content", json={"path": "a\x00b", "content": "x"}),
        "grep": await c.post(f"{base}/search/grep", json={"pattern": "a\x00b"}),
        "find": await c.post(f"{base}/search/files", json={"pattern": "a\x00b"}),
        "file types": await c.post(f"{base}/search/grep", json={"pattern": "a", "file_types": "\x00"}),
    }
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 400)
    assert all("NUL" in r.json()["detail"] for r in answers.values())
    assert (await c.get(f"{base}/processes")).json() == []  # nothing was started
    # Stored text cannot hold a NUL on PostgreSQL (it was a 500 there): refused by the schema.
    refused = [
        await c.post("/api/sessions", json={"task": "label \x00"}),
        await c.post("/api/sessions", json={"metadata": {"a": [{"b\x00": 1}]}}),
        await c.post("/api/sessions", json={"metadata": {"a": {"b": "c\x00"}}}),
        await c.post(f"{base}/tasks", json={"task": "do \x00 this"}),
    ]
    assert [r.status_code for r in refused] == [422] * 4
    kept = await c.post("/api/sessions", json={"metadata": {"text": "a literal \\u0000 is fine"}})
    assert kept.status_code == 200 and kept.json()["metadata"] == {"text": "a literal \\u0000 is fine"}
    assert len((await c.get("/api/sessions")).json()) == 2


async def test_seed_websocket_flow(server: RunningServer) -> None:
    sid = (await server.create_session(task="label"))["session_id"]
    async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "connection_established" and hello["session_id"] == sid
        assert "message" in hello and hello["timestamp"].endswith("Z")
        await ws.send("hello there")
        assert json.loads(await ws.recv()) == {"type": "echo", "data": "hello there"}
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"
        await ws.send(b"\x00\x01binary")
        assert json.loads(await ws.recv())["type"] == "error"


async def test_websocket_unknown_session_is_closed(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws_url}/ws/unknown") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_openapi_and_docs(server: RunningServer) -> None:
    spec = (await server.client.get("/openapi.json")).json()
    assert "/api/sessions/{session_id}/search/grep" in spec["paths"]
    assert (await server.client.get("/docs")).status_code == 200
    assert (await server.client.get("/redoc")).status_code == 200
