"""Stuck and budget guards: each ends the task cleanly, with a reason a user can act on."""

from __future__ import annotations

from typing import Any

import pytest

from crogia.agent.errors import AgentStuck, MaxTurnsExceeded, TaskLimitReached
from crogia.agent.loop import TaskOptions
from crogia.agent.run import RunLimits
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


def same_failing_call(_: dict[str, Any]) -> Reply:
    return Reply(tool_calls=[Call("read_file", {"path": "missing.txt"})])


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_the_same_failing_call_is_flagged_at_three_and_stops_the_task_at_five(
    api: str, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    async with ScriptedOpenAI(responder=same_failing_call) as server:
        with pytest.raises(AgentStuck, match=r"same failing call 5 times in a row \(read_file") as caught:
            await run_task(make_agent(base_url=server.base_url, api=api), "go", host, recorder)

    assert caught.value.code == "agent_stuck" and len(server.requests) == 5
    outputs = [c.output for c in recorder.of_type("tool_complete")]
    assert ["failed 3 times in a row" in o for o in outputs] == [False, False, True, False, False]
    assert "failed 4 times in a row" in outputs[3]
    assert_valid_conversation(recorder.conversation)


async def test_a_different_call_between_failures_resets_the_count(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    bad, other = Call("read_file", {"path": "missing.txt"}), Call("list_directory", {})
    scripted.add(*[Reply(tool_calls=[c]) for c in (bad, bad, other, bad, bad)], Reply("gave up"))
    outcome = await run_task(make_agent(), "go", host, recorder)
    assert outcome.final_text == "gave up"
    assert not any("in a row" in c.output for c in recorder.of_type("tool_complete"))


async def test_task_max_tokens_ends_the_task_with_its_reason(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(*[Reply(tool_calls=[Call("list_directory", {})], usage=(100, 20))] * 3)
    agent = make_agent(limits=RunLimits(max_tokens=250))
    with pytest.raises(
        TaskLimitReached, match=r"used 360 tokens, reaching its limit of 250 \(TASK_MAX_TOKENS\)"
    ) as caught:
        await run_task(agent, "go", host, recorder)

    assert len(scripted.requests) == 3 and caught.value.context["usage"]["total_tokens"] == 360
    assert_valid_conversation(recorder.conversation)
    assert "limit of 250 tokens" in recorder.conversation[-1]["content"]


async def test_task_timeout_ends_a_slow_task_with_its_reason(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply(tool_calls=[Call("run_shell", {"cmd": "sleep 30"})]))
    agent = make_agent(limits=RunLimits(timeout=0.5))
    with pytest.raises(TaskLimitReached, match=r"ran out of time after 0.5s \(TASK_TIMEOUT\)"):
        await run_task(agent, "go", host, recorder)

    assert_valid_conversation(recorder.conversation)
    assert "ran out of time" in recorder.conversation[-1]["content"]
    [complete] = recorder.of_type("tool_complete")
    assert complete.is_error and "TASK_TIMEOUT" in complete.output


async def test_max_turns_per_task_overrides_the_agent_setting(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(*[Reply(tool_calls=[Call("list_directory", {})])] * 2)
    agent = make_agent(max_turns=50)
    with pytest.raises(MaxTurnsExceeded, match="limit of 2 model turns"):
        await agent.run(
            "go", [], host, emit=recorder.emit, save=recorder.save, options=TaskOptions(max_turns=2)
        )
    assert len(scripted.requests) == 2
