"""The original web client's calls, shape by shape: shells, conversation, last_task, CORS, health."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from crogia.store import repo
from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server
from tests.terminals.helpers import TermClient, new_shell

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / "env.example"
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "make a file"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "write_file", "arguments": '{"path": "a"}'}}
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "wrote a"},
    {"role": "assistant", "content": "Done: a exists."},
]  # fmt: skip


def _iso_z(value: str) -> None:
    assert value.endswith("Z") and datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_shell_shapes(server: RunningServer) -> None:
    sid = str((await server.create_session())["session_id"])
    created = await new_shell(server, sid)
    assert re.fullmatch(r"shell_[0-9a-f]{24}", created["shell_id"])
    assert created["session_id"] == sid and created["status"] == "active"
    _iso_z(created["created"])
    listed = (await server.client.get(f"/api/sessions/{sid}/shells")).json()
    assert list(listed) == ["shells"] and len(listed["shells"]) == 1
    item = listed["shells"][0]
    assert {k: item[k] for k in ("shell_id", "session_id", "created", "status")} == {
        k: created[k] for k in ("shell_id", "session_id", "created", "status")
    }
    term = await TermClient.open(server, created["shell_id"])
    hello = term.events[0]
    assert hello["shell_id"] == created["shell_id"] and hello["session_id"] == sid
    assert isinstance(hello["message"], str) and hello["message"]
    _iso_z(hello["timestamp"])
    await term.type("echo shape\r")
    frame = await term.ws.recv()
    output = json.loads(frame)
    assert output["type"] == "shell_output" and output["shell_id"] == created["shell_id"]
    assert isinstance(output["data"], str)
    await term.close()
    deleted = await server.client.delete(f"/api/shells/{created['shell_id']}")
    assert deleted.status_code == 200 and isinstance(deleted.json()["message"], str)


async def test_last_task_and_conversation_shapes(server: RunningServer) -> None:
    session = await server.create_session(task="build a todo app")
    sid = str(session["session_id"])
    assert session["last_task"] == "build a todo app"
    assert (await server.client.get(f"/api/sessions/{sid}")).json()["last_task"] == "build a todo app"
    empty = (await server.client.get(f"/api/sessions/{sid}/conversation")).json()
    assert empty == {"session_id": sid, "messages": [], "last_task": "build a todo app", "total_messages": 0}
    async with server.runtime.db.transaction() as db:
        await repo.append_messages(db, session_id=sid, task_id=None, start=0, messages=HISTORY)

    chat = (await server.client.get(f"/api/sessions/{sid}/conversation")).json()
    assert chat["session_id"] == sid and chat["last_task"] == "build a todo app"
    assert chat["total_messages"] == 2
    assert [(m["type"], m["content"]) for m in chat["messages"]] == [
        ("human", "make a file"), ("ai", "Done: a exists.")
    ]  # fmt: skip
    assert all(isinstance(m["id"], str) and m["id"] for m in chat["messages"])

    full = (await server.client.get(f"/api/sessions/{sid}/conversation/full")).json()
    assert full["session_id"] == sid and full["last_task"] == "build a todo app" and full["total_items"] == 4
    user, call, result, answer = full["conversation_history"]
    assert user == {"role": "user", "content": "make a file"}
    assert call["type"] == "function_call" and isinstance(call["id"], str)
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "write_file", '{"path": "a"}')
    assert result == {"type": "function_call_output", "call_id": "call_1", "output": "wrote a"}
    assert answer["type"] == "message" and answer["role"] == "assistant" and isinstance(answer["id"], str)
    assert answer["content"] == [{"type": "output_text", "text": "Done: a exists."}]
    assert (await server.client.get("/api/sessions/nope/conversation/full")).status_code == 404


async def test_cors_preflight_from_vite_with_env_example(data_dir: Path) -> None:
    line = next(x for x in ENV_EXAMPLE.read_text().splitlines() if x.startswith("ALLOWED_ORIGINS="))
    origins = line.partition("=")[2].split("#")[0].strip()
    for settings in (make_settings(data_dir, "bubblewrap", allowed_origins=origins),
                     make_settings(data_dir, "bubblewrap")):  # fmt: skip
        async with run_server(settings) as server:
            for origin in ("http://localhost:5173", "http://127.0.0.1:5173", "http://localhost:3000"):
                preflight = await server.client.options(
                    "/api/sessions",
                    headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                             "Access-Control-Request-Headers": "content-type"},
                )  # fmt: skip
                assert preflight.status_code == 200, (origin, preflight.text)
                assert preflight.headers["access-control-allow-origin"] == origin
            evil = await server.client.options(
                "/api/sessions",
                headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
            )
            assert evil.status_code == 400
