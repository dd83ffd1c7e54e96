"""Model profiles: what each family of model is sent, settings overriding it, a rejected parameter."""

from __future__ import annotations

import logging

import pytest

from crogia.agent.loop import TaskOptions
from crogia.agent.profiles import profile_for
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Reply, ScriptedOpenAI


def test_profiles_come_from_the_name_and_settings_override_each_fact() -> None:
    o4 = profile_for("o4-mini")
    assert (o4.family, o4.reasoning, o4.context_tokens) == ("o-series", True, 200_000)
    assert profile_for("openai/gpt-5-mini").family == "gpt-5"
    assert profile_for("gpt-4.1").context_tokens > profile_for("gpt-4o").context_tokens
    local = profile_for("llama3.1:8b")
    assert (local.family, local.reasoning, local.chat_options()) == ("compatible", False, {})
    tuned = profile_for("llama3.1:8b", reasoning=True, context_tokens=8192, output_tokens=1024)
    assert tuned.chat_options() == {"max_completion_tokens": 1024}
    assert tuned.input_budget == 8192 - 1024


async def test_a_reasoning_model_gets_no_temperature_and_max_completion_tokens(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("ok"), Reply("ok"))
    profile = {"temperature": 0.3, "reasoning_effort": "low"}
    await run_task(make_agent(model="o4-mini", profile=profile), "hi", host, recorder)
    await run_task(make_agent(model="gpt-4.1", profile=profile), "hi", host, recorder)

    o4, gpt4 = scripted.requests
    assert "temperature" not in o4 and "top_p" not in o4 and "max_tokens" not in o4
    assert (o4["max_completion_tokens"], o4["reasoning_effort"]) == (32_768, "low")
    assert (gpt4["temperature"], gpt4["max_tokens"]) == (0.3, 32_768)
    assert "reasoning_effort" not in gpt4 and "max_completion_tokens" not in gpt4


async def test_the_responses_api_gets_its_own_parameter_names(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("ok"))
    agent = make_agent(
        model="o4-mini", api="responses", profile={"temperature": 0.3, "reasoning_effort": "high"}
    )
    await run_task(agent, "hi", host, recorder)

    [request] = scripted.requests
    assert scripted.paths == ["/v1/responses"]
    assert (request["store"], request["include"]) == (False, ["reasoning.encrypted_content"])
    assert (request["reasoning"], request["max_output_tokens"]) == ({"effort": "high"}, 32_768)
    assert "temperature" not in request and "messages" not in request
    assert request["input"] == [{"role": "user", "content": "hi"}]
    assert request["tools"][0]["type"] == "function" and "name" in request["tools"][0]


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_rejected_parameter_is_dropped_with_one_retry_and_a_warning(
    api: str, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    async with ScriptedOpenAI(Reply("fine"), Reply("again"), unsupported=("top_p",)) as server:
        agent = make_agent(base_url=server.base_url, api=api, model_options={"top_p": 0.5})
        with caplog.at_level(logging.WARNING, logger="crogia.agent.model"):
            outcome = await run_task(agent, "hi", host, recorder)
            await run_task(agent, "again", host, Recorder())

    assert outcome.final_text == "fine"
    assert ["top_p" in r for r in server.requests] == [True, False, False]  # dropped for good
    assert recorder.of_type("error") == []
    [warning] = [r for r in caplog.records if "top_p" in r.getMessage()]
    assert "rejected the parameter" in warning.getMessage()


async def test_per_task_options_pick_model_effort_and_turns(
    scripted: ScriptedOpenAI, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    scripted.add(Reply("ok"))
    agent = make_agent(model="gpt-4o")
    options = TaskOptions(model="o3", reasoning_effort="minimal", max_turns=2)
    await agent.run("hi", [], host, emit=recorder.emit, save=recorder.save, options=options)

    [request] = scripted.requests
    assert (request["model"], request["reasoning_effort"]) == ("o3", "minimal")
    assert "temperature" not in request
