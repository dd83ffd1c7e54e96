"""The Responses API: the same events and stored conversation as Chat Completions, reasoning kept."""

from __future__ import annotations

import pytest

from crogia.agent.errors import ModelError
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


async def test_reasoning_items_go_back_to_the_model_on_the_next_turn(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    (host.workspace.root / "a.txt").write_text("alpha\n")
    scripted.add(
        Reply(
            "Reading.", reasoning="look at a.txt", tool_calls=[Call("read_file", {"path": "a.txt"}, pieces=4)]
        ),
        Reply("It says alpha.", reasoning="done", usage=(300, 40, 200, 25)),
    )
    agent = make_agent(model="o4-mini", api="responses")
    outcome = await run_task(agent, "what is in a.txt?", host, recorder)

    assert outcome.final_text == "It says alpha."
    assert outcome.usage["cached_tokens"] == 200 and outcome.usage["reasoning_tokens"] == 25
    second = scripted.inputs(1)
    reasoning = [item for item in second if item.get("type") == "reasoning"]
    assert reasoning == [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "look at a.txt"}],
            "encrypted_content": "enc:1:opaque",
        }
    ]
    kinds = [item.get("type", item.get("role")) for item in second]
    assert kinds == ["user", "reasoning", "message", "function_call", "function_call_output"]
    [output] = [item for item in second if item.get("type") == "function_call_output"]
    assert output["call_id"] == "call_1_0" and "alpha" in output["output"]
    # The same events and stored shape as Chat Completions.
    kinds_seen = [t for n, t in enumerate(recorder.types()) if n == 0 or recorder.types()[n - 1] != t]
    assert kinds_seen == ["text_delta", "tool_call", "tool_complete", "text_delta"]
    assert "".join(d.content for d in recorder.of_type("text_delta")) == "Reading.It says alpha."
    [call] = recorder.of_type("tool_call")
    assert call.arguments == '{"path": "a.txt"}'
    conversation = recorder.conversation
    assert_valid_conversation(conversation)
    assert conversation[1]["tool_calls"][0]["function"]["name"] == "read_file"


async def test_a_session_switches_api_between_tasks(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply(reasoning="r", tool_calls=[Call("list_directory", {})]),
        Reply("first done", reasoning="r2"),
        Reply("second done"),
        Reply("third done"),
    )
    await run_task(make_agent(api="responses"), "one", host, recorder)
    history = recorder.conversation
    await run_task(make_agent(api="chat"), "two", host, recorder, history=history)
    # Chat Completions never sees the Responses items; the next Responses task gets them back.
    chat_messages = scripted.messages(2)
    assert all("items" not in message for message in chat_messages)
    assert [m["role"] for m in chat_messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    await run_task(make_agent(api="responses"), "three", host, recorder, history=recorder.conversation)
    kinds = [item.get("type", item.get("role")) for item in scripted.inputs(3)]
    assert kinds.count("reasoning") == 2 and kinds[-1] == "user"


@pytest.mark.parametrize("drop", ["eof", "abort"])
async def test_a_responses_stream_cut_before_completed_is_retried(
    drop: str, scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("partial answer", break_after=4, drop=drop), Reply("whole answer"))  # type: ignore[arg-type]
    outcome = await run_task(make_agent(api="responses"), "hi", host, recorder)

    assert outcome.final_text == "whole answer" and len(scripted.requests) == 2
    [error] = recorder.of_type("error")
    assert "retrying" in error.message


async def test_bad_tool_calls_on_the_responses_api_go_back_to_the_model(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply(
            tool_calls=[
                Call("read_file", '{"path": '),
                Call("no_such_tool", {}),
                Call("list_directory", {}, id=""),
            ]
        ),
        Reply("recovered"),
    )
    outcome = await run_task(make_agent(api="responses"), "hi", host, recorder)

    assert outcome.final_text == "recovered"
    outputs = [c.output for c in recorder.of_type("tool_complete")]
    assert "not valid JSON" in outputs[0] and "unknown tool 'no_such_tool'" in outputs[1]
    invented = recorder.conversation[1]["tool_calls"][2]["id"]
    assert invented.startswith("call_")  # a call without an id got one, and its output matches it
    assert_valid_conversation(recorder.conversation)


async def test_a_failed_response_event_is_retried_then_ends_the_run(
    make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    async with ScriptedOpenAI(Reply("x", finish_reason="length"), responder=lambda _: Reply("y")) as server:
        outcome = await run_task(make_agent(base_url=server.base_url, api="responses"), "hi", host, recorder)
    # An incomplete response (output budget reached) still ends the turn: its text is the answer.
    assert outcome.final_text == "x"
    with pytest.raises(ModelError):
        async with ScriptedOpenAI() as empty:
            await run_task(
                make_agent(base_url=empty.base_url, api="responses", retries=0), "hi", host, recorder
            )
