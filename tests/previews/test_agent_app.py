"""The seed's example task, scripted: the agent writes and starts a web app; a client opens it by preview."""

from __future__ import annotations

from pathlib import Path

import websockets

from tests.api.test_tasks import read_until
from tests.conftest import make_settings
from tests.previews.helpers import APP
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.server import run_server

WAIT_PORT = (
    "for i in $(seq 300); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))'"
    " 2>/dev/null && echo UP && break; sleep 0.05; done"
)


async def test_create_a_web_app_then_open_it_by_preview(data_dir: Path, backend: str) -> None:
    async with ScriptedOpenAI() as model:
        model.add(
            Reply(tool_calls=[Call("write_file", {"path": "app.py", "content": APP})]),
            Reply(tool_calls=[Call("start_process", {"cmd": "python3 app.py 8000"})]),
            Reply(tool_calls=[Call("run_shell", {"cmd": WAIT_PORT})]),
            Reply(tool_calls=[Call("list_processes", {})]),
            Reply("The app runs on port 8000."),
        )
        settings = make_settings(data_dir, backend, openai_base_url=model.base_url, model_retries=1)
        async with run_server(settings) as server:
            sid = (await server.create_session())["session_id"]
            async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
                await ws.recv()
                body = {"task": "Create a Flask app"}
                assert (await server.client.post(f"/api/sessions/{sid}/tasks", json=body)).status_code == 200
                events = await read_until(ws, "task_completed", timeout=60)
            listing = [
                e for e in events if e["type"] == "tool_complete" and e["tool_name"] == "list_processes"
            ]
            assert "listening on port 8000" in listing[0]["output"], listing
            ports = (await server.client.get(f"/api/sessions/{sid}/ports")).json()["ports"]
            url = next(p["url"] for p in ports if p["port"] == 8000)
            page = await server.client.get(url)
            assert page.status_code == 200 and "hello from the sandbox" in page.text
