"""Whole agent tasks through the real server, the real openai client and a scripted model server,
on both sandbox backends: the seed's flow, reconnects with `since`, cancel, memory across tasks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.conftest import make_settings
from tests.support.postgres import free_port
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.server import RunningServer, run_server


@pytest.fixture
async def model() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI() as scripted:
        yield scripted


@pytest.fixture
async def agent_server(data_dir: Path, backend: str, model: ScriptedOpenAI) -> AsyncIterator[RunningServer]:
    settings = make_settings(data_dir, backend, openai_base_url=model.base_url, model_retries=1)
    async with run_server(settings) as running:
        yield running


async def read_until(ws: Any, last_type: str, timeout: float = 30) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def loop() -> None:
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["type"] == last_type:
                return

    await asyncio.wait_for(loop(), timeout)
    return events


async def wait_task(server: RunningServer, sid: str, task_id: str, status: str) -> dict[str, Any]:
    for _ in range(300):
        task = (await server.client.get(f"/api/sessions/{sid}/tasks/{task_id}")).json()
        if task["status"] == status:
            return task  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"task never reached {status}: {task}")


async def output_of(server: RunningServer, sid: str, cmd: str) -> str:
    """The first non-empty output of `cmd`, run again until it has one (at most 15 s)."""
    for _ in range(300):
        response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd})
        output = str(response.json()["output"]).strip()
        if output:
            return output
        await asyncio.sleep(0.05)
    raise AssertionError(f"`{cmd}` never printed anything")


async def test_seed_flow_streams_every_step(agent_server: RunningServer, model: ScriptedOpenAI) -> None:
    model.add(
        Reply(
            "I'll write it.",
            tool_calls=[Call("write_file", {"path": "hello.py", "content": "print('hi')\n"})],
        ),
        Reply(tool_calls=[Call("run_shell", {"cmd": "python3 hello.py"})], usage=(50, 5)),
        Reply("Done: it prints hi.", usage=(80, 6)),
    )
    session = await agent_server.create_session(task="say hi")
    sid = session["session_id"]
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}") as ws:
        assert json.loads(await ws.recv())["type"] == "connection_established"
        posted = await agent_server.client.post(
            f"/api/sessions/{sid}/tasks", json={"task": "write hello.py and run it"}
        )
        body = posted.json()
        assert posted.status_code == 200 and body["task"] == "write hello.py and run it" and body["task_id"]
        events = await read_until(ws, "task_completed")
    types = [e["type"] for e in events]
    assert types[0] == "task_started" and types[-1] == "task_completed"
    assert types.count("tool_call") == 2 and types.count("tool_complete") == 2
    assert (
        "".join(e["content"] for e in events if e["type"] == "text_delta")
        == "I'll write it.Done: it prints hi."
    )
    calls = [e for e in events if e["type"] == "tool_call"]
    assert json.loads(calls[0]["arguments"]) == {"path": "hello.py", "content": "print('hi')\n"}
    shell_done = [e for e in events if e["type"] == "tool_complete"][1]
    assert "hi" in shell_done["output"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["task_id"] == body["task_id"] for e in events)
    assert (Path(str(session["workdir"])) / "hello.py").read_text() == "print('hi')\n"
    task = await wait_task(agent_server, sid, body["task_id"], "completed")
    assert task["usage"]["total_tokens"] == 141
    got = (await agent_server.client.get(f"/api/sessions/{sid}")).json()
    assert got["last_task"] == "write hello.py and run it"


async def test_reconnect_with_since_misses_nothing(
    agent_server: RunningServer, model: ScriptedOpenAI
) -> None:
    model.add(Reply(["word "] * 40, delay=0.02))
    sid = (await agent_server.create_session())["session_id"]
    task_id = (await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "talk"})).json()[
        "task_id"
    ]
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}?since=0") as ws:
        await ws.recv()
        first = [json.loads(await ws.recv()) for _ in range(5)]
    last = first[-1]["seq"]
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}?since={last}") as ws:
        await ws.recv()
        rest = await read_until(ws, "task_completed")
    events = first + rest
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    text = "".join(e["content"] for e in events if e["type"] == "text_delta")
    assert text == "word " * 40
    await wait_task(agent_server, sid, task_id, "completed")


async def test_cancel_mid_tool_kills_the_command(agent_server: RunningServer, model: ScriptedOpenAI) -> None:
    model.add(Reply(tool_calls=[Call("run_shell", {"cmd": "echo $$ > pid.txt; sleep 60", "timeout": 120})]))
    sid = (await agent_server.create_session())["session_id"]
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}") as ws:
        await ws.recv()
        task_id = (
            await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "hang"})
        ).json()["task_id"]
        await read_until(ws, "tool_call")
        pid = await output_of(agent_server, sid, "cat pid.txt 2>/dev/null")  # the command runs now
        started = asyncio.get_running_loop().time()
        cancelled = await agent_server.client.post(f"/api/sessions/{sid}/tasks/{task_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert asyncio.get_running_loop().time() - started < 1.5
        await read_until(ws, "task_cancelled")
    # Killed by the cancel; gone once the daemon has reaped it (a zombie still answers kill -0).
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        check = await agent_server.client.post(
            f"/api/sessions/{sid}/shell",
            json={"cmd": f"kill -0 {int(pid)} 2>/dev/null && echo alive || echo gone"},
        )
        if check.json()["output"].strip() == "gone":
            break
        assert asyncio.get_running_loop().time() < deadline, "the cancelled command still runs"
        await asyncio.sleep(0.05)
    # The session stays usable and the conversation stays valid for the next task.
    model.add(Reply("still here"))
    next_id = (await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "again"})).json()[
        "task_id"
    ]
    await wait_task(agent_server, sid, next_id, "completed")
    sent = model.messages()
    tool_ids = {m["tool_call_id"] for m in sent if m["role"] == "tool"}
    asked = {c["id"] for m in sent if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    assert asked == tool_ids


async def test_second_task_continues_the_conversation(
    agent_server: RunningServer, model: ScriptedOpenAI
) -> None:
    model.add(Reply("The secret is 42."), Reply("You told me 42."))
    sid = (await agent_server.create_session())["session_id"]
    first = (
        await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "remember 42"})
    ).json()
    second = (
        await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "what was it?"})
    ).json()
    await wait_task(agent_server, sid, second["task_id"], "completed")
    await wait_task(agent_server, sid, first["task_id"], "completed")
    contents = [m.get("content") for m in model.messages()]
    assert "remember 42" in contents and "The secret is 42." in contents and contents[-1] == "what was it?"
    conversation = (await agent_server.client.get(f"/api/sessions/{sid}/conversation")).json()
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant", "user", "assistant"]
    tasks = (await agent_server.client.get(f"/api/sessions/{sid}/tasks")).json()
    assert [t["task_id"] for t in tasks] == [first["task_id"], second["task_id"]]


async def test_agent_runs_a_server_edits_files_and_survives_bad_tools(
    agent_server: RunningServer, model: ScriptedOpenAI
) -> None:
    port = free_port()
    serve = f"python3 -m http.server {port} --bind 127.0.0.1"
    get = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/page.txt').read().decode())"
    # Again until the server listens:
    fetch = f'for i in $(seq 200); do python3 -c "{get}" 2>/dev/null && break; sleep 0.05; done'
    model.add(
        Reply(tool_calls=[Call("write_file", {"path": "page.txt", "content": "old text"})]),
        Reply(tool_calls=[Call("edit_file", {"path": "page.txt", "old_text": "old", "new_text": "new"})]),
        Reply(tool_calls=[Call("start_process", {"cmd": serve})]),
        Reply(tool_calls=[Call("run_shell", {"cmd": fetch})]),
        Reply(tool_calls=[Call("no_such_tool", {}), Call("list_processes", "{not json")]),
        Reply("Served it."),
    )
    sid = (await agent_server.create_session())["session_id"]
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}") as ws:
        await ws.recv()
        await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "serve a page"})
        events = await read_until(ws, "task_completed")
    outputs = [e for e in events if e["type"] == "tool_complete"]
    assert [e["tool_name"] for e in outputs] == [
        "write_file",
        "edit_file",
        "start_process",
        "run_shell",
        "no_such_tool",
        "list_processes",
    ]
    assert "new text" in outputs[3]["output"]
    assert outputs[4]["is_error"] and "no_such_tool" in outputs[4]["output"]
    assert outputs[5]["is_error"]
    assert any(e["type"] == "process_started" for e in events)
    procs = (await agent_server.client.get(f"/api/sessions/{sid}/processes")).json()
    assert [p["status"] for p in procs] == ["running"]
    # The model saw the tool errors as text it can act on.
    tool_texts = [m["content"] for m in model.messages() if m["role"] == "tool"]
    assert any("no_such_tool" in text for text in tool_texts)


async def test_max_turns_and_missing_key_end_with_clear_events(
    data_dir: Path, backend: str, model: ScriptedOpenAI
) -> None:
    loop_forever = Reply(tool_calls=[Call("list_directory", {})])
    model.add(loop_forever, loop_forever, loop_forever)
    settings = make_settings(data_dir, backend, openai_base_url=model.base_url, max_turns=2)
    async with run_server(settings) as server:
        sid = (await server.create_session())["session_id"]
        async with websockets.connect(f"{server.ws_url}/ws/{sid}") as ws:
            await ws.recv()
            task_id = (await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "loop"})).json()[
                "task_id"
            ]
            events = await read_until(ws, "task_failed")
        task = await wait_task(server, sid, task_id, "failed")
    assert events[-2]["type"] == "error" and "limit of 2 model turns" in events[-2]["message"]
    assert "turns" in task["error"]
    no_key = make_settings(data_dir, backend, openai_base_url=model.base_url, openai_api_key="")
    async with run_server(no_key) as server:
        sid = (await server.create_session())["session_id"]
        task_id = (await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "x"})).json()[
            "task_id"
        ]
        task = await wait_task(server, sid, task_id, "failed")
    assert "OPENAI_API_KEY" in task["error"]
