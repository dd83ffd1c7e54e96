"""The agent loop: stream a turn, run the tools it asks for, repeat until it answers in words.

Small on purpose, on the official `openai` client (Chat Completions or the Responses API,
streaming, tool calls). The conversation is Chat Completions message dicts without the system
prompt, which is sent at call time; `save` gets a snapshot after every model turn and every
batch of tool results, so a crash or a cancel loses at most the step in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from openai import AsyncOpenAI

from crogia.agent.compaction import ContextView
from crogia.agent.context import ContextSettings
from crogia.agent.errors import AgentError, AgentNotConfigured, MaxTurnsExceeded, ModelError
from crogia.agent.host import ToolHost
from crogia.agent.model import ModelCaller, RetryPolicy
from crogia.agent.profiles import ModelApi, ModelProfile, profile_for
from crogia.agent.prompt import system_prompt as default_system_prompt
from crogia.agent.run import RunLimits, RunOutcome, SaveView, TaskRun
from crogia.agent.tools import Toolbox, default_toolbox
from crogia.config import Settings
from crogia.events import Event

__all__ = [
    "Agent",
    "AgentError",
    "AgentNotConfigured",
    "ContextView",
    "MaxTurnsExceeded",
    "ModelError",
    "RetryPolicy",
    "RunOutcome",
    "TaskOptions",
]


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task overrides of the agent's settings (None: the agent's own)."""

    model: str | None = None
    max_turns: int | None = None
    reasoning_effort: str | None = None


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
        api: ModelApi = "chat",
        profile: Mapping[str, Any] | None = None,
        context: ContextSettings | _ContextFromSettings | None = None,
        limits: RunLimits | None = None,
    ) -> None:
        """`client`, when given, is used (with its own retries off) instead of building one from
        api_key/base_url/timeout; `retry_policy` overrides `retries`; `model_options` go into
        every request (e.g. `{"top_p": 0.9}`); `profile` overrides facts of the model's profile
        (`profile_for` keywords); `context` sets compaction (default: from the profile's window)."""
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self.model = model
        self.api: ModelApi = api
        self.policy = retry_policy or RetryPolicy(retries=retries)
        self.toolbox = toolbox or default_toolbox()
        self.system_prompt = system_prompt if system_prompt is not None else default_system_prompt()
        self.limits = replace(limits or RunLimits(), max_turns=max_turns)
        self._profile_overrides = dict(profile or {})
        self._context = context
        self._api_key, self._base_url, self._timeout = api_key, base_url, timeout
        self._given_client = client
        self._client: AsyncOpenAI | None = None
        self._options = dict(model_options or {})
        self._callers: dict[tuple[str, str | None], ModelCaller] = {}

    @property
    def max_turns(self) -> int:
        return self.limits.max_turns

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
            "api": settings.model_api,
            "profile": {
                "reasoning": settings.model_reasoning,
                "context_tokens": settings.model_context_tokens,
                "output_tokens": settings.model_max_output_tokens,
                "reasoning_effort": settings.model_reasoning_effort or None,
                "temperature": settings.model_temperature,
            },
            "limits": RunLimits(max_tokens=settings.task_max_tokens, timeout=settings.task_timeout),
            "context": _ContextFromSettings(settings),
        }
        return cls(**(params | overrides))

    def profile(self, model: str | None = None, reasoning_effort: str | None = None) -> ModelProfile:
        """The profile requests for `model` (default: the agent's) are built from."""
        overrides = dict(self._profile_overrides)
        if reasoning_effort:
            overrides["reasoning_effort"] = reasoning_effort
        return profile_for(model or self.model, **overrides)

    async def run(
        self,
        task: str,
        history: list[dict[str, Any]],
        host: ToolHost,
        *,
        emit: Callable[[Event], Awaitable[None]],
        save: Callable[[list[dict[str, Any]]], Awaitable[None]],
        task_id: str | None = None,
        view: ContextView | None = None,
        save_view: SaveView | None = None,
        options: TaskOptions | None = None,
    ) -> RunOutcome:
        """Run `task` continuing `history` (the list is not modified).

        `save` receives the whole conversation after each step; it only ever grows by appending
        (earlier messages never change), so a store may append `messages[len(saved):]`. The model
        is sent `view` applied to it (the compacted form); `save_view` gets each new view.

        Raises `AgentError` when the run cannot finish; on cancellation the saved conversation is
        left valid (open tool calls answered "cancelled by the user") and CancelledError propagates.
        """
        options = options or TaskOptions()
        caller = self._model_caller(options.model or self.model, options.reasoning_effort)
        prompt = self.system_prompt() if callable(self.system_prompt) else self.system_prompt
        limits = (
            self.limits if options.max_turns is None else replace(self.limits, max_turns=options.max_turns)
        )
        run = TaskRun(
            caller,
            self.toolbox,
            host,
            history,
            limits=limits,
            context=self._context_settings(caller.profile),
            view=view or ContextView(),
            emit=emit,
            save=save,
            save_view=save_view or _no_view,
            task_id=task_id,
            prompt=prompt,
        )
        return await run.execute(task)

    def _context_settings(self, profile: ModelProfile) -> ContextSettings:
        context = self._context
        if isinstance(context, _ContextFromSettings):
            return context.for_profile(profile)
        return context or ContextSettings(input_tokens=profile.input_budget)

    async def aclose(self) -> None:
        """Close the HTTP client this agent built (a client passed in is left to its owner)."""
        if self._client is not None and self._given_client is None:
            await self._client.close()
        self._client = None
        self._callers.clear()

    async def warm_up(self) -> None:
        """Build the model client on a worker thread before the first task needs it.

        Its first construction imports the client's resources and loads the CA bundle: 0.1-0.8 s
        that would otherwise stall the event loop (and every stream) when the first task starts.
        Does nothing when the agent is not configured or already has its client.
        """
        if self._client is not None or not self.model or not (self._api_key or self._given_client):
            return
        client = await asyncio.to_thread(self._new_client)
        if self._client is None:
            self._client = client
        elif self._given_client is None:  # a task built one meanwhile
            await client.close()

    def _model_caller(self, model: str, effort: str | None) -> ModelCaller:
        # Checked before any call so a misconfigured server fails with words, not an HTTP 401.
        if not model:
            raise AgentNotConfigured("no model is configured: set MODEL_NAME")
        caller = self._callers.get((model, effort))
        if caller is None:
            if self._client is None:
                if self._given_client is None and not self._api_key:
                    raise AgentNotConfigured(
                        "no API key is configured: set OPENAI_API_KEY "
                        "(any non-empty value for a server that needs none)"
                    )
                self._client = self._new_client()
            caller = self._callers[(model, effort)] = ModelCaller(
                self._client,
                model=model,
                tools=self.toolbox.schemas,
                policy=self.policy,
                profile=self.profile(model, effort),
                api=self.api,
                options=self._options,
            )
        return caller

    def _new_client(self) -> AsyncOpenAI:
        if self._given_client is not None:
            return self._given_client.with_options(max_retries=0)
        return AsyncOpenAI(
            api_key=self._api_key, base_url=self._base_url, timeout=self._timeout, max_retries=0
        )


@dataclass(frozen=True, slots=True)
class _ContextFromSettings:
    """Compaction settings whose window comes from the profile of the model each task uses."""

    settings: Settings

    def for_profile(self, profile: ModelProfile) -> ContextSettings:
        s = self.settings
        return ContextSettings(
            input_tokens=profile.input_budget,
            compact_at=s.context_compact_at,
            keep_turns=s.context_keep_turns,
            max_compactions=s.context_max_compactions,
        )


async def _no_view(view: ContextView) -> None:
    return None
