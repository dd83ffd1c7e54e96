"""The agent loop: stream a turn, run the tools it asks for, repeat until it answers in words.

Small on purpose, on the official `openai` client (Chat Completions, streaming, tool calls).
The conversation is plain OpenAI message dicts without the system prompt, which is prepended
at call time; `save` gets a snapshot after every model turn and every tool result, so a
crash or a cancel loses at most the step in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from openai import AsyncOpenAI

from crogia.agent.errors import AgentError, AgentNotConfigured, MaxTurnsExceeded, ModelError
from crogia.agent.host import ToolHost
from crogia.agent.model import ModelCaller, RetryPolicy
from crogia.agent.prompt import system_prompt as default_system_prompt
from crogia.agent.run import RunOutcome, TaskRun
from crogia.agent.tools import Toolbox, default_toolbox
from crogia.config import Settings
from crogia.events import Event

__all__ = [
    "Agent",
    "AgentError",
    "AgentNotConfigured",
    "MaxTurnsExceeded",
    "ModelError",
    "RetryPolicy",
    "RunOutcome",
]


class Agent:
    """Runs tasks against one model; safe to share between sessions (it keeps no run state)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str = "",
        base_url: str | None = None,
        client: AsyncOpenAI | None = None,
        max_turns: int = 50,
        retries: int = 4,
        timeout: float = 600.0,
        retry_policy: RetryPolicy | None = None,
        toolbox: Toolbox | None = None,
        system_prompt: str | Callable[[], str] | None = None,
        model_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`client`, when given, is used (with its own retries off) instead of building one from
        api_key/base_url/timeout; `retry_policy` overrides `retries`; `model_options` go into
        every request (e.g. `{"reasoning_effort": "low"}`)."""
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self.model = model
        self.max_turns = max_turns
        self.policy = retry_policy or RetryPolicy(retries=retries)
        self.toolbox = toolbox or default_toolbox()
        self.system_prompt = system_prompt if system_prompt is not None else default_system_prompt()
        self._api_key, self._base_url, self._timeout = api_key, base_url, timeout
        self._given_client = client
        self._options = dict(model_options or {})
        self._caller: ModelCaller | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Agent:
        """An agent configured from Crogia's settings (`overrides` win)."""
        params: dict[str, Any] = {
            "model": settings.model_name,
            "api_key": settings.openai_api_key,
            "base_url": settings.openai_base_url,
            "max_turns": settings.max_turns,
            "retries": settings.model_retries,
            "timeout": settings.model_timeout,
        }
        return cls(**(params | overrides))

    async def run(
        self,
        task: str,
        history: list[dict[str, Any]],
        host: ToolHost,
        *,
        emit: Callable[[Event], Awaitable[None]],
        save: Callable[[list[dict[str, Any]]], Awaitable[None]],
        task_id: str | None = None,
    ) -> RunOutcome:
        """Run `task` continuing `history` (the list is not modified).

        `save` receives the whole conversation after each step; it only ever grows by appending
        (earlier messages never change), so a store may append `messages[len(saved):]`.

        Raises `AgentError` when the run cannot finish; on cancellation the saved conversation is
        left valid (open tool calls answered "cancelled by the user") and CancelledError propagates.
        """
        caller = self._model_caller()
        prompt = self.system_prompt() if callable(self.system_prompt) else self.system_prompt
        run = TaskRun(
            caller,
            self.toolbox,
            host,
            history,
            max_turns=self.max_turns,
            emit=emit,
            save=save,
            task_id=task_id,
            prompt=prompt,
        )
        return await run.execute(task)

    async def aclose(self) -> None:
        """Close the HTTP client this agent built (a client passed in is left to its owner)."""
        if self._caller is not None and self._given_client is None:
            await self._caller.client.close()
        self._caller = None

    async def warm_up(self) -> None:
        """Build the model client on a worker thread before the first task needs it.

        Its first construction imports the client's resources and loads the CA bundle: 0.1-0.8 s
        that would otherwise stall the event loop (and every stream) when the first task starts.
        Does nothing when the agent is not configured or already has its client.
        """
        if self._caller is not None or not self.model or not (self._api_key or self._given_client):
            return
        caller = await asyncio.to_thread(self._new_caller)
        if self._caller is None:
            self._caller = caller
        elif self._given_client is None:  # a task built one meanwhile
            await caller.client.close()

    def _model_caller(self) -> ModelCaller:
        # Checked before any call so a misconfigured server fails with words, not an HTTP 401.
        if not self.model:
            raise AgentNotConfigured("no model is configured: set MODEL_NAME")
        if self._caller is None:
            if self._given_client is None and not self._api_key:
                raise AgentNotConfigured(
                    "no API key is configured: set OPENAI_API_KEY "
                    "(any non-empty value for a server that needs none)"
                )
            self._caller = self._new_caller()
        return self._caller

    def _new_caller(self) -> ModelCaller:
        if self._given_client is not None:
            client = self._given_client.with_options(max_retries=0)
        else:
            client = AsyncOpenAI(
                api_key=self._api_key, base_url=self._base_url, timeout=self._timeout, max_retries=0
            )
        client.chat.completions  # noqa: B018 - the resource classes are imported on first access
        return ModelCaller(
            client, model=self.model, tools=self.toolbox.schemas, policy=self.policy, options=self._options
        )
