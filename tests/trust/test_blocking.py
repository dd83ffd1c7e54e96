"""Nothing on the request path blocks the event loop, on both backends.

blockbuster (the detector pydantic-ai uses) makes the blocking calls it knows (file and socket I/O,
`os.stat`, `time.sleep`, locks, sqlite3, ...) raise when made on the loop's thread from Crogia's
code, so a route that blocks answers 500 and a background task that blocks logs the error. One
session then goes through the REST API a user drives, an agent task uses every tool, the warm pool
refills, and an idle session's sandbox is stopped and started again.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets
from blockbuster import blockbuster_ctx

from tests.conftest import make_settings
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.server import RunningServer, run_server

TOOL_TURNS = [
    Reply("Writing.", tool_calls=[Call("write_file", {"path": "h.py", "content": "print(1)\n"})]),
    Reply("", tool_calls=[Call("run_shell", {"cmd": "python3 h.py"}), Call("grep", {"pattern": "print"})]),
    Reply(
        "",
        tool_calls=[
            Call("list_directory", {}),
            Call("read_file", {"path": "h.py"}),
            Call("start_process", {"cmd": "sleep 0.3"}),
        ],
    ),
    Reply(
        "",
        tool_calls=[
            Call("list_processes", {}),
            Call("search_files", {"pattern": "*.py"}),
            Call("edit_file", {"path": "h.py", "old_text": "1", "new_text": "2"}),
        ],
    ),
    Reply("Done."),
]


async def rest_calls(server: RunningServer) -> list[tuple[str, int]]:
    c = server.client
    created = await c.post("/api/sessions", json={"task": "blocking"})
    sid = created.json()["session_id"]
    base = f"/api/sessions/{sid}"
    calls: list[tuple[str, Any]] = [
        ("get", c.get(base)),
        ("list", c.get("/api/sessions")),
        ("shell", c.post(f"{base}/shell", json={"cmd": "echo hi"})),
        ("shell stream", c.post(f"{base}/shell/stream", json={"cmd": "echo hi"})),
        ("write", c.post(f"{base}/files/content", json={"path": "a/b.txt", "content": "hello"})),
        ("read", c.get(f"{base}/files/content", params={"path": "a/b.txt"})),
        ("list files", c.get(f"{base}/files", params={"path": ".", "depth": 3})),
        ("download", c.get(f"{base}/files/raw", params={"path": "a/b.txt"})),
        ("upload", c.put(f"{base}/files/raw", params={"path": "c.bin"}, content=b"xyz")),
        ("move", c.post(f"{base}/files/move", json={"src": "c.bin", "dst": "d.bin"})),
        ("mkdir", c.post(f"{base}/files/mkdir", json={"path": "e/f"})),
        ("grep", c.post(f"{base}/search/grep", json={"pattern": "hello"})),
        ("find", c.post(f"{base}/search/files", json={"pattern": "*.txt"})),
        ("start process", c.post(f"{base}/processes", json={"cmd": "sleep 0.2; echo done"})),
    ]
    statuses = [("create", created.status_code)]
    for name, call in calls:  # one at a time: a failure names its call
        statuses.append((name, (await call).status_code))
    await asyncio.sleep(0.5)  # the process exits: its exit is recorded in the background
    for name, call in [
        ("processes", c.get(f"{base}/processes")),
        ("delete file", c.delete(f"{base}/files", params={"path": "a", "recursive": "true"})),
        ("health", c.get("/api/health")),
        ("delete", c.delete(base)),
    ]:
        statuses.append((name, (await call).status_code))
    return statuses


async def agent_task(server: RunningServer) -> list[dict[str, Any]]:
    sid = (await server.client.post("/api/sessions", json={"task": "agent"})).json()["session_id"]
    events: list[dict[str, Any]] = []
    async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
        await ws.recv()
        posted = await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "use every tool"})
        assert posted.status_code == 200, posted.text
        while not events or events[-1]["type"] not in ("task_completed", "task_failed"):
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        await ws.send(json.dumps({"type": "ping"}))
        events.append(json.loads(await ws.recv()))
    assert (await server.client.delete(f"/api/sessions/{sid}")).status_code == 200
    return events


async def idle_and_back(server: RunningServer) -> list[tuple[str, int]]:
    """A session left idle has its sandbox stopped (the reaper), then started again by a command."""
    sid = (await server.client.post("/api/sessions", json={"task": "idle"})).json()["session_id"]
    stopped = False
    for _ in range(100):
        stopped = (await server.client.get(f"/api/sessions/{sid}")).json()["status"] == "stopped"
        if stopped:
            break
        await asyncio.sleep(0.1)
    woke = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": "echo back"})
    deleted = await server.client.delete(f"/api/sessions/{sid}")
    return [
        ("wake", woke.status_code if woke.json().get("output") == "back\n" else 599),
        ("delete", deleted.status_code),
    ]


async def test_no_blocking_call_on_the_loop(
    data_dir: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ScriptedOpenAI() as model:
        for reply in TOOL_TURNS:
            model.add(reply)
        settings = make_settings(
            data_dir, backend, openai_base_url=model.base_url, model_retries=0, sandbox_pool_size=1
        )
        async with run_server(settings) as server:
            await server.runtime.pool.wait_ready()
            with blockbuster_ctx(scanned_modules=["crogia"]):
                statuses = await rest_calls(server)  # claims from the pool, which refills meanwhile
                events = await agent_task(server)
                await server.runtime.pool.wait_ready()
        idle = settings.model_copy(update={"session_idle_ttl": 0.5, "sandbox_pool_size": 0})
        async with run_server(idle) as server:
            with blockbuster_ctx(scanned_modules=["crogia"]):
                statuses += await idle_and_back(server)
    assert [(name, code) for name, code in statuses if code >= 400] == []
    assert "Blocking call" not in caplog.text
    done = [e for e in events if e["type"] == "tool_complete"]
    assert len(done) == 9 and not [e["output"] for e in done if e.get("is_error")]
    assert events[-2]["type"] == "task_completed" and events[-1]["type"] == "pong"
