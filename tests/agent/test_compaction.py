"""Context that never overflows: compaction before the window fills, and on the server's 400."""

from __future__ import annotations

from typing import Any

import pytest

from crogia.agent.compaction import SUMMARY_INSTRUCTIONS, SUMMARY_PREFIX, ContextView, is_summary
from crogia.agent.context import ContextKeeper, ContextSettings
from crogia.agent.errors import ContextOverflow
from tests.agent.conftest import MakeAgent
from tests.agent.helpers import Recorder, assert_valid_conversation, run_task
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI, prompt_tokens

BIG = 6000
"""Characters in each file the scripted model reads: ~2000 tokens by the agent's estimate."""


def is_summary_request(request: dict[str, Any]) -> bool:
    system = request.get("instructions") or request.get("messages", [{}])[0].get("content")
    return system == SUMMARY_INSTRUCTIONS


def reader(reads: int) -> Any:
    """A model that reads big{n}.txt `reads` times, then answers; it summarises when asked to."""
    done = {"reads": 0}

    def respond(request: dict[str, Any]) -> Reply:
        if is_summary_request(request):
            return Reply("TASK: read every log. FILES: big0..big7.txt read. OPEN: nothing.")
        if done["reads"] < reads:
            done["reads"] += 1
            return Reply(tool_calls=[Call("read_file", {"path": f"big{done['reads'] % 8}.txt"})])
        return Reply("all read")

    return respond


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_task_past_the_window_compacts_and_the_next_task_sees_the_summary(
    api: str, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    for n in range(8):
        (host.workspace.root / f"big{n}.txt").write_text(f"file {n}\n" + "x" * BIG)
    async with ScriptedOpenAI(responder=reader(8), context_limit=9000, auto_usage=True) as server:
        context = ContextSettings(input_tokens=10_000, keep_turns=2)
        agent = make_agent(base_url=server.base_url, api=api, context=context)
        outcome = await run_task(agent, "read every log", host, recorder)
        assert outcome.final_text == "all read"
        # Compacted before the window filled: the server never had to refuse a request.
        assert all(prompt_tokens(r) <= server.context_limit for r in server.requests)
        assert recorder.of_type("error") == []
        compacted = recorder.of_type("context_compacted")
        assert compacted and all(c.tokens_after < c.tokens_before for c in compacted)
        assert "summarize" in {c.strategy for c in compacted}
        assert sum(map(is_summary_request, server.requests)) == len(
            [c for c in compacted if "summarize" in c.strategy]
        )
        # The full history is kept whole; only the view the model is sent was compacted.
        full = recorder.conversation
        assert_valid_conversation(full)
        assert sum(1 for m in full if m["role"] == "tool" and len(m["content"]) > BIG) == 8
        view = recorder.views[-1]
        assert view.covers <= len(full) and any(is_summary(m) for m in view.head)

        server.responder = lambda request: Reply("I remember")
        await run_task(agent, "what did you read?", host, Recorder(), history=full, view=view)
        sent = server.requests[-1]
        text = str(sent.get("messages") or sent.get("input"))
        assert SUMMARY_PREFIX.strip()[:30] in text and "big0..big7.txt read" in text
        assert "what did you read?" in text


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_context_length_exceeded_compacts_and_retries_once(
    api: str, make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    history: list[dict[str, Any]] = [{"role": "user", "content": "earlier task"}]
    for n in range(3):
        call = {"id": f"c{n}", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}
        history += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{n}", "content": "y" * 5000},
        ]
    history.append({"role": "assistant", "content": "earlier done"})
    summary = Reply("TASK: earlier task. DONE: read three files.")
    async with ScriptedOpenAI(summary, Reply("continued"), context_limit=3000) as server:
        # The agent thinks its window is large: only the server's 400 can tell it otherwise.
        agent = make_agent(
            base_url=server.base_url, api=api, context=ContextSettings(input_tokens=100_000, keep_turns=1)
        )
        outcome = await run_task(agent, "continue", host, recorder, history=history)

    assert outcome.final_text == "continued"
    assert len(server.requests) == 3  # refused, the summary, the retry
    [event] = recorder.of_type("context_compacted")
    assert event.strategy.startswith("truncate_tool_outputs") or "summarize" in event.strategy
    assert recorder.of_type("error") == []


async def test_a_window_that_cannot_fit_even_compacted_fails_clearly(
    make_agent: MakeAgent, host: LocalToolHost, recorder: Recorder
) -> None:
    async with ScriptedOpenAI(context_limit=5) as server:
        agent = make_agent(base_url=server.base_url, context=ContextSettings(input_tokens=100_000))
        with pytest.raises(ContextOverflow, match="nothing is left to compact"):
            await run_task(agent, "hi", host, recorder)
    assert recorder.conversation == [{"role": "user", "content": "hi"}]


def tool_turns(n: int, size: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "task"}]
    for i in range(n):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "grep", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"head{i} " + "z" * size + f" tail{i}"},
        ]
    return messages


async def test_old_tool_outputs_are_cut_first_and_the_last_turns_kept_whole() -> None:
    full = tool_turns(6, 9000)
    keeper = ContextKeeper(full, ContextView(), ContextSettings(input_tokens=20_000, keep_turns=2), 100)
    assert keeper.over()

    async def no_summary(old: list[dict[str, Any]]) -> str:
        raise AssertionError("shortening was enough")

    done = await keeper.compact(no_summary)
    assert done.strategy == "truncate_tool_outputs" and done.tokens_after < keeper.settings.threshold
    view = keeper.messages()
    outputs = [m["content"] for m in view if m["role"] == "tool"]
    assert all(
        "cut by context compaction" in o and o.startswith(f"head{i}") for i, o in enumerate(outputs[:4])
    )
    assert all(o.endswith(f"tail{i}") for i, o in enumerate(outputs))
    assert [len(o) for o in outputs[4:]] == [len(m["content"]) for m in full[-3::2]]
    assert len(full[2]["content"]) > 9000  # the full history is untouched


async def test_a_summary_is_never_summarised_again_and_compactions_are_capped() -> None:
    full = [{"role": "user", "content": SUMMARY_PREFIX + "s" * 60_000}, *tool_turns(1, 10)[1:]]
    calls: list[int] = []

    async def summarise(old: list[dict[str, Any]]) -> str:
        calls.append(len(old))
        return "again"

    settings = ContextSettings(input_tokens=10_000, keep_turns=1, max_compactions=1)
    keeper = ContextKeeper(full, ContextView(), settings, 100)
    with pytest.raises(ContextOverflow):
        await keeper.compact(summarise)
    assert calls == []  # only an old summary before the kept turn: nothing new to summarise

    keeper = ContextKeeper(tool_turns(6, 9000), ContextView(), settings, 100)
    await keeper.compact(summarise, forced=True)
    with pytest.raises(ContextOverflow, match="after 1 compactions"):
        await keeper.compact(summarise)
