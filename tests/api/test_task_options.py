"""Per-task options, usage per task and session, and compaction through the real server, on both
sandbox backends (the tools run in the sandbox)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from crogia.agent.compaction import SUMMARY_INSTRUCTIONS, SUMMARY_PREFIX
from tests.api.test_tasks import read_until, wait_task
from tests.conftest import make_settings
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.server import RunningServer, run_server


@pytest.fixture
async def model() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI(context_limit=9000, auto_usage=True) as scripted:
        yield scripted


@pytest.fixture
async def agent_server(data_dir: Path, backend: str, model: ScriptedOpenAI) -> AsyncIterator[RunningServer]:
    settings = make_settings(
        data_dir,
        backend,
        openai_base_url=model.base_url,
        model_retries=1,
        model_name="scripted-model",
        model_context_tokens=12_000,
        model_max_output_tokens=2000,
        context_keep_turns=2,
    )
    async with run_server(settings) as running:
        yield running


@pytest.mark.parametrize(
    "body",
    [
        {"max_turns": 0},
        {"max_turns": "3"},
        {"reasoning_effort": "extreme"},
        {"model": ""},
        {"model": "a b"},
        {"max_turn": 3},
    ],
)
async def test_bad_task_options_are_422(agent_server: RunningServer, body: dict[str, Any]) -> None:
    sid = (await agent_server.create_session())["session_id"]
    response = await agent_server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "hi", **body})
    assert response.status_code == 422, response.text


async def test_options_reach_the_model_and_usage_is_reported(
    agent_server: RunningServer, model: ScriptedOpenAI
) -> None:
    model.add(Reply("one", usage=(100, 10, 60, 4)), Reply("two", usage=(200, 20, 0, 8)))
    sid = (await agent_server.create_session())["session_id"]
    options = {"model": "o4-mini", "reasoning_effort": "low", "max_turns": 3}
    url = f"/api/sessions/{sid}/tasks"
    first = (await agent_server.client.post(url, json={"task": "hi", **options})).json()
    second = (await agent_server.client.post(url, json={"task": "again"})).json()
    done = await wait_task(agent_server, sid, first["task_id"], "completed")
    await wait_task(agent_server, sid, second["task_id"], "completed")

    o4, default = model.requests
    assert (o4["model"], o4["reasoning_effort"], o4["max_completion_tokens"]) == ("o4-mini", "low", 2000)
    assert (
        "temperature" not in o4 and default["model"] == "scripted-model" and "reasoning_effort" not in default
    )
    assert done["usage"]["cached_tokens"] == 60 and done["usage"]["reasoning_tokens"] == 4
    session = (await agent_server.client.get(f"/api/sessions/{sid}")).json()
    assert session["usage"]["prompt_tokens"] == 300 and session["usage"]["reasoning_tokens"] == 12
    async with websockets.connect(f"{agent_server.ws_url}/ws/{sid}?since=0") as ws:
        events = await read_until(ws, "task_completed")
    [completed] = [e for e in events if e["type"] == "task_completed"]
    assert completed["usage"]["cached_tokens"] == 60 and completed["usage"]["prompt_tokens"] == 100


def summarising(runs: int) -> Any:
    state = {"runs": 0}

    def respond(request: dict[str, Any]) -> Reply:
        if request["messages"][0]["content"] == SUMMARY_INSTRUCTIONS:
            return Reply("TASK: print big outputs. DONE: printed them. OPEN: none.")
        if request["messages"][-1].get("content") == "and now?":
            return Reply("still here")
        if state["runs"] < runs:
            state["runs"] += 1
            return Reply(
                tool_calls=[Call("run_shell", {"cmd": f"python3 -c \"print('{state['runs']}' * 6000)\""})]
            )
        return Reply("printed")

    return respond


async def test_a_long_task_compacts_and_the_next_task_continues_from_the_view(
    agent_server: RunningServer, model: ScriptedOpenAI
) -> None:
    model.responder = summarising(6)
    sid = (await agent_server.create_session())["session_id"]
    url = f"/api/sessions/{sid}/tasks"
    first = (await agent_server.client.post(url, json={"task": "print big outputs"})).json()
    await wait_task(agent_server, sid, first["task_id"], "completed")
    second = (await agent_server.client.post(url, json={"task": "and now?"})).json()
    await wait_task(agent_server, sid, second["task_id"], "completed")

    sent = model.requests[-1]["messages"]
    assert any(str(m.get("content", "")).startswith(SUMMARY_PREFIX) for m in sent)
    assert len(json.dumps(sent)) < 9000 * 4
    # The stored history is whole: every big output is there, though the model was sent a summary.
    history = await agent_server.runtime.tasks.conversation(sid)
    assert sum(1 for m in history if m["role"] == "tool" and len(m["content"]) >= 6000) == 6
    events = [e async for e in _events(agent_server, sid)]
    compacted = [e for e in events if e["type"] == "context_compacted"]
    assert compacted and all(e["tokens_after"] < e["tokens_before"] for e in compacted)


async def _events(server: RunningServer, sid: str) -> AsyncIterator[dict[str, Any]]:
    async with websockets.connect(f"{server.ws_url}/ws/{sid}?since=0") as ws:
        events = await read_until(ws, "task_completed")
        events += await read_until(ws, "task_completed")
    for event in events:
        yield event
