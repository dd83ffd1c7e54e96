"""The scripted server itself, through the raw openai client (other suites rely on it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI, InternalServerError, NotFoundError

from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI


@pytest.fixture
async def client(scripted: ScriptedOpenAI) -> AsyncIterator[AsyncOpenAI]:
    raw = AsyncOpenAI(api_key="k", base_url=scripted.base_url, max_retries=0)
    yield raw
    await raw.close()


async def test_an_exhausted_script_fails_loudly(scripted: ScriptedOpenAI, client: AsyncOpenAI) -> None:
    with pytest.raises(InternalServerError, match="script exhausted"):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert scripted.messages() == [{"role": "user", "content": "hi"}]


async def test_non_streamed_answers_and_async_responders(
    scripted: ScriptedOpenAI, client: AsyncOpenAI
) -> None:
    async def respond(request: dict[str, Any]) -> Reply:
        return Reply(
            f"you said {request['messages'][-1]['content']}",
            tool_calls=[Call("list_processes")],
            usage=(7, 3),
        )

    scripted.add(respond)
    completion = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    message = completion.choices[0].message
    assert message.content == "you said x"
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "list_processes"  # type: ignore[union-attr]
    assert completion.usage is not None
    assert completion.usage.total_tokens == 10


async def test_unknown_routes_are_404(client: AsyncOpenAI) -> None:
    with pytest.raises(NotFoundError):
        await client.models.list()
