"""Model failures: retries with backoff, broken streams, errors that end the run, max turns."""

from __future__ import annotations

import time

import pytest
from openai import AsyncOpenAI

from crogia.agent.errors import MaxTurnsExceeded, ModelError
from crogia.agent.loop import Agent
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import MODEL, Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, HttpError, Reply, ScriptedOpenAI


async def test_rate_limit_is_retried_after_the_server_given_delay(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(HttpError(429, "slow down", retry_after=0.05), Reply("made it"))
    # Our own backoff would wait 30 s: finishing fast shows retry-after was honoured.
    agent = make_agent(backoff=30.0)
    started = time.monotonic()
    outcome = await run_task(agent, "hi", host, recorder)

    assert outcome.final_text == "made it"
    assert time.monotonic() - started < 5
    assert len(scripted.requests) == 2
    [error] = recorder.of_type("error")
    assert "HTTP 429" in error.message
    assert "retrying in 0.1s (attempt 2 of 4)" in error.message
    assert recorder.types().index("error") < recorder.types().index("text_delta")


async def test_server_errors_exhausting_retries_end_the_run(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(*[HttpError(500, "boom")] * 3)
    with pytest.raises(ModelError, match=r"failed after 3 attempts: HTTP 500") as caught:
        await run_task(make_agent(retries=2), "hi", host, recorder)

    assert caught.value.code == "model_error"
    assert len(scripted.requests) == 3
    assert len(recorder.of_type("error")) == 2
    assert recorder.conversation == [{"role": "user", "content": "hi"}]


async def test_a_refused_request_is_not_retried(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(HttpError(401, "Incorrect API key provided"))
    with pytest.raises(ModelError, match=r"refused the request: HTTP 401.*Incorrect API key"):
        await run_task(make_agent(), "hi", host, recorder)
    assert len(scripted.requests) == 1
    assert recorder.of_type("error") == []


async def test_a_stream_broken_half_way_is_retried_and_the_partial_turn_discarded(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(
        Reply("Half of an answer that never ends", chunk_size=5, break_after=3),
        Reply(
            tool_calls=[Call("write_file", {"path": "x.txt", "content": "x" * 50}, pieces=4)], break_after=3
        ),
        Reply("Half again", break_after=2, drop="eof"),  # body ends cleanly, but no finish_reason
        Reply("The whole answer."),
    )
    outcome = await run_task(make_agent(), "hi", host, recorder)

    assert outcome.final_text == "The whole answer."
    assert len(scripted.requests) == 4
    errors = [event.message for event in recorder.of_type("error")]
    assert len(errors) == 3
    assert "connection to the model server failed" in errors[0]
    assert "stream ended before the answer was complete" in errors[2]
    # Nothing of the broken turns reached the conversation or ran.
    assert recorder.conversation == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "The whole answer."},
    ]
    assert not (host.root / "x.txt").exists()
    assert recorder.of_type("tool_call") == []


async def test_max_turns_ends_the_run_with_a_valid_conversation(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(*[Reply(tool_calls=[Call("run_shell", {"cmd": "echo again >> log.txt"})])] * 3)
    with pytest.raises(MaxTurnsExceeded, match="limit of 2 model turns"):
        await run_task(make_agent(max_turns=2), "loop forever", host, recorder)

    assert len(scripted.requests) == 2
    assert (host.root / "log.txt").read_text() == "again\n"  # the last turn's call was not run
    last = recorder.conversation[-1]
    assert last["role"] == "tool"
    assert "limit of 2 turns" in last["content"]
    assert_valid_conversation(recorder.conversation)


async def test_a_given_client_has_its_own_retries_switched_off(
    scripted: ScriptedOpenAI, host: LocalToolHost, recorder: Recorder
) -> None:
    client = AsyncOpenAI(api_key="k", base_url=scripted.base_url, max_retries=5)
    scripted.add(HttpError(500), Reply("ok"))
    agent = Agent(model=MODEL, client=client, retries=0)
    try:
        with pytest.raises(ModelError):
            await run_task(agent, "hi", host, recorder)
        assert len(scripted.requests) == 1  # neither the client nor the agent retried
    finally:
        await agent.aclose()
        await client.close()
