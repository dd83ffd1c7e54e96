"""A model server that misbehaves: each case is told to the model, retried, or a clear error."""

from __future__ import annotations

import json

import pytest

from crogia.agent.errors import ModelError
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


def chunk(delta: dict[str, object], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps(
        {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
    )


async def test_a_tool_call_without_id_gets_one_and_its_answer_matches(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    no_id = {
        "tool_calls": [
            {"index": 0, "type": "function", "function": {"name": "list_directory", "arguments": "{}"}}
        ]
    }
    scripted.add(Reply(raw=[chunk(no_id), chunk({}, "tool_calls")]), Reply("ok"))
    outcome = await run_task(make_agent(), "hi", host, recorder)

    assert outcome.final_text == "ok"
    [call] = recorder.conversation[1]["tool_calls"]
    assert call["id"].startswith("call_") and recorder.conversation[2]["tool_call_id"] == call["id"]
    assert_valid_conversation(scripted.messages()[1:])


@pytest.mark.parametrize(
    "raw",
    [
        [json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": []})],  # empty choices, no end
        ["42"],  # not a JSON object
        [chunk({"content": "half"})],  # no finish_reason
    ],
    ids=["empty-choices", "not-an-object", "no-finish"],
)
async def test_a_malformed_stream_is_retried_then_ends_with_a_clear_error(
    raw: list[str], scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply(raw=raw), Reply("recovered"))
    assert (await run_task(make_agent(), "hi", host, recorder)).final_text == "recovered"
    assert len(recorder.of_type("error")) == 1

    scripted.add(Reply(raw=raw), Reply(raw=raw))
    with pytest.raises(ModelError, match="failed after 2 attempts"):
        await run_task(make_agent(retries=1), "hi", host, Recorder())


async def test_a_stream_that_ends_without_done_but_finished_is_accepted(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("complete answer", done=False))
    assert (await run_task(make_agent(), "hi", host, recorder)).final_text == "complete answer"
    assert recorder.of_type("error") == []


async def test_malformed_arguments_and_unknown_tools_go_back_to_the_model(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply(tool_calls=[Call("grep", '{"pattern": '), Call("rm_rf", {})]), Reply("sorry"))
    assert (await run_task(make_agent(), "hi", host, recorder)).final_text == "sorry"
    outputs = [m["content"] for m in scripted.messages() if m["role"] == "tool"]
    assert "not valid JSON" in outputs[0] and "unknown tool 'rm_rf'" in outputs[1]
