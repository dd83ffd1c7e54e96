"""Whole agent runs: the real openai client against the scripted server, tools on a real folder."""

from __future__ import annotations

import re
from typing import Any

import pytest

from crogia.agent.conversation import INTERRUPTED
from crogia.agent.errors import AgentNotConfigured
from crogia.agent.loop import Agent
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import MODEL, Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI

API_TOOLS = [
    "read_file", "write_file", "edit_file", "list_directory", "search_files", "grep",
    "run_shell", "start_process", "stop_process", "list_processes", "tail_log",
]  # fmt: skip


def echo_last_tool_result(request: dict[str, Any]) -> Reply:
    """A scripted model that answers with what its last tool call returned."""
    return Reply(f"The tool said: {request['messages'][-1]['content']}")


async def test_writes_a_file_then_runs_it(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    program = "import sys\nprint('hello from', sys.argv[1])\n"
    scripted.add(
        Reply(
            "I will write it.", tool_calls=[Call("write_file", {"path": "app/hello.py", "content": program})]
        ),
        Reply(tool_calls=[Call("run_shell", {"cmd": "python3 app/hello.py crogia"}, pieces=5)]),
        echo_last_tool_result,
    )
    outcome = await run_task(make_agent(), "write hello.py and run it", host, recorder)

    assert (host.root / "app/hello.py").read_text() == program
    assert outcome.final_text.startswith("The tool said: hello from crogia")
    assert "[exit code: 0]" in outcome.final_text
    assert (outcome.turns, outcome.tool_calls) == (3, 2)
    request = scripted.requests[0]
    assert request["model"] == MODEL
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert [tool["function"]["name"] for tool in request["tools"]] == API_TOOLS
    assert_valid_conversation(recorder.conversation)


async def test_edit_file_replaces_once_and_explains_absent_or_ambiguous_text(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    (host.root / "config.py").write_text("a = 1\nb = 1\nc = 2\n")
    edit = "edit_file"
    scripted.add(
        Reply(
            tool_calls=[
                Call(edit, {"path": "config.py", "old_text": "c = 2", "new_text": "c = 3"}),
                Call(edit, {"path": "config.py", "old_text": "d = 4", "new_text": "d = 5"}),
                Call(edit, {"path": "config.py", "old_text": " = 1", "new_text": " = 0"}),
            ]
        ),
        Reply("edited"),
    )
    await run_task(make_agent(), "edit config", host, recorder)

    assert (host.root / "config.py").read_text() == "a = 1\nb = 1\nc = 3\n"
    done = recorder.of_type("tool_complete")
    assert [event.is_error for event in done] == [False, True, True]
    assert "line 3" in done[0].output
    assert "not found" in done[1].output
    assert "occurs 2 times" in done[2].output
    assert "exactly once" in done[2].output
    # The model is told the same thing, one tool message per call, in order.
    tool_messages = [m for m in scripted.messages(1) if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == [event.output for event in done]


async def test_bad_tool_calls_come_back_to_the_model_and_the_run_goes_on(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply(
            tool_calls=[
                Call("delete_everything", {"path": "."}),
                Call("read_file", '{"path": "a.txt"', pieces=2),
                Call("read_file", {}),
                Call("tail_log", {"pid": "seven"}),
                Call("read_file", {"file_path": "a.txt"}),
                Call("read_file", {"path": "missing.txt"}),
            ]
        ),
        Reply("I see my mistakes."),
    )
    outcome = await run_task(make_agent(), "do things", host, recorder)

    assert outcome.final_text == "I see my mistakes."
    outputs = [event.output for event in recorder.of_type("tool_complete")]
    assert all(event.is_error for event in recorder.of_type("tool_complete"))
    assert "unknown tool 'delete_everything'" in outputs[0]
    assert "read_file" in outputs[0]
    assert "not valid JSON" in outputs[1]
    assert "missing required parameter 'path'" in outputs[2]
    assert "'pid' must be an integer" in outputs[3]
    assert "unknown parameter(s) file_path" in outputs[4]
    assert "missing.txt" in outputs[5]
    # The broken JSON reached the event stream exactly as the model sent it.
    assert recorder.of_type("tool_call")[1].arguments == '{"path": "a.txt"'


async def test_events_come_in_order(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply("Let me look around.", chunk_size=4, tool_calls=[Call("list_directory", {})]),
        Reply(["All ", "good."]),
    )
    await run_task(make_agent(), "look", host, recorder)

    order = re.sub(r"(text_delta )+", "text_delta* ", " ".join(recorder.types()) + " ")
    assert order.split() == ["text_delta*", "tool_call", "tool_complete", "text_delta*"]
    texts = [event.content for event in recorder.of_type("text_delta")]
    assert texts == ["Let ", "me l", "ook ", "arou", "nd.", "All ", "good."]
    call, done = recorder.of_type("tool_call")[0], recorder.of_type("tool_complete")[0]
    assert (call.call_id, done.call_id) == ("call_1_0", "call_1_0")
    assert all(event.task_id == "task-1" for event in recorder.events)


async def test_usage_is_summed_over_the_task(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply(tool_calls=[Call("list_processes")], usage=(100, 10)),
        Reply(tool_calls=[Call("list_processes")], usage=(150, 20)),
        Reply("done", usage=(200, 5)),
    )
    outcome = await run_task(make_agent(), "count", host, recorder)

    usage = outcome.usage
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (450, 35, 485)
    assert usage["model_calls"] == 3


async def test_a_second_task_continues_from_the_saved_history(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost
) -> None:
    agent = make_agent()
    scripted.add(
        Reply(tool_calls=[Call("write_file", {"path": "n.txt", "content": "42"})]), Reply("Saved 42.")
    )
    first = Recorder()
    await run_task(agent, "remember 42", host, first)
    history = first.conversation

    scripted.add(Reply(tool_calls=[Call("read_file", {"path": "n.txt"})]), echo_last_tool_result)
    second = Recorder()
    outcome = await run_task(agent, "what was it?", host, second, history=history)

    assert outcome.final_text == "The tool said: 42"
    sent = scripted.messages(2)  # the second task's first model call
    assert sent[0]["role"] == "system"
    assert "/workspace" in sent[0]["content"]
    assert sent[1:] == [*history, {"role": "user", "content": "what was it?"}]
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    # What gets saved only grows: the first run's messages are an unchanged prefix.
    assert second.conversation[: len(history)] == history
    assert_valid_conversation(second.conversation)


async def test_unanswered_calls_in_an_old_history_are_closed_before_continuing(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    call = {"id": "call_old", "type": "function", "function": {"name": "run_shell", "arguments": "{}"}}
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "build"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    scripted.add(Reply("ok"))
    await run_task(make_agent(), "again", host, recorder, history=history)

    sent = scripted.messages(0)
    assert sent[3] == {"role": "tool", "tool_call_id": "call_old", "content": INTERRUPTED}
    assert_valid_conversation(sent[1:])


async def test_background_process_tools(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    def with_pid(name: str, **extra: Any) -> Any:
        def respond(request: dict[str, Any]) -> Reply:
            started = next(m for m in request["messages"] if m["role"] == "tool")["content"]
            pid = int(re.search(r"pid (\d+)", started).group(1))  # type: ignore[union-attr]
            return Reply(tool_calls=[Call(name, {"pid": pid, **extra})])

        return respond

    server = "python3 -u -c \"print('ready', flush=True); open('up', 'w'); import time; time.sleep(60)\""
    wait_up = "for i in $(seq 200); do [ -e up ] && break; sleep 0.05; done; test -e up"  # it has printed
    scripted.add(
        Reply(tool_calls=[Call("start_process", {"cmd": server})]),
        Reply(tool_calls=[Call("run_shell", {"cmd": wait_up})]),
        with_pid("tail_log", lines=5),
        Reply(tool_calls=[Call("list_processes")]),
        with_pid("stop_process"),
        Reply("stopped"),
    )
    await run_task(make_agent(), "serve", host, recorder)

    outputs = [event.output for event in recorder.of_type("tool_complete")]
    assert "Started pid" in outputs[0]
    assert "tail_log" in outputs[0]
    assert outputs[2] == "ready"
    assert "running" in outputs[3]
    assert "is stopped" in outputs[4]
    assert all(p.proc.returncode is not None for p in host.processes.values())


async def test_long_output_is_capped_and_says_so(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply(tool_calls=[Call("run_shell", {"cmd": "seq 1 40000; exit 3"})]), Reply("long"))
    await run_task(make_agent(), "count far", host, recorder)

    output = recorder.of_type("tool_complete")[0].output
    assert len(output.encode()) <= 16 * 1024
    assert "capped at 16 KiB" in output
    assert output.startswith("1\n2\n")
    assert "40000\n[exit code: 3]" in output


async def test_missing_configuration_fails_before_any_call(
    scripted: ScriptedOpenAI, host: LocalToolHost, recorder: Recorder
) -> None:
    for agent, words in [
        (Agent(model=MODEL, api_key="", base_url=scripted.base_url), "OPENAI_API_KEY"),
        (Agent(model="", api_key="k", base_url=scripted.base_url), "MODEL_NAME"),
    ]:
        await agent.warm_up()  # nothing to build: the run still says what is missing
        with pytest.raises(AgentNotConfigured, match=words):
            await run_task(agent, "hi", host, recorder)
    assert scripted.requests == []
    assert recorder.saved == []


async def test_warm_up_builds_the_client_off_the_loop_and_runs_use_it(
    scripted: ScriptedOpenAI, host: LocalToolHost, recorder: Recorder
) -> None:
    import threading

    built_on: list[str] = []
    agent = Agent(model=MODEL, api_key="k", base_url=scripted.base_url)
    original = agent._new_client

    def recording() -> Any:
        built_on.append(threading.current_thread().name)
        return original()

    agent._new_client = recording  # type: ignore[method-assign]
    try:
        await agent.warm_up()
        await agent.warm_up()  # once is enough
        scripted.add(Reply("warm"))
        outcome = await run_task(agent, "hi", host, recorder)
    finally:
        await agent.aclose()
    assert len(built_on) == 1 and built_on[0] != threading.main_thread().name
    assert outcome.final_text == "warm" and len(scripted.requests) == 1


async def test_model_options_reach_the_request(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("ok"))
    options = {"temperature": 0.2, "extra_body": {"top_k": 5}}
    await run_task(make_agent(model_options=options, system_prompt="Be terse."), "hi", host, recorder)

    request = scripted.requests[0]
    assert (request["temperature"], request["top_k"]) == (0.2, 5)
    assert request["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
    ]
    assert len(request["tools"]) == len(API_TOOLS)
