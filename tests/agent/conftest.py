"""Fixtures for agent tests: a scripted model server, a local tool host, an agent factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from crogia.agent.loop import Agent, RetryPolicy
from tests.agent.helpers import MODEL, Recorder
from tests.agent.local_host import LocalToolHost
from tests.support.scripted_openai import ScriptedOpenAI


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI() as server:
        yield server


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[LocalToolHost]:
    local = await LocalToolHost.create(tmp_path / "workspace", tmp_path / "logs")
    yield local
    await local.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


MakeAgent = Callable[..., Agent]


@pytest.fixture
async def make_agent(scripted: ScriptedOpenAI) -> AsyncIterator[MakeAgent]:
    """Agents on the scripted server with quick backoff; closed after the test."""
    agents: list[Agent] = []

    def make(*, retries: int = 3, backoff: float = 0.01, **kwargs: Any) -> Agent:
        policy = RetryPolicy(retries=retries, backoff_base=backoff, backoff_max=backoff * 4)
        params: dict[str, Any] = {"model": MODEL, "api_key": "test-key", "base_url": scripted.base_url}
        agent = Agent(**(params | {"retry_policy": policy} | kwargs))
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.aclose()
