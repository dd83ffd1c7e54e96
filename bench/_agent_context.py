"""The agent loop with a long history, without any network: what the loop itself costs.

A model turn here is a real `TaskRun` turn (context check, compacted view, request body built,
the streamed chunks fed and emitted as events, the reply appended and saved, a no-op tool run)
against a `ModelCaller` whose HTTP exchange is replaced by the same chunks already in memory.
So the figure excludes the model, the HTTP client and the tools, as the loop's budget does.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.support.scripted_replies import Call, Reply, reply_chunks

from crogia.agent.compaction import ContextView, estimate_all
from crogia.agent.context import ContextKeeper, ContextSettings
from crogia.agent.model import ModelCaller, RetryPolicy
from crogia.agent.profiles import profile_for
from crogia.agent.run import RunLimits, TaskRun
from crogia.agent.stream import Turn, TurnBuilder
from crogia.agent.tools import default_toolbox
from crogia.events import Event

OUTPUT_CHARS = 6000
"""Each old tool output: 100 of them make ~600k characters, ~150k tokens at 4 characters a token."""


def long_history(turns: int = 100) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = [{"role": "user", "content": "fix the failing tests"}]
    for n in range(turns):
        call = {
            "id": f"c{n}",
            "type": "function",
            "function": {"name": "read_file", "arguments": '{"path": "a"}'},
        }
        history.append({"role": "assistant", "content": "Looking.", "tool_calls": [call]})
        history.append({"role": "tool", "tool_call_id": f"c{n}", "content": f"{n} " + "x" * OUTPUT_CHARS})
    return history


class _InMemoryCaller(ModelCaller):
    """Builds each request body as for the wire, then feeds pre-decoded chunks."""

    def __init__(self, chunks: list[list[dict[str, Any]]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks
        self.turns = 0

    async def _attempt(self, body: dict[str, Any], on_text: Any) -> Turn:
        turn = TurnBuilder()
        for chunk in self.chunks[min(self.turns, len(self.chunks) - 1)]:
            text = turn.feed(chunk)
            if text:
                await on_text(text)
        self.turns += 1
        turn.check_complete()
        return turn


async def loop_cpu_per_turn(history: list[dict[str, Any]], turns: int, text: str, host: Any) -> float:
    """Milliseconds of CPU per model turn of a run continuing `history`."""
    call = Call("list_processes", {}, pieces=3)
    working = reply_chunks(
        Reply(text, chunk_size=6, tool_calls=[call]), request_no=1, model="m", include_usage=False
    )
    final = reply_chunks(Reply(text, chunk_size=6), request_no=2, model="m", include_usage=False)
    toolbox = default_toolbox()
    profile = profile_for("gpt-4.1")  # a 1M window: the turn is measured, not a compaction
    caller = _InMemoryCaller(
        [working] * (turns - 1) + [final],
        client=None,
        model="m",
        tools=toolbox.schemas,
        policy=RetryPolicy(),
        profile=profile,
    )

    async def emit(event: Event) -> None:
        pass

    async def save(messages: list[dict[str, Any]]) -> None:
        pass

    async def save_view(view: ContextView) -> None:
        pass

    run = TaskRun(
        caller, toolbox, host, history,
        limits=RunLimits(max_turns=turns), context=ContextSettings(input_tokens=profile.input_budget),
        view=ContextView(), emit=emit, save=save, save_view=save_view, task_id="t", prompt="You are a bench.",
    )  # fmt: skip
    started = time.process_time()
    outcome = await run.execute("go on")
    elapsed = time.process_time() - started
    assert outcome.turns == turns, outcome
    return elapsed / turns * 1000


async def compaction_ms(history: list[dict[str, Any]]) -> dict[str, Any]:
    """One compaction of `history` for o4-mini's window, by shortening only (no summary call)."""
    settings = ContextSettings(input_tokens=profile_for("o4-mini").input_budget)

    async def summarise(old: list[dict[str, Any]]) -> str:
        raise AssertionError("shortening old outputs should have been enough")

    keeper = ContextKeeper(list(history), ContextView(), settings, 2000)
    assert keeper.over()
    started = time.process_time()
    done = await keeper.compact(summarise)
    elapsed = (time.process_time() - started) * 1000
    return {
        "history_estimated_tokens": estimate_all(history),
        "history_chars": sum(len(m.get("content") or "") for m in history),
        "compaction_ms": round(elapsed, 3),
        "tokens_before": done.tokens_before,
        "tokens_after": done.tokens_after,
        "strategy": done.strategy,
    }


def chunk_decode_us(repeats: int = 5000) -> dict[str, float]:
    """Client-side CPU per streamed chunk, network-free: JSON to a typed chunk (as
    `chat.completions.create` streams) against JSON to a dict fed to `TurnBuilder` (the loop now)."""
    from openai._models import construct_type
    from openai.types.chat import ChatCompletionChunk

    raw = json.dumps(reply_chunks(Reply("hello "), request_no=1, model="m", include_usage=False)[1])
    builder = TurnBuilder()
    started = time.process_time()
    for _ in range(repeats):
        construct_type(type_=ChatCompletionChunk, value=json.loads(raw))
    typed = (time.process_time() - started) / repeats * 1e6
    started = time.process_time()
    for _ in range(repeats):
        builder.feed(json.loads(raw))
    plain = (time.process_time() - started) / repeats * 1e6
    return {"chunk_cpu_us_typed": round(typed, 1), "chunk_cpu_us_dicts": round(plain, 1)}
