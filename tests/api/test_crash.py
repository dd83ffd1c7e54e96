"""kill -9 of the server in the middle of a task, then a restart: nothing stored is lost."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.subprocess_server import ServerProcess, server_env

pytestmark = pytest.mark.slow


async def test_kill_9_mid_task_then_restart(data_dir: Path, backend: str) -> None:
    async with ScriptedOpenAI() as model:
        model.add(
            Reply("Writing.", tool_calls=[Call("write_file", {"path": "kept.txt", "content": "yes"})]),
            Reply(["slow "] * 400, delay=0.05),
        )
        server = ServerProcess(data_dir, server_env(data_dir, backend, model.base_url))
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                sid = (await client.post("/api/sessions", json={"task": "crash"})).json()["session_id"]
                proc = (await client.post(f"/api/sessions/{sid}/processes", json={"cmd": "sleep 600"})).json()
                task_id = (await client.post(f"/api/sessions/{sid}/tasks", json={"task": "long"})).json()[
                    "task_id"
                ]
                async with websockets.connect(f"{server.ws_url}/ws/{sid}?since=0") as ws:
                    seen = []
                    while len([e for e in seen if e["type"] == "text_delta"]) < 5:
                        seen.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await server.kill()

            await server.start()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                session = (await client.get(f"/api/sessions/{sid}")).json()
                task = (await client.get(f"/api/sessions/{sid}/tasks/{task_id}")).json()
                conversation = (await client.get(f"/api/sessions/{sid}/conversation/full")).json()
                processes = {p["pid"]: p for p in (await client.get(f"/api/sessions/{sid}/processes")).json()}
                kept = (await client.post(f"/api/sessions/{sid}/shell", json={"cmd": "cat kept.txt"})).json()
                async with websockets.connect(f"{server.ws_url}/ws/{sid}?since=0") as ws:
                    await ws.recv()
                    replay = []
                    while not replay or replay[-1]["type"] != "task_failed":
                        replay.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                await client.delete(f"/api/sessions/{sid}")
            await server.stop()
            # uvicorn re-raises SIGTERM after a graceful shutdown, so the log tells whether it was one.
            assert "Application shutdown complete" in server.log.read_text()
        finally:
            if server.proc is not None and server.proc.returncode is None:
                await server.kill()

    assert session["status"] == "active" and session["container_status"] == "running"
    assert kept["output"] == "yes"
    assert task["status"] == "failed" and "restart" in task["error"]
    # Every event a client saw before the crash is still there, in order, and the story goes on.
    seen_seqs = [e["seq"] for e in seen if "seq" in e]
    assert [e["seq"] for e in replay][: len(seen_seqs)] == seen_seqs
    assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))
    assert replay[-2]["type"] == "error" and replay[-1]["task_id"] == task_id
    # The user's message, the model's tool call and the tool's result were all stored before the crash.
    kinds = [item.get("type", item.get("role")) for item in conversation["conversation_history"]]
    assert kinds[0] == "user" and "function_call" in kinds and "function_call_output" in kinds
    status = processes[proc["pid"]]["status"]
    # Docker keeps the container (and the process) alive across the crash; bubblewrap dies with its parent.
    assert status == ("running" if backend == "docker" else "exited")
