"""Cancelling a run leaves a saved conversation the next task can continue from."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from crogia.agent.conversation import CANCELLED
from crogia.agent.loop import RunOutcome
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


async def wait_until(check: Callable[[], object], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        # Polling: some conditions (a file a subprocess writes) have no event to wait on.
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def cancel(task: asyncio.Task[RunOutcome]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_during_a_slow_tool(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    pid_file: Path = host.root / "pid"
    slow = Call("run_shell", {"cmd": "echo $$ > pid; sleep 30"}, id="call_slow")
    never_run = Call("write_file", {"path": "later.txt", "content": "no"}, id="call_later")
    scripted.add(Reply("Running it.", tool_calls=[slow, never_run]))
    agent = make_agent()
    task = asyncio.create_task(run_task(agent, "run the slow thing", host, recorder))
    await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
    await cancel(task)

    conversation = recorder.conversation
    assert_valid_conversation(conversation)
    assert conversation[-2:] == [
        {"role": "tool", "tool_call_id": "call_slow", "content": CANCELLED},
        {"role": "tool", "tool_call_id": "call_later", "content": CANCELLED},
    ]
    assert recorder.types()[-2:] == ["tool_call", "tool_complete"]
    done = recorder.of_type("tool_complete")[-1]
    assert (done.call_id, done.is_error, done.output) == ("call_slow", True, CANCELLED)
    pid = int(pid_file.read_text())
    assert not alive(pid)  # the command went with the cancel
    assert not (host.root / "later.txt").exists()

    # The next task continues from that conversation and the model accepts it.
    scripted.add(Reply("Fine, I stopped."))
    outcome = await run_task(agent, "never mind", host, Recorder(), history=conversation)
    assert outcome.final_text == "Fine, I stopped."
    assert scripted.messages()[1:] == [*conversation, {"role": "user", "content": "never mind"}]


async def test_cancel_during_slow_tokens(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("one two three four five six seven", chunk_size=4, delay=0.2))
    task = asyncio.create_task(run_task(make_agent(), "count slowly", host, recorder))
    await wait_until(lambda: len(recorder.of_type("text_delta")) >= 2)
    started = asyncio.get_running_loop().time()
    await cancel(task)

    assert asyncio.get_running_loop().time() - started < 1.0  # prompt: no waiting for the stream
    streamed = "".join(event.content for event in recorder.of_type("text_delta"))
    assert streamed.startswith("one two ")
    assert len(streamed) < len("one two three four five six seven")
    # The text the user saw is kept as the assistant's (partial) answer.
    assert recorder.conversation == [
        {"role": "user", "content": "count slowly"},
        {"role": "assistant", "content": streamed},
    ]
